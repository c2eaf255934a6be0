"""Higgs Audio v3 export: the merged folder is in the released layout, computes the adapted model, and the serving
code (tests/v3_oracle.py: the wheel's mapper and config + transformers' Qwen3Model) loads it and computes the same."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from higgs_min import lora
from higgs_min.export.merge import export_rebuilt, main, merge_into_weights
from higgs_min.v3.config import V3Config
from higgs_min.v3.model import HiggsV3Model
from higgs_min.v3.weights import build_v3
from higgs_min.weights import weight_files
from tests import v3_oracle as oracle

W_AUDIO = "tied.embedding.modality_embeddings.0.embedding.weight"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapt(model, tmp_path, seed=1):
    """LoRA on every linear with random B (a non-trivial update), saved as a bare adapter folder."""
    lora.apply_lora(model, TARGETS, r=2, alpha=4.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(0.2 * torch.randn(m.lora_B.weight.shape, generator=g))
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(lora.adapter_state_dict(model), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(lora.adapter_config(model, TARGETS, 0.0, "base")))
    return folder


def sample_inputs(L=14):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 59, (1, L), generator=g)
    codes = torch.randint(0, 1026, (1, L, 8), generator=g)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, 4:10] = True
    return ids, codes, mask


def tensors_of(folder):
    out = {}
    for name, file in weight_files(folder)[0].items():
        with safe_open(str(file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_merged_release_keeps_the_layout_and_serves_the_adapted_model(tmp_path):
    base = tmp_path / "release"
    oracle.write_released(base, seed=2, shards=2)
    model = build_v3(base)
    adapter = adapt(model, tmp_path)
    trained = {W_AUDIO: model.audio_embedding.weight.detach() + 0.05}  # as --train-audio-embedding would leave it
    with torch.no_grad():
        model.audio_embedding.weight += 0.05
    out = merge_into_weights(adapter, base, tmp_path / "merged", trained=trained)

    before, after = tensors_of(base), tensors_of(out)
    assert sorted(after) == sorted(before)  # the released names, each tied matrix once, no head keys
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())  # same shards + index
    assert weight_files(out)[0].keys() == weight_files(base)[0].keys()
    for name in before:
        changed = not torch.equal(after[name], before[name])
        lora_weight = name.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS
        assert changed == (lora_weight or name == W_AUDIO), name  # the codec's and the norms' tensors unchanged
    assert (out / "config.json").read_text() == (base / "config.json").read_text()

    ids, codes, mask = sample_inputs()
    merged = build_v3(out).eval()
    theirs = oracle.OracleTTS(out).eval()
    with torch.no_grad():
        want = model.eval().audio_logits(model(ids, None, codes, mask)[0])
        torch.testing.assert_close(merged.audio_logits(merged(ids, None, codes, mask)[0]), want,
                                   rtol=0, atol=1e-4)
        emb = theirs.backbone.embed_tokens(ids)
        emb[mask] = theirs.embed(codes[mask])
        torch.testing.assert_close(theirs.audio_logits(theirs.hidden(emb)[0]), want, rtol=0, atol=1e-4)


def test_preset_run_exports_a_release_the_serving_code_reads(tmp_path):
    """A run on the v3-tiny preset: its seeded base rebuilt, merged, written with V3Config.released_config(); the
    wheel's HiggsMultimodalQwen3Config reads that config and its mapper loads every tensor."""
    oracle.tiny_tokenizer_json(tmp_path / "tokenizer.json", 64)
    torch.manual_seed(4)
    model = HiggsV3Model(V3Config.from_preset("v3-tiny"))
    adapter = adapt(model, tmp_path)
    (adapter / "trainer_state.json").write_text(json.dumps({"config": {
        "seed": 4, "preset": "v3-tiny", "tokenizer": str(tmp_path / "tokenizer.json"), "base_weights": None}}))
    out = export_rebuilt(adapter, tmp_path / "merged")
    assert V3Config.from_pretrained_config(out) == model.config
    ids, codes, mask = sample_inputs()
    theirs = oracle.OracleTTS(out).eval()
    with torch.no_grad():
        want = model.eval().audio_logits(model(ids, None, codes, mask)[0])
        emb = theirs.backbone.embed_tokens(ids)
        emb[mask] = theirs.embed(codes[mask])
        torch.testing.assert_close(theirs.audio_logits(theirs.hidden(emb)[0]), want, rtol=0, atol=1e-4)
        merged = build_v3(out)
        torch.testing.assert_close(merged.audio_logits(merged(ids, None, codes, mask)[0]), want, rtol=0, atol=1e-4)


def test_cli_merges_and_refuses_transformers_format(tmp_path, capsys):
    base = tmp_path / "release"
    oracle.write_released(base, seed=2)
    adapter = adapt(build_v3(base), tmp_path)
    assert main(["--adapter", str(adapter), "--base-weights", str(base), "--out", str(tmp_path / "m")]) == 0
    assert V3Config.from_pretrained_config(tmp_path / "m") == V3Config.from_pretrained_config(base)
    assert main(["--format", "transformers", str(adapter), "--base-weights", str(base),
                 "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "transformers has no Higgs Audio v3 model" in err and not (tmp_path / "hf").exists()


def test_a_trained_tensor_of_the_wrong_shape_is_refused(tmp_path):
    base = tmp_path / "release"
    oracle.write_released(base, seed=2)
    adapter = adapt(build_v3(base), tmp_path)
    with pytest.raises(ValueError, match="trained tensor"):
        merge_into_weights(adapter, base, tmp_path / "m", trained={W_AUDIO: torch.zeros(3, 3)})
    assert not (tmp_path / "m").exists()


def test_trained_tensors_beside_the_adapter_are_exported_and_adapter_only(tmp_path):
    """A run with --train-audio-embedding leaves the fused matrix beside the adapter (lora.TRAINED_TENSORS): the merged
    export writes it (no argument needed), and --adapter-only copies the adapter with it; generating from the base
    + that adapter equals generating from the merged folder."""
    import numpy as np

    from higgs_min.generate.cli import main as generate

    base = tmp_path / "release"
    oracle.write_released(base, seed=2)
    model = build_v3(base)
    adapter = adapt(model, tmp_path)
    with torch.no_grad():
        model.audio_embedding.weight.add_(0.05 * torch.randn(model.audio_embedding.weight.shape))
    save_file({W_AUDIO: model.audio_embedding.weight.detach().clone()}, str(adapter / lora.TRAINED_TENSORS))
    assert main(["--adapter", str(adapter), "--base-weights", str(base), "--out", str(tmp_path / "m")]) == 0
    assert torch.equal(tensors_of(tmp_path / "m")[W_AUDIO], model.audio_embedding.weight)
    assert main(["--adapter-only", str(adapter), "--out", str(tmp_path / "a")]) == 0
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                            lora.TRAINED_TENSORS}
    common = ["--text", "w1 w2", "--temperature", "0", "--max-new-tokens", "12"]
    assert generate(["--base-weights", str(tmp_path / "m"), *common, "--codes-out", str(tmp_path / "m.npy")]) == 0
    assert generate(["--base-weights", str(base), "--adapter", str(tmp_path / "a"), *common,
                     "--codes-out", str(tmp_path / "a.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.load(tmp_path / "a.npy"))
