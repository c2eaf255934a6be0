import json

import pytest
import torch
from safetensors.torch import save_file

from higgs_min.config import ModelConfig
from higgs_min.model import HiggsAudioModel, rope_inv_freq
from higgs_min.weights import load_pretrained
from tests.conftest import random_batch


def test_released_shape_on_meta_device():
    with torch.device("meta"):
        model = HiggsAudioModel(ModelConfig.from_preset("higgs-v2-3b"))
    sd = model.state_dict()
    assert len(sd) == 397
    assert sum(t.numel() for t in sd.values()) == 5_771_283_456
    assert sd["audio_decoder_proj.audio_lm_head.weight"].shape == (8 * 1026, 3072)
    assert sd["audio_codebook_embeddings.weight"].shape == (8 * 1026, 3072)
    assert sd["layers.27.audio_mlp.down_proj.weight"].shape == (3072, 8192)
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (1024, 3072)


def test_from_pretrained_config_reads_released_format(tmp_path):
    # The released config.json layout: Llama fields in text_config, audio fields on top.
    raw = {
        "audio_num_codebooks": 8, "audio_codebook_size": 1024, "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025, "audio_dual_ffn_layers": list(range(28)),
        "audio_ffn_hidden_size": 3072, "audio_ffn_intermediate_size": 8192, "use_delay_pattern": True,
        "audio_adapter_type": "dual_ffn_fast_forward",
        "text_config": {
            "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
            "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_pretrained_config(tmp_path) == ModelConfig.from_preset("higgs-v2-3b")
    del raw["text_config"]["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="text_config.num_hidden_layers"):
        ModelConfig.from_pretrained_config(tmp_path)


def test_llama3_rope_scaling_matches_its_definition():
    cfg = ModelConfig.from_preset("higgs-v2-3b")
    got = rope_inv_freq(cfg).double()
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    import math
    for i, f in enumerate(base.tolist()):
        wl = 2 * math.pi / f
        if wl < 8192 / 4:
            want = f
        elif wl > 8192 / 1:
            want = f / 32
        else:
            s = (8192 / wl - 1) / (4 - 1)
            want = (1 - s) * f / 32 + s * f
        assert got[i].item() == pytest.approx(want, rel=1e-6)


def test_forward_backward_shapes(micro_model):
    cfg = micro_model.config
    ids, attn, codes, amask = random_batch(cfg)
    h = micro_model(ids, attn, codes, amask)
    assert h.shape == (2, 24, cfg.hidden_size)
    rows = h[amask]
    audio = micro_model.audio_logits(rows)
    assert audio.shape == (rows.shape[0], cfg.audio_num_codebooks, cfg.audio_codebook_size + 2)
    text = micro_model.text_logits(h[:, :3].reshape(-1, cfg.hidden_size))
    assert text.shape == (6, cfg.vocab_size)
    (audio.float().square().mean() + text.square().mean()).backward()
    assert all(p.grad is not None for p in micro_model.parameters())


def test_causality(micro_model):
    cfg = micro_model.config
    ids, attn, codes, amask = random_batch(cfg, B=1, pad=False)
    h1 = micro_model(ids, attn, codes, amask)
    ids2, codes2 = ids.clone(), codes.clone()
    t = 10  # inside the audio span
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 1) % cfg.vocab_size
    codes2[:, t + 1:] = (codes2[:, t + 1:] + 1) % cfg.audio_num_classes
    h2 = micro_model(ids2, attn, codes2, amask)
    assert torch.equal(h1[:, : t + 1], h2[:, : t + 1])
    assert not torch.allclose(h1[:, t + 1:], h2[:, t + 1:])


def test_padding_does_not_change_real_positions(micro_model):
    cfg = micro_model.config
    ids, attn, codes, amask = random_batch(cfg, B=1, L=20, pad=False)
    h = micro_model(ids, attn, codes, amask)
    pad_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    pad_codes = torch.cat([codes, torch.zeros(1, 6, cfg.audio_num_codebooks, dtype=torch.long)], 1)
    pad_amask = torch.cat([amask, torch.zeros(1, 6, dtype=torch.bool)], 1)
    pad_attn = torch.cat([attn, torch.zeros(1, 6, dtype=torch.long)], 1)
    hp = micro_model(pad_ids, pad_attn, pad_codes, pad_amask)
    torch.testing.assert_close(hp[:, :20], h, rtol=1e-5, atol=1e-5)


def test_text_only_sequence_ignores_audio_mlp(micro_model):
    cfg = micro_model.config
    ids, attn, _, _ = random_batch(cfg)
    h1 = micro_model(ids, attn)
    with torch.no_grad():
        for layer in micro_model.layers:
            if layer.dual_ffn:
                for p in layer.audio_mlp.parameters():
                    p.normal_(0, 5.0)
                layer.audio_input_layernorm.weight.fill_(7.0)
    h2 = micro_model(ids, attn)
    assert torch.equal(h1, h2)


def test_audio_rows_use_the_audio_path(micro_model):
    cfg = micro_model.config
    ids, attn, codes, amask = random_batch(cfg)
    h1 = micro_model(ids, attn, codes, amask)
    with torch.no_grad():
        micro_model.layers[0].audio_mlp.down_proj.weight.mul_(3.0)
    h2 = micro_model(ids, attn, codes, amask)
    first_audio = amask[0].nonzero()[0].item()
    assert torch.equal(h1[0, :first_audio], h2[0, :first_audio])
    assert not torch.allclose(h1[0, first_audio], h2[0, first_audio])


def test_codebook_embeddings_are_offset_and_summed(micro_model):
    cfg = micro_model.config
    codes = torch.tensor([[[3, 0, 17, 5]]])  # (1, 1, K)
    x = micro_model.embed(torch.tensor([[1]]), codes, torch.tensor([[True]]))
    E = micro_model.audio_codebook_embeddings.weight
    C2 = cfg.audio_num_classes
    want = E[3] + E[C2 + 0] + E[2 * C2 + 17] + E[3 * C2 + 5]
    torch.testing.assert_close(x[0, 0], want)


def _save_sharded(model, folder, n_shards=3):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[i::n_shards]}
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def test_sharded_save_load_round_trip(micro_model, tmp_path):
    _save_sharded(micro_model, tmp_path)
    cfg = micro_model.config
    with torch.device("meta"):
        fresh = HiggsAudioModel(cfg)
    load_pretrained(fresh, tmp_path)
    ids, attn, codes, amask = random_batch(cfg)
    assert torch.equal(fresh(ids, attn, codes, amask), micro_model(ids, attn, codes, amask))
    bf = load_pretrained(HiggsAudioModel(cfg), tmp_path, dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16


def test_missing_and_misshapen_tensors_are_named(micro_model, tmp_path):
    sd = {k: v.contiguous() for k, v in micro_model.state_dict().items()}
    del sd["layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(HiggsAudioModel(micro_model.config), tmp_path / "a.safetensors")
    sd = {k: v.contiguous() for k, v in micro_model.state_dict().items()}
    sd["norm.weight"] = torch.ones(7)
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"'norm\.weight' has shape \(7,\), model expects \(32,\)"):
        load_pretrained(HiggsAudioModel(micro_model.config), tmp_path / "b.safetensors")
