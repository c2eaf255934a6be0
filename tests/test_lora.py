import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from higgs_min import lora
from higgs_min.export.merge import merge_into_weights
from higgs_min.lora import (LoRALinear, adapter_config, adapter_state_dict, apply_lora, load_adapter,
                            lora_layers, merge_lora, unmerge_lora)
from higgs_min.model import HiggsAudioModel
from higgs_min.weights import load_pretrained
from tests.conftest import random_batch


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_unchanged_at_init(micro_model):
    batch = random_batch(micro_model.config)
    before = micro_model(*batch)
    apply_lora(micro_model, r=4, alpha=8)
    assert torch.equal(micro_model(*batch), before)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_w_plus_scaled_ba(rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    W = base.weight.detach().clone()
    lora = LoRALinear(base, r=4, alpha=16, rslora=rslora)
    with torch.no_grad():
        lora.lora_B.weight.normal_(0, 0.05)
    scale = 16 / 2 if rslora else 16 / 4
    assert lora.scale == scale
    x = torch.randn(3, 5, 24)
    A, B = lora.lora_A.weight.double(), lora.lora_B.weight.double()
    want = x.double() @ (W.double() + scale * B @ A).T  # independent formulation, in fp64
    torch.testing.assert_close(lora(x).double(), want, rtol=0, atol=1e-6)


def test_default_targets_cover_attention_mlp_and_audio_mlp(micro_model):
    paths = apply_lora(micro_model, r=2, alpha=4)
    for p in ("layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.down_proj",
              "layers.0.audio_mlp.gate_proj", "layers.1.mlp.up_proj", "layers.2.audio_mlp.up_proj"):
        assert p in paths
    assert "layers.1.audio_mlp.up_proj" not in paths  # layer 1 has no DualFFN in micro_config
    assert not any("lm_head" in p for p in paths)
    names = [n for n, p in micro_model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_unknown_target_is_named(micro_model):
    with pytest.raises(ValueError, match=r"\['qq_proj'\]"):
        apply_lora(micro_model, targets=["q_proj", "qq_proj"])


def test_merge_unmerge_round_trip(micro_model):
    apply_lora(micro_model, r=4, alpha=8)
    _randomize_lora(micro_model)
    batch = random_batch(micro_model.config)
    base_w = {n: m.weight.detach().clone() for n, m in lora_layers(micro_model).items()}
    lora_out = micro_model(*batch)
    merge_lora(micro_model)
    merged_w = {n: m.weight.detach().clone() for n, m in lora_layers(micro_model).items()}
    torch.testing.assert_close(micro_model(*batch), lora_out, rtol=1e-5, atol=1e-5)
    merge_lora(micro_model)  # twice: nothing changes
    assert all(torch.equal(m.weight, merged_w[n]) for n, m in lora_layers(micro_model).items())
    unmerge_lora(micro_model)
    assert all(torch.equal(m.weight, base_w[n]) for n, m in lora_layers(micro_model).items())
    assert torch.equal(micro_model(*batch), lora_out)


def test_merge_refuses_non_finite(micro_model):
    apply_lora(micro_model, r=2, alpha=4)
    layer = micro_model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj"):
        merge_lora(micro_model)


def test_only_adapters_get_gradients_and_move(micro_model):
    apply_lora(micro_model, r=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in micro_model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in micro_model.parameters() if p.requires_grad], lr=1e-2)
    ids, attn, codes, amask = random_batch(micro_model.config)
    h = micro_model(ids, attn, codes, amask)
    loss = micro_model.text_logits(h[:, -1]).logsumexp(-1).mean() + micro_model.audio_logits(h[amask]).mean()
    loss.backward()
    for n, p in micro_model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(p.grad.abs().sum() > 0 for n, p in micro_model.named_parameters() if "lora_B" in n)
    opt.step()
    for n, p in micro_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def _write_adapter(model, folder, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(model, list(targets), 0.0, "micro")))


def test_adapter_files_round_trip_and_peft_layout(micro_model, tmp_path):
    cfg = micro_model.config
    base_sd = {k: v.clone() for k, v in micro_model.state_dict().items()}
    apply_lora(micro_model, r=4, alpha=8)
    _randomize_lora(micro_model)
    _write_adapter(micro_model, tmp_path / "ad")
    keys = adapter_state_dict(micro_model)
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert keys["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["bias"] == "none" and conf["use_rslora"] is False

    fresh = HiggsAudioModel(cfg)
    fresh.load_state_dict(base_sd)
    load_adapter(fresh, tmp_path / "ad")
    batch = random_batch(cfg)
    assert torch.equal(fresh(*batch), micro_model(*batch))


def test_adapter_with_unknown_key_or_wrong_shape_fails(micro_model, tmp_path):
    apply_lora(micro_model, r=4, alpha=8)
    _write_adapter(micro_model, tmp_path / "ad")
    sd = adapter_state_dict(micro_model)
    sd["base_model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(sd, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.9\.self_attn\.q_proj"):
        load_adapter(micro_model, tmp_path / "ad")
    sd = adapter_state_dict(micro_model)
    sd["base_model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(48, 3)
    save_file(sd, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"up_proj\.lora_B\.weight' has shape \(48, 3\), model expects \(48, 4\)"):
        load_adapter(micro_model, tmp_path / "ad")


def test_export_merged_weights_load_and_match(micro_model, tmp_path):
    from tests.test_model import _save_sharded
    cfg = micro_model.config
    (tmp_path / "base").mkdir()
    _save_sharded(micro_model, tmp_path / "base", n_shards=2)
    apply_lora(micro_model, r=4, alpha=8, rslora=True)
    _randomize_lora(micro_model)
    _write_adapter(micro_model, tmp_path / "ad")
    out = merge_into_weights(tmp_path / "ad", tmp_path / "base", tmp_path / "merged")
    assert (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "base").iterdir())
    merged = load_pretrained(HiggsAudioModel(cfg), out)
    batch = random_batch(cfg)
    torch.testing.assert_close(merged(*batch), micro_model(*batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError):
        merge_into_weights(tmp_path / "ad", tmp_path / "base", tmp_path / "merged")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_in_place_equals_merged_weight_and_unmerges_bitwise(monkeypatch, dtype):
    """#27: the copy-free merge (row blocks, in place) gives merged_weight's tensor bit for bit, and unmerge gives
    W back bit for bit, -0.0, subnormals and a NaN included; the undo record is a small part of W."""
    monkeypatch.setattr(lora, "MERGE_BLOCK", 3 * 40)  # 3 rows per block: 7 blocks and a partial one
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(22, 40, generator=g) * 0.02).to(dtype)
    w[0, :4] = torch.tensor([-0.0, 0.0, 1e-40, float("nan")]).to(dtype)
    a, b = torch.randn(4, 40, generator=g) * 0.02, torch.randn(22, 4, generator=g) * 0.02  # |Δ| ~ |W| / 10
    before = w.clone()
    expected = lora.merged_weight(w, a, b, 2.0, "x")
    undo = lora.merge_in_place(w, a, b, 2.0, "x")
    assert torch.equal(lora._bits(w), lora._bits(expected))
    assert not torch.equal(lora._bits(w), lora._bits(before))
    assert undo[0].numel() < w.numel() // 4
    lora.unmerge_in_place(w, a, b, 2.0, undo)
    assert torch.equal(lora._bits(w), lora._bits(before))


def test_refused_merge_leaves_every_weight_as_it_was(micro_model, monkeypatch):
    """A non-finite update in a later row block of a later layer: that layer and the layers merged before it are
    restored bit for bit (merge_in_place rolls back its blocks, merge_lora its layers)."""
    monkeypatch.setattr(lora, "MERGE_BLOCK", 64)
    apply_lora(micro_model, r=2, alpha=4)
    _randomize_lora(micro_model)
    layer = micro_model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B.weight[-1, 0] = float("inf")
    before = {n: m.weight.detach().clone() for n, m in lora_layers(micro_model).items()}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj"):
        merge_lora(micro_model)
    assert not any(m.merged for m in lora_layers(micro_model).values())
    assert all(torch.equal(m.weight, before[n]) for n, m in lora_layers(micro_model).items())
