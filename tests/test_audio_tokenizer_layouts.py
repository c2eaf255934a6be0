"""The audio tokenizer in the three layouts users download (audio/tokenizer_files.py).

One set of seeded tiny weights is written as the released model.pth, as transformers'
HiggsAudioV2TokenizerModel.save_pretrained writes it (sharded), and as the codec inside a v3-style
model folder (prefixed, beside fake LLM tensors). Independent formulations: transformers' own
from_pretrained of the saved folder, and the name mapping re-derived in tests/audiotok_util.py.
The tiny widths pass the released-architecture check by patching its table (`tiny`); the check
itself runs on the real table in the refusal tests.
"""
import contextlib
import json
import math
import re
import types
from pathlib import Path

import pytest
import torch

from higgs_min.audio import tokenizer as at
from higgs_min.audio import tokenizer_files as tf
from tests import audiotok_util as u

CLIPS = (960 * 4, 2500, 960 * 3 + 17)  # a multiple of the hop, and two lengths the padded re-encode handles


def clip(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.sin(2 * math.pi * 220 * torch.arange(n) / 24000) + 0.05 * torch.randn(n, generator=g)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """root/{pth, hf, v3}: the same weights in the three layouts; returns (root, released state)."""
    root = tmp_path_factory.mktemp("layouts")
    _, state = u.write_released(root / "pth", seed=3)
    u.write_transformers(root / "hf", state, max_shard_size="300KB")
    u.write_v3(root / "v3", state, tf.V3_PREFIX)
    return root, state


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(tf, "RELEASED", u.tiny_released(tf.RELEASED))


def spy_on_reads(monkeypatch):
    """Record every file safe_open opens and every tensor read through it."""
    opened, read, real = [], [], tf.safe_open

    @contextlib.contextmanager
    def spy(path, framework):
        opened.append(Path(path).name)
        with real(path, framework=framework) as f:
            yield types.SimpleNamespace(keys=f.keys, get_tensor=lambda k: read.append(k) or f.get_tensor(k))
    monkeypatch.setattr(tf, "safe_open", spy)
    return opened, read


def test_every_layout_gives_the_same_codes_audio_and_identity(layouts, tiny, monkeypatch):
    root, state = layouts
    assert len(list((root / "hf").glob("model-*.safetensors"))) > 1  # sharded, with its index
    toks = {name: at.load(root / name) for name in ("pth", "hf")}
    opened, read = spy_on_reads(monkeypatch)
    toks["v3"] = at.load(root / "v3")
    # only the codec's tensors were read, each once; the shard holding only LLM tensors was never opened
    codec = {tf.V3_PREFIX + k for k in u.to_transformers(state, fold="parametrizations")}
    assert sorted(read) == sorted(codec)
    assert "model-00001-of-00003.safetensors" not in opened
    assert len({t.identity for t in toks.values()}) == 1
    for n in CLIPS:
        codes = {name: t.encode(clip(n, seed=n)) for name, t in toks.items()}
        assert codes["pth"].shape == (8, toks["pth"].model.config.frames(n))
        assert all(torch.equal(c, codes["pth"]) for c in codes.values()), n
        audio = {name: t.decode(codes["pth"]) for name, t in toks.items()}
        assert all(torch.equal(a, audio["pth"]) for a in audio.values()), n
    assert len(set(codes["pth"][0].tolist())) > 1  # not a degenerate constant code
    # transformers reads its own saved folder to the same codes (a multiple of the hop: no padding differences)
    from transformers import HiggsAudioV2TokenizerModel
    ref = HiggsAudioV2TokenizerModel.from_pretrained(root / "hf").eval()
    x = clip(960 * 6, seed=1)
    with torch.no_grad():
        expect = ref.encode(x[None, None], return_dict=False)[0]
    assert torch.equal(toks["hf"].encode(x), expect)


def test_convert_accepts_every_layout_and_keeps_the_identity(layouts, tiny, tmp_path):
    root, _ = layouts
    ident = at.load(root / "pth").identity
    for name in ("hf", "v3"):
        assert at.convert_main([str(root / name), str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / name / "config.json").read_text())["n_q"] == 8  # the original layout's form
        assert at.load(tmp_path / name).identity == ident
    assert at.convert_main([str(root / "hf"), str(root / "hf")]) == 2  # never over its own source


def test_name_table_gives_transformers_names(tiny):
    from transformers import HiggsAudioV2TokenizerModel
    cfg = at.AudioTokenizerConfig.from_json_dict(u.TINY)
    with torch.device("meta"):
        ours = list(at.HiggsAudioTokenizerModel(cfg).state_dict())
        theirs = {re.sub(r"\.parametrizations\.weight\.original[01]$", ".weight", k)  # HuBERT's pos conv, folded
                  for k in HiggsAudioV2TokenizerModel(u.transformers_config()).state_dict()}
    training = {k for k in theirs if any(re.fullmatch(p, k) for p in tf.TRANSFORMERS_TRAINING_ONLY)}
    assert {k.split(".")[0] for k in training} == {"fc1", "decoder_semantic", "quantizer"}
    mapped = {tf.transformers_name(k) for k in ours}
    assert len(mapped) == len(ours) and mapped == theirs - training


def released_folder(folder: Path, **changes) -> Path:
    """config.json as transformers writes the released tokenizer's (the conversion script's DacConfig, the
    hub's target_bandwidths), with `changes` ({'sub.field': value}); no weights: refusals come first."""
    from transformers import DacConfig, HiggsAudioV2TokenizerConfig
    ratios = [8, 5, 4, 2, 3]
    HiggsAudioV2TokenizerConfig(
        acoustic_model_config=DacConfig(encoder_hidden_size=64, downsampling_ratios=ratios, decoder_hidden_size=1024,
                                        upsampling_ratios=ratios, hidden_size=256),
        target_bandwidths=[0.5, 1, 1.5, 2]).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        *subs, field = key.split(".")
        target = raw
        for s in subs:
            target = target[s]
        target[field] = value
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_transformers_config_other_than_the_release_is_refused_by_field(tmp_path):
    raw = json.loads((released_folder(tmp_path / "ok") / "config.json").read_text())
    released = at.AudioTokenizerConfig.from_json_dict(tf.transformers_config(raw, "config.json"))
    assert released == at.AudioTokenizerConfig()  # the defaults: the released config.json + official widths
    for changes, message in (
            ({"acoustic_model_config.upsampling_ratios": [8, 5, 4, 3, 2]},
             r"acoustic_model_config\.upsampling_ratios=\[8, 5, 4, 3, 2\] \(released: \[8, 5, 4, 2, 3\]\)"),
            ({"semantic_model_config.hidden_size": 1024, "semantic_model_config.num_hidden_layers": 24},
             r"semantic_model_config\.hidden_size=1024 \(released: 768\); semantic_model_config\.num_hidden_layers=24"),
            ({"target_bandwidths": [0.5, 1, 1.5, 2, 4]},  # transformers' class default
             r"target_bandwidths=\[0\.5, 1, 1\.5, 2, 4\] gives 16 quantizers"),
            ({"semantic_model_config.feat_extract_norm": "layer", "mystery": 1},
             r"mystery is not a field of the released config; semantic_model_config\.feat_extract_norm=\"layer\"")):
        folder = released_folder(tmp_path / str(len(message)), **changes)
        with pytest.raises(at.AudioTokenizerError, match=r"config\.json: not the released Higgs Audio v2 tokenizer "
                                                          r"architecture \(the only one implemented\): .*" + message):
            at.load(folder)


def test_the_released_config_as_sglang_omni_ships_it_is_the_released_architecture():
    """sglang-omni 0.1.9 ships bosonai/higgs-audio-v2-tokenizer's config.json byte for byte (audio_codec.py
    `_BUNDLED_CODEC_CONFIG_PATH`): it passes the check, gives the defaults, and RELEASED restates it."""
    from tests.v3_oracle import wheel_dir
    path = wheel_dir() / "configs" / "higgs_audio_v2_tokenizer.json"
    ours = tf.transformers_config(json.loads(path.read_text()), path)
    assert ours == tf.transformers_config(tf.RELEASED, "RELEASED")  # also the v3 codec's config
    assert at.AudioTokenizerConfig.from_json_dict(ours) == at.AudioTokenizerConfig()


def test_v3_folder_without_the_codec_is_named_as_such(layouts, tmp_path):
    root, state = layouts
    u.write_v3(tmp_path / "v3", state, tf.V3_PREFIX, codec=False)
    with pytest.raises(at.AudioTokenizerError, match=r"model\.safetensors\.index\.json: no tensor under "
                                                      r"'tied\.embedding\.modality_embeddings\.0\.model\.', where a "
                                                      r"Higgs Audio v3 checkpoint keeps its audio tokenizer.*"
                                                      r"model_type 'higgs_multimodal_qwen3'"):
        at.load(tmp_path / "v3")


def test_missing_and_unexpected_tensors_are_named_as_the_file_names_them(layouts, tiny, tmp_path):
    from safetensors.torch import save_file
    root, state = layouts
    mapped = u.to_transformers(state, fold="official")
    del mapped["fc.bias"]
    mapped["extra.thing"] = torch.zeros(1)
    mapped["fc2.weight"] = torch.zeros(3, 3)
    for name, prefix, config in (("hf", "", u.transformers_config().to_dict()),
                                 ("v3", tf.V3_PREFIX, {"model_type": "higgs_multimodal_qwen3"})):
        (tmp_path / name).mkdir()
        save_file({prefix + k: v.contiguous() for k, v in mapped.items()}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(at.AudioTokenizerError) as e:
            at.load(tmp_path / name)
        assert (f"model.safetensors: does not match the tokenizer config; missing (1): {prefix}fc.bias; "
                f"unexpected (1): {prefix}extra.thing; wrong shape (1): {prefix}fc2.weight (3, 3) (expected (16, 48))"
                in str(e.value)), str(e.value)
