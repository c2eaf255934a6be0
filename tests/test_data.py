import json
import math

import numpy as np
import pytest
import torch

from higgs_min.chat import ChatEncoder
from higgs_min.data import IGNORE_INDEX, audio_stream, collate, delay_pattern, next_token_targets, revert_delay_pattern
from higgs_min.schema import DataError
from higgs_min.prepare.sanitize import load_jsonl
from tests.helpers import conversation, make_tokenizer, write_codes, write_jsonl

K, C, V = 4, 16, 400


def released_delay(codes, bos, pad):
    """The released model's construction, by its definition: out[k, t] = codes[k, t - k] on the
    diagonal band, bos above it (t < k), pad below it (t - k >= T)."""
    K_, T = codes.shape
    out = np.empty((K_, T + K_ - 1), dtype=np.int64)
    for k in range(K_):
        for t in range(T + K_ - 1):
            out[k, t] = codes[k, t - k] if 0 <= t - k < T else (bos if t < k else pad)
    return out


@pytest.fixture
def encoder(tmp_path):
    return ChatEncoder(make_tokenizer(tmp_path / "tok.json"), K, C, V)


def test_delay_pattern_matches_definition_and_reverts():
    g = torch.Generator().manual_seed(0)
    for K_, T in [(8, 1), (8, 37), (3, 5), (1, 4)]:
        codes = torch.randint(0, 1024, (K_, T), generator=g)
        d = delay_pattern(codes, bos=1024, pad=1025)
        assert d.shape == (K_, T + K_ - 1)
        assert np.array_equal(d.numpy(), released_delay(codes.numpy(), 1024, 1025))
        assert torch.equal(revert_delay_pattern(d), codes)


def test_audio_stream_input_and_labels():
    codes = torch.arange(3 * 4).view(3, 4)  # K=3, T=4
    inp, lab = audio_stream(codes, bos=16, eos=17)
    assert inp.shape == lab.shape == (3, 4 + 3 + 1)
    full = torch.cat([torch.full((3, 1), 16), codes, torch.full((3, 1), 17)], 1)
    assert torch.equal(inp, delay_pattern(full, 16, 17))
    assert inp[0].tolist() == [16, 0, 1, 2, 3, 17, 17, 17]
    assert inp[2].tolist() == [16, 16, 16, 8, 9, 10, 11, 17]
    assert lab[0].tolist() == [-100, 0, 1, 2, 3, 17, -100, -100]
    assert lab[2].tolist() == [-100, -100, -100, 8, 9, 10, 11, 17]


def test_special_tokens_are_looked_up_by_name(encoder):
    assert encoder.ids["begin_of_text"] == 300
    assert encoder.ids["audio_out_bos"] == 305 and encoder.ids["audio_out"] == 306


def test_missing_special_token_is_named(tmp_path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(DataError, match=r"<\|begin_of_text\|> is not in the tokenizer"):
        ChatEncoder(tmp_path / "t.json", K, C, V)


def test_labels_follow_the_chat_layout(tmp_path, encoder):
    codes = write_codes(tmp_path / "codes/a.npy", K, 5, C)
    user = write_codes(tmp_path / "codes/u.npy", K, 3, C, seed=1)
    write_jsonl(tmp_path / "d.jsonl", [conversation("codes/a.npy", user_audio="codes/u.npy")])
    (s,), report = load_jsonl(tmp_path / "d.jsonl", encoder, 1000)
    assert report.loaded == 1 and not report.skipped
    ids, lab = s.input_ids.tolist(), s.text_labels.tolist()
    sp = encoder.ids
    tok = encoder.tok.token_to_id
    # Supervised text positions, exactly: assistant text, audio_out_bos, audio_eos, the assistant's eot.
    sup = [(i, t) for i, t in enumerate(lab) if t != IGNORE_INDEX]
    assert [t for _, t in sup] == [tok("hello"), tok("world"), sp["audio_out_bos"], sp["audio_eos"], sp["eot"]]
    assert all(ids[i] == t for i, t in sup)
    assert ids[0] == sp["begin_of_text"] and ids.count(sp["begin_of_text"]) == 1
    assert ids.count(sp["start_header"]) == 3 and ids.count(sp["eot"]) == 3
    # Audio out: the placeholder expanded to T + K + 1 positions carrying the delayed stream.
    out_pos = s.audio_out_mask.nonzero().squeeze(1)
    assert len(out_pos) == 5 + K + 1 and all(ids[i] == sp["audio_out"] for i in out_pos)
    inp, alab = audio_stream(torch.from_numpy(codes.astype(np.int64)), C, C + 1)
    assert torch.equal(s.audio_codes[out_pos].T, inp) and torch.equal(s.audio_labels[out_pos].T, alab)
    assert ids[out_pos[0] - 1] == sp["audio_out_bos"] and ids[out_pos[-1] + 1] == sp["audio_eos"]
    # Audio in (user): expanded the same way, never a target.
    in_pos = s.audio_in_mask.nonzero().squeeze(1)
    assert len(in_pos) == 3 + K + 1 and all(ids[i] == sp["audio_in"] for i in in_pos)
    assert ids[in_pos[0] - 1] == sp["audio_bos"] and ids[in_pos[-1] + 1] == sp["audio_eos"]
    assert torch.equal(s.audio_codes[in_pos].T, audio_stream(torch.from_numpy(user.astype(np.int64)), C, C + 1)[0])
    assert (s.audio_labels[in_pos] == IGNORE_INDEX).all() and (s.text_labels[in_pos] == IGNORE_INDEX).all()
    assert (s.audio_labels[~s.audio_out_mask] == IGNORE_INDEX).all()
    assert s.stream_shapes == [("user", (K, 3)), ("assistant", (K, 5))]


def test_sample_statistics_are_logged(tmp_path, encoder, caplog):
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    write_jsonl(tmp_path / "d.jsonl", [conversation()] * 3)
    load_jsonl(tmp_path / "d.jsonl", encoder, 1000, log_first=2)
    lines = [r.message for r in caplog.records if r.message.startswith("sample line")]
    assert len(lines) == 2
    assert "text labels" in lines[0] and "masked" in lines[0] and "audio codes assistant:[4, 5]" in lines[0]
    assert any("loaded 3, skipped 0" in r.message for r in caplog.records)


def test_next_token_targets():
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    assert next_token_targets(labels).tolist() == [[2, 3, IGNORE_INDEX, IGNORE_INDEX]]
    a = torch.arange(12).view(1, 3, 4)
    t = next_token_targets(a)
    assert torch.equal(t[0, :2], a[0, 1:]) and (t[0, 2] == IGNORE_INDEX).all()


def test_collate_pads_and_masks(tmp_path, encoder):
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    write_codes(tmp_path / "codes/b.npy", K, 9, C)
    write_jsonl(tmp_path / "d.jsonl", [conversation("codes/a.npy"), conversation("codes/b.npy")])
    samples, _ = load_jsonl(tmp_path / "d.jsonl", encoder, 1000)
    b = collate(samples, pad_id=encoder.ids["end_of_text"])
    L0, L1 = len(samples[0].input_ids), len(samples[1].input_ids)
    assert L1 == L0 + 4 and b["input_ids"].shape == (2, L1) and b["audio_codes"].shape == (2, L1, K)
    assert b["attention_mask"][0].tolist() == [1] * L0 + [0] * 4
    assert (b["text_targets"][0, L0 - 1:] == IGNORE_INDEX).all() and (b["audio_targets"][0, L0 - 1:] == IGNORE_INDEX).all()
    # the targets are the samples' labels shifted once (logits at i vs label at i + 1), audio only at audio-out rows
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert torch.equal(b["text_targets"][i, :n - 1], s.text_labels[1:])
        want = s.audio_labels[1:].clone()
        want[~s.audio_out_mask[:-1]] = IGNORE_INDEX
        assert torch.equal(b["audio_targets"][i, :n - 1], want)
        assert s.audio_out_mask.any() and (want != IGNORE_INDEX).any()
    assert (b["input_ids"][0, L0:] == encoder.ids["end_of_text"]).all()
    assert torch.equal(b["audio_codes"][1], samples[1].audio_codes)
    assert b["sample_index"].tolist() == [1, 2]


BAD = {
    "malformed JSON": (b'{"messages": [', r"d\.jsonl:1: malformed JSON"),
    "unknown role": ({"messages": [{"role": "robot", "content": "a"}]}, r"d\.jsonl:1: messages\[0\]\.role: unknown role 'robot'"),
    "content type": ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\]\.content: expected a string or a list"),
    "item type": ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, r"content\[0\]\.type"),
    "missing codes file": (conversation("codes/nope.npy"), r"content\[1\]\.codes: file .*nope\.npy does not exist"),
    "wrong codebook count": (conversation("codes/k3.npy"), r"k3\.npy has shape \[3, 5\], expected \[4, T\]"),
    "float codes": (conversation("codes/float.npy"), r"float\.npy has dtype float32, expected integers"),
    "codes out of range": (conversation("codes/big.npy"), r"big\.npy has values in \[\d+, 16\], expected \[0, 16\)"),
    "negative codes": (conversation("codes/neg.npy"), r"neg\.npy has values in \[-1, -1\]"),
    "raw audio": ({"messages": [{"role": "assistant", "content": [{"type": "audio", "audio": "x.wav"}]}]}, r"raw audio must be encoded first"),
    "empty conversation": ({"messages": []}, r"d\.jsonl:1: messages: the conversation is empty"),
    "not an object": ([1, 2], r"d\.jsonl:1: messages: expected an object"),
    "non-UTF-8": (b'{"messages": "\xff\xfe"}', r"d\.jsonl:1: not valid UTF-8"),
}


def _bad_codes(tmp_path):
    write_codes(tmp_path / "codes/k3.npy", 3, 5, C)
    np.save(tmp_path / "codes/float.npy", np.zeros((K, 5), dtype=np.float32))
    np.save(tmp_path / "codes/big.npy", np.full((K, 5), 16, dtype=np.int64))
    np.save(tmp_path / "codes/neg.npy", np.full((K, 5), -1, dtype=np.int64))


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_a_clear_error(tmp_path, encoder, kind):
    _bad_codes(tmp_path)
    row, pattern = BAD[kind]
    write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=pattern):
        load_jsonl(tmp_path / "d.jsonl", encoder, 1000)


def test_bad_lines_are_counted_skips_when_asked(tmp_path, encoder, caplog):
    _bad_codes(tmp_path)
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    rows = [conversation()] + [BAD[k][0] for k in sorted(BAD)] + [conversation()]
    write_jsonl(tmp_path / "d.jsonl", rows)
    samples, report = load_jsonl(tmp_path / "d.jsonl", encoder, 1000, skip_bad=True, max_bad_fraction=1.0)
    assert [s.index for s in samples] == [1, len(rows)]
    assert sum(report.skipped.values()) == len(BAD)
    # one line per rejected line (at most 20) and one summary with the counts: no flood, no traceback
    assert sum("rejected" in r.message for r in caplog.records) == len(BAD) + 1


def test_unsupervised_and_too_long_samples_are_counted_skips(tmp_path, encoder):
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    no_target = {"messages": [{"role": "user", "content": "hello"}]}
    long_one = conversation()
    long_one["messages"][2]["content"][0]["text"] = "hello " * 300
    write_jsonl(tmp_path / "d.jsonl", [conversation(), no_target, long_one])
    samples, report = load_jsonl(tmp_path / "d.jsonl", encoder, 100)
    assert len(samples) == 1
    assert report.skipped == {"no supervised token": 1, "longer than max length": 1}
    assert "loaded 1, skipped 2" in report.summary()


def test_empty_file_is_an_error(tmp_path, encoder):
    (tmp_path / "d.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(tmp_path / "d.jsonl", encoder, 1000)


def test_codes_in_safetensors(tmp_path, encoder):
    from safetensors.numpy import save_file
    save_file({"codes": np.ones((K, 6), dtype=np.int32)}, str(tmp_path / "a.safetensors"))
    write_jsonl(tmp_path / "d.jsonl", [conversation("a.safetensors")])
    (s,), _ = load_jsonl(tmp_path / "d.jsonl", encoder, 1000)
    assert s.stream_shapes == [("assistant", (K, 6))]


def test_demo_set_loads_with_zero_skips():
    from higgs_min.config import ModelConfig
    from higgs_min.train.options import DATA
    cfg = ModelConfig.from_preset("tiny")
    enc = ChatEncoder(DATA / "tokenizer.json", cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
    samples, report = load_jsonl(DATA / "demo.jsonl", enc, 2048)
    assert len(samples) >= 24 and not report.skipped
    assert all(s.audio_out_mask.any() for s in samples)
    langs = "".join(enc.decode(s.input_ids[s.text_labels != IGNORE_INDEX]) for s in samples)
    assert any("\u0600" <= ch <= "\u06ff" for ch in langs) and "Paris" in langs  # Arabic and English


def test_prepare_encodes_with_seeded_random_dac_and_caches(tmp_path):
    from higgs_min.audio.codec import write_wav
    from higgs_min.prepare.encode import prepare
    t = torch.arange(24000) / 24000
    write_wav(tmp_path / "a.wav", 0.3 * torch.sin(2 * math.pi * 220 * t), 24000)
    row = {"messages": [{"role": "assistant", "content": [{"type": "audio", "audio": "a.wav"}]}]}
    write_jsonl(tmp_path / "in.jsonl", [row])
    counts = prepare(tmp_path / "in.jsonl", tmp_path / "out" / "o.jsonl", random_seed=0)
    assert counts == {"encoded": 1, "cached": 0, "audio_items": 1, "codec": "dac-random-seed:0"}
    item = json.loads((tmp_path / "out" / "o.jsonl").read_text())["messages"][0]["content"][0]
    codes = np.load(tmp_path / "out" / item["codes"])
    assert codes.shape == (8, 25) and codes.dtype == np.int16 and 0 <= codes.min() and codes.max() < 1024
    again = prepare(tmp_path / "in.jsonl", tmp_path / "out" / "o.jsonl", random_seed=0)
    assert again == {"encoded": 0, "cached": 1, "audio_items": 1, "codec": "dac-random-seed:0"}
    with pytest.raises(SystemExit, match="refusing"):
        prepare(tmp_path / "in.jsonl", tmp_path / "o2.jsonl")
    # and back to audio to listen to
    from higgs_min.audio.codec import read_wav
    from higgs_min.prepare.encode import main as prepare_main
    assert prepare_main(["--decode", str(tmp_path / "out" / item["codes"]), "--random-codec-seed", "0",
                         "--out", str(tmp_path / "back.wav")]) == 0
    x, rate = read_wav(tmp_path / "back.wav")
    assert rate == 24000 and abs(x.numel() - 25 * 960) < 960  # 25 frames of 40 ms, less edge trim


def _demo_samples():
    from higgs_min.config import ModelConfig
    from higgs_min.train.options import DATA
    cfg = ModelConfig.from_preset("tiny")
    enc = ChatEncoder(DATA / "tokenizer.json", cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
    return load_jsonl(DATA / "demo.jsonl", enc, 2048)[0]


def test_batch_stream_ranks_partition_the_global_batch_and_resume():
    from higgs_min.batches import BatchStream
    samples = _demo_samples()
    one = BatchStream(samples, 8, 1, 0, seed=3, pad_id=0)
    ranks = [BatchStream(samples, 4, 2, r, seed=3, pad_id=0) for r in range(2)]
    for _ in range(2 * one.batches_per_epoch()):  # across an epoch boundary
        want = sorted(one.next()["sample_index"].tolist())
        got = sorted(sum((r.next()["sample_index"].tolist() for r in ranks), []))
        assert got == want
    # Resume at (epoch, position): the same batches follow.
    a = BatchStream(samples, 8, 1, 0, seed=3, pad_id=0)
    for _ in range(5):
        a.next()
    b = BatchStream(samples, 8, 1, 0, seed=3, pad_id=0)
    b.epoch, b.position = a.epoch, a.position
    assert all(torch.equal(a.next()["input_ids"], b.next()["input_ids"]) for _ in range(6))


def test_group_by_length_cuts_padding_and_keeps_every_sample():
    from higgs_min.batches import BatchStream, padding_fraction
    samples = _demo_samples()
    lengths = [len(s.input_ids) for s in samples]
    plain = BatchStream(samples, 4, 1, 0, seed=0, pad_id=0)
    grouped = BatchStream(samples, 4, 1, 0, seed=0, pad_id=0, group_by_length=True)
    for epoch in range(3):
        order = grouped.epoch_order(epoch)
        assert sorted(order) == list(range(len(samples)))
        assert padding_fraction(lengths, order, 4) < padding_fraction(lengths, plain.epoch_order(epoch), 4)


def test_plan_then_materialize_equals_the_position_by_position_layout(tmp_path, encoder):
    """materialize(plan(line)) (the JSONL path, and the packed one) == a per-position loop, on the fixtures
    (user audio, assistant audio, several streams) and on the demo set."""
    from tests.reference_layout import assert_same_sample, reference_sample
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    write_codes(tmp_path / "codes/u.npy", K, 3, C, seed=1)
    write_codes(tmp_path / "codes/b.npy", K, 1, C, seed=2)
    two = conversation("codes/b.npy", user_audio="codes/u.npy")
    two["messages"][0]["content"] = [{"type": "audio", "codes": "codes/a.npy"}, {"type": "text", "text": "a"}]
    two["messages"][2]["content"].append({"type": "audio", "codes": "codes/a.npy"})
    rows = [conversation(), conversation("codes/a.npy", user_audio="codes/u.npy"), two,
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    samples, _ = load_jsonl(tmp_path / "d.jsonl", encoder, 1000)
    lines = (tmp_path / "d.jsonl").read_bytes().splitlines()
    assert len(samples) == len(rows)
    for s in samples:
        assert_same_sample(s, reference_sample(encoder, lines[s.index - 1], tmp_path, s.index))

    from higgs_min.config import ModelConfig
    from higgs_min.train.options import DATA
    cfg = ModelConfig.from_preset("tiny")
    enc = ChatEncoder(DATA / "tokenizer.json", cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
    demo, _ = load_jsonl(DATA / "demo.jsonl", enc, 2048)
    lines = (DATA / "demo.jsonl").read_bytes().splitlines()
    for s in demo:
        assert_same_sample(s, reference_sample(enc, lines[s.index - 1], DATA, s.index))
