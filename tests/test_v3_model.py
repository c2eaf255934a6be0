"""Higgs Audio v3: the model and its weights against the serving code (tests/v3_oracle.py), tiny seeded weights.

Independent formulation: the sglang-omni wheel's modeling.py / weight_loader.py / hf_config.py with
transformers' Qwen3Model as the backbone. Ours shares nothing with it but the file on disk.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from higgs_min.model import KVCache
from higgs_min.v3.config import V3Config
from higgs_min.v3.model import HiggsV3Model, describe
from higgs_min.v3.weights import WeightsError, build_v3
from tests import v3_oracle as oracle

TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3") / "release"
    tensors = oracle.write_released(folder, seed=0, shards=2)
    return folder, tensors


def prompt_with_reference(folder, T_ref: int = 5, seed: int = 1):
    """The wheel's prompt (text_tokenizer.build_prompt) with a reference clip: ids with -100 placeholders and the
    delayed reference rows (utils.apply_delay_pattern, restated in the oracle), plus ours for the same."""
    from transformers import PreTrainedTokenizerFast

    w = oracle.load_wheel()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    adapter = w.text_tokenizer.HiggsTokenizerAdapter(tok)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (T_ref, 8), generator=g)
    rows = oracle.apply_delay_pattern(codes)
    ids = adapter.build_prompt("w3 w7 w1 w9", num_ref_tokens=rows.shape[0], reference_text="w2 w5 w11")
    return ids, rows


def ours_inputs(ids: list[int], rows: torch.Tensor):
    """Our layout of the same prompt: placeholder positions are audio positions holding the delayed rows."""
    t = torch.tensor(ids)
    mask = t == -100
    codes = torch.zeros(len(ids), 8, dtype=torch.long)
    codes[mask] = rows
    return torch.where(mask, 0, t)[None], codes[None], mask[None]


def test_config_reads_released_and_rope_null(tmp_path, released):
    folder, _ = released
    cfg = V3Config.from_pretrained_config(folder)
    assert cfg.rope_theta == 1e6 and cfg.audio_num_classes == 1026 and cfg.head_dim == 8
    # the wheel's config realises the same backbone (its rope_theta null -> 1e6 patch included)
    text = oracle.load_wheel().hf_config.HiggsMultimodalQwen3Config(
        **json.loads((folder / "config.json").read_text())).get_text_config()
    assert text.rope_parameters["rope_theta"] == cfg.rope_theta and text.head_dim == cfg.head_dim
    # what we write for an export reads back as the same config
    again = tmp_path / "config.json"
    again.write_text(json.dumps(cfg.released_config()))
    assert V3Config.from_pretrained_config(again) == cfg


def test_config_refuses_what_is_not_implemented(tmp_path, released):
    folder, _ = released
    raw = json.loads((folder / "config.json").read_text())
    raw["audio_encoder_config"]["encoder_type"] = "whisper"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="encoder_type='whisper' is not supported"):
        V3Config.from_pretrained_config(tmp_path)


def test_keys_map_one_to_one_with_the_wheel_mapper(released):
    """Every released key: the wheel's DiscreteWeightMapper (with model.py's backbone map) and our state dict agree
    on which tensor it is; the codec's keys are skipped by both."""
    folder, tensors = released
    w = oracle.load_wheel()
    mapper = w.weight_loader.DiscreteWeightMapper(text_prefix_map=oracle.BACKBONE_PREFIX_MAP, tie_modality=True)
    ours = HiggsV3Model(V3Config.from_pretrained_config(folder)).state_dict()
    theirs = oracle.OracleTTS(folder)
    their_params = {"multimodal_embedding.modality_embedding_0.weight": theirs.embed.weight}
    their_params.update({"backbone.model." + n: p for n, p in theirs.backbone.named_parameters()})
    mapped = {}
    for name in tensors:
        m = mapper.map(name)
        if m is None:
            assert name.startswith(oracle.CODEC_PREFIX)
            assert name not in ours
            continue
        assert name in ours, name
        assert m in their_params, m
        assert their_params[m].shape == ours[name].shape
        mapped[m] = name
    assert len(mapped) == len(ours) == len(their_params)


def test_logits_equal_the_oracle_teacher_forced_and_cached(released):
    folder, _ = released
    theirs = oracle.OracleTTS(folder).eval()
    ours = build_v3(folder).eval()
    ids, rows = prompt_with_reference(folder)
    tgt = oracle.apply_delay_pattern(torch.randint(0, 1024, (9, 8), generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        # teacher-forced: the prompt then the target's delayed rows as audio positions, one forward
        emb = torch.cat([theirs.prefill_embeds(ids, rows), theirs.embed(tgt)[None]], 1)
        h_ref = theirs.hidden(emb)[0]
        x_ids, x_codes, x_mask = ours_inputs(ids, rows)
        L = x_ids.shape[1]
        x_ids = torch.cat([x_ids, torch.zeros(1, len(tgt), dtype=torch.long)], 1)
        x_codes = torch.cat([x_codes, tgt[None]], 1)
        x_mask = torch.cat([x_mask, torch.ones(1, len(tgt), dtype=torch.bool)], 1)
        h = ours(x_ids, None, x_codes, x_mask)[0]
        torch.testing.assert_close(ours.audio_logits(h), theirs.audio_logits(h_ref).view(-1, 8, 1026), **TOL)
        torch.testing.assert_close(ours.text_logits(h), theirs.text_logits(h_ref), **TOL)
        # incremental: the prompt through the cache, then one row at a time
        cache = KVCache(ours.config, x_ids.shape[1])
        hs = [ours(x_ids[:, :L], None, x_codes[:, :L], x_mask[:, :L], cache=cache)[0]]
        for i in range(L, x_ids.shape[1]):
            hs.append(ours(x_ids[:, i:i + 1], None, x_codes[:, i:i + 1], x_mask[:, i:i + 1], cache=cache)[0])
        torch.testing.assert_close(ours.audio_logits(torch.cat(hs)), theirs.audio_logits(h_ref), **TOL)


def test_padding_batch_equals_single(released):
    folder, _ = released
    ours = build_v3(folder).eval()
    ids, rows = prompt_with_reference(folder)
    x_ids, x_codes, x_mask = ours_inputs(ids, rows)
    L = x_ids.shape[1]
    pad = 3
    b_ids = torch.cat([x_ids, torch.cat([x_ids[:, :L - pad], torch.zeros(1, pad, dtype=torch.long)], 1)])
    b_codes = torch.cat([x_codes, x_codes])
    b_mask = torch.cat([x_mask, x_mask])
    attn = torch.ones(2, L, dtype=torch.long)
    attn[1, L - pad:] = 0
    with torch.no_grad():
        h = ours(b_ids, attn, b_codes, b_mask)
        one = ours(x_ids[:, :L - pad], None, x_codes[:, :L - pad], x_mask[:, :L - pad])
    torch.testing.assert_close(h[1, :L - pad], one[0], **TOL)


def test_strict_loading_names_the_file(tmp_path, released):
    folder, tensors = released
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    t = dict(tensors)
    t.pop("body.norm.weight")
    t["body.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    t["tied.head.modality_heads.0.weight"] = torch.zeros(2, 2)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        build_v3(bad)
    msg = str(e.value)
    assert "model.safetensors" in msg and "body.norm.weight" in msg and "up_proj" in msg
    assert "tied.head.modality_heads.0.weight" in msg and "untied" in msg


def test_codec_tensors_are_not_read(released, monkeypatch):
    """The codec's tensors are skipped by name: reading one is an error here."""
    from safetensors import safe_open

    folder, _ = released
    real = safe_open

    class Guard:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            assert not name.startswith(oracle.CODEC_PREFIX), name
            return self.f.get_tensor(name)

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", Guard)
    model = build_v3(folder)
    assert model.body.norm.weight.shape == (32,)


def test_released_shape_on_meta():
    with torch.device("meta"):
        model = HiggsV3Model(V3Config.from_preset("v3-4b"))
    n = sum(p.numel() for p in model.parameters())
    # Qwen3-4B with tied embeddings (4,022,468,096) + the fused audio matrix 8 * 1026 * 2560
    assert n == 4_022_468_096 + 8 * 1026 * 2560
    assert model.audio_logits(torch.empty(1, 2560, device="meta")).shape == (1, 8, 1026)
    assert "v3-4b: 4,043,480,576 parameters" in describe("v3-4b")


def test_activation_checkpointing_gives_the_same_grads(released):
    """LoRA + the fused matrix trainable: recomputing each layer in backward changes nothing (bitwise)."""
    from higgs_min import lora

    folder, _ = released
    ids, rows = prompt_with_reference(folder)
    x_ids, x_codes, x_mask = ours_inputs(ids, rows)
    grads = []
    for ckpt in (False, True):
        model = build_v3(folder)
        torch.manual_seed(0)  # the same LoRA A init both times
        lora.apply_lora(model, ["q_proj", "down_proj"], r=2, alpha=4.0)
        model.audio_embedding.weight.requires_grad_(True)
        with torch.no_grad():
            for m in lora.lora_layers(model).values():
                m.lora_B.weight.fill_(0.01)
        model.activation_checkpointing = ckpt
        h = model(x_ids, None, x_codes, x_mask)[0]
        model.audio_logits(h).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert len(grads[0]) == 2 * 2 * 2 + 1
    for a, b in zip(*grads):
        assert torch.equal(a, b)
