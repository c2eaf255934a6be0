"""#27, inference made faster, each path against the one it replaces: several clips encoded at once
(AudioTokenizer.encode_batch, prepare --encode-batch) give every clip exactly the codes it gets alone (only clips of
one length are batched: padding would change the codes, see encode_batch); the decoder's transposed convs equal
nn.ConvTranspose1d bit for bit. Tiny random tokenizer (tests/audiotok_util.py). The Snake: test_audio_tokenizer.py."""
import json
import math

import numpy as np
import pytest
import torch

from higgs_min.audio import tokenizer as at
from tests import audiotok_util as u


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("audiotok_batch")
    u.write_released(root, seed=0)
    return at.load(root)


def clip(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 24000
    return 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(n, generator=g)


def spy_batches(monkeypatch, tok) -> list:
    """Record the batch size of every model.encode call."""
    sizes, encode = [], tok.model.encode
    monkeypatch.setattr(tok.model, "encode", lambda x: sizes.append(x.shape[0]) or encode(x))
    return sizes


def test_encode_batch_equals_one_clip_at_a_time(tok, monkeypatch):
    """Clips of one length encoded together (3 of them with max_batch 2: a batch of 2 and one left), the
    others alone (a length off the hop, with the official's padded re-encode), order kept."""
    lengths = [960 * 6, 960 * 6 + 100, 960 * 6, 1000 * 7, 960 * 6]
    clips = [clip(n, seed=i) for i, n in enumerate(lengths)]
    one_by_one = [tok.encode(x) for x in clips]
    sizes = spy_batches(monkeypatch, tok)
    batched = tok.encode_batch(clips, max_batch=2)
    assert sorted(sizes) == [1, 1, 1, 2]
    assert [c.shape for c in batched] == [c.shape for c in one_by_one]
    assert all(torch.equal(a, b) for a, b in zip(batched, one_by_one))
    assert not torch.equal(batched[0], batched[2])  # different clips of one length: distinct codes
    with pytest.raises(ValueError, match="shorter than one frame"):
        tok.encode_batch([clips[0], clip(500)])


def test_prepare_encode_batch_writes_the_codes_of_one_at_a_time(tok, tmp_path, monkeypatch):
    """prepare --encode-batch 3 and --encode-batch 1 write the same codes files; clips of one length (two of them
    at 16 kHz, resampled to one 24 kHz length) were encoded together."""
    from higgs_min.audio.codec import write_wav
    from higgs_min.prepare import encode as prep
    from tests.helpers import write_jsonl
    waves = [(24000, clip(960 * 5, 1)), (24000, clip(960 * 5, 2)), (16000, clip(4800, 3)), (16000, clip(4800, 4)),
             (24000, clip(960 * 7, 5))]
    rows = []
    for i, (rate, x) in enumerate(waves):
        write_wav(tmp_path / f"a{i}.wav", x, rate)
        rows.append({"messages": [{"role": "assistant", "content": [{"type": "audio", "audio": f"a{i}.wav"}]}]})
    write_jsonl(tmp_path / "in.jsonl", rows)
    monkeypatch.setattr(at, "load", lambda *a, **k: tok)  # the fixture's tokenizer, spied on
    sizes = spy_batches(monkeypatch, tok)
    codes = {}
    for batch in (3, 1):
        out = tmp_path / f"b{batch}" / "o.jsonl"
        assert prep.prepare(tmp_path / "in.jsonl", out, audio_tokenizer=tmp_path, encode_batch=batch)["encoded"] == 5
        items = [json.loads(line)["messages"][0]["content"][0]["codes"] for line in out.read_text().splitlines()]
        codes[batch] = [np.load(out.parent / p) for p in items]
    assert sorted(sizes) == [1] * 6 + [2, 2]  # batch 3: two pairs and one alone; batch 1: five alone
    assert all(np.array_equal(a, b) for a, b in zip(codes[3], codes[1]))
    assert not np.array_equal(codes[3][0], codes[3][1])


def test_transposed_conv_inference_is_nn_conv_transpose_bit_for_bit():
    """#27: the decoder's transposed convs hand oneDNN channels-last tensors in inference (layers._ConvTranspose1d);
    the output is nn.ConvTranspose1d's, bit for bit, at each stride the release uses (output_padding = stride % 2),
    for a batch of 2; with autograd on it is nn.ConvTranspose1d itself."""
    from higgs_min.audio.layers import _ConvTranspose1d
    g = torch.Generator().manual_seed(0)
    for stride in (8, 5, 4, 2, 3):
        conv = _ConvTranspose1d(24, 16, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                                output_padding=stride % 2)
        x = torch.randn(2, 24, 301, generator=g)
        with torch.no_grad():
            expect = torch.nn.ConvTranspose1d.forward(conv, x)
        with torch.inference_mode():
            got = conv(x)
        assert got.shape == (2, 16, 301 * stride) and got.is_contiguous() and torch.equal(got, expect)
    assert conv(x.requires_grad_(True)).requires_grad
