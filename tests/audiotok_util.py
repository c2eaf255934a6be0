"""A tiny seeded random Higgs audio tokenizer, written the way the released files are laid out.

The released model.pth is a state dict of the official HiggsAudioTokenizer: DAC convs weight-normed
as `weight_g`/`weight_v` (torch.nn.utils.weight_norm, dim 0), HuBERT's positional conv as
`parametrizations.weight.original0/1` (dim 2), plus training-only tensors. `released_state` builds
exactly that layout from random weights; `folded` is what the loader must end up with.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

# Released structure (ratios, 8 codebooks of 1024, HuBERT's 7-conv 320x front end) at tiny widths.
TINY = {"D": 16, "codebook_dim": 8, "ratios": [8, 5, 4, 2, 3], "sample_rate": 24000, "bins": 1024, "n_q": 8,
        "semantic_techer": "hubert_base_general", "n_filters": 32, "target_bandwidths": [0.5, 1, 1.5, 2],
        "encoder_dim": 2, "decoder_dim": 64,
        "hubert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "conv_dim": [16] * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}}


def tiny_model(seed: int = 0, config: dict = TINY):
    """(config dict, HiggsAudioTokenizerModel with seeded random weights, eval)."""
    from higgs_min.audio import tokenizer as at
    cfg = at.AudioTokenizerConfig.from_json_dict(config)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = at.HiggsAudioTokenizerModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):  # Snake: keep alpha positive
                p.copy_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:  # fan-in scaled so activations stay O(1) through the deep stacks
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.copy_(torch.randn(layer._codebook.embed.shape, generator=g))
    return cfg, model


def released_state(model, seed: int = 0) -> dict:
    """The model's tensors in the released model.pth layout (weight norm unfolded, training-only added)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, t in model.state_dict().items():
        base = name[: -len(".weight")]
        if name.endswith(".weight") and t.dim() == 3 and name.startswith(("encoder.", "decoder_2.")):
            norm = t.flatten(1).norm(dim=1)[:, None, None]  # weight_norm(dim=0): g is (out, 1, 1)
            out[base + ".weight_g"] = norm
            out[base + ".weight_v"] = t * (0.5 + torch.rand(t.shape[0], 1, 1, generator=g))  # g * v/|v| = t
        elif name == "semantic_model.encoder.pos_conv_embed.conv.weight":  # weight_norm(dim=2)
            norm = t.transpose(0, 2).flatten(1).norm(dim=1)[None, None, :]
            out[base + ".parametrizations.weight.original0"] = norm
            out[base + ".parametrizations.weight.original1"] = t * 3.0
        else:
            out[name] = t.clone()
    d = model.config.D + model.config.hubert.hidden_size
    out["fc_post1.weight"] = torch.randn(model.config.hubert.hidden_size, d, generator=g)
    out["fc_post1.bias"] = torch.zeros(model.config.hubert.hidden_size)
    out["decoder_semantic.conv1.conv.weight"] = torch.randn(4, 4, 3, generator=g)
    out["semantic_model.masked_spec_embed"] = torch.rand(model.config.hubert.hidden_size, generator=g)
    for i in range(model.config.n_q):
        p = f"quantizer.vq.layers.{i}._codebook."
        out[p + "inited"] = torch.ones(1)
        out[p + "cluster_size"] = torch.rand(model.config.bins, generator=g)
        out[p + "embed_avg"] = torch.randn(model.config.bins, model.config.codebook_dim, generator=g)
    return out


def write_released(folder: Path, seed: int = 0, config: dict = TINY) -> tuple:
    """folder/config.json + folder/model.pth (torch.save of a plain state dict); returns (model, state)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, model = tiny_model(seed, config)
    state = released_state(model, seed)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "model.pth")
    return model, state


def to_transformers(state: dict, fold: str = "textbook") -> dict:
    """Released-layout tensors -> transformers' HiggsAudioV2TokenizerModel names (the mapping of its
    conversion script, re-derived here independently of higgs_min's table); training-only tensors dropped.
    The DAC's weight norm: fold="textbook" g * v / |v| (the conversion script's formula), "official"
    torch._weight_norm (the bits higgs_min's loader computes), "parametrizations" kept unfolded as
    parametrizations.weight.original0/1 (what apply_weight_norm + save_pretrained would write)."""
    names = ["snake1", "conv1", "snake2", "conv2"]
    rules = [
        (r"^encoder\.block\.0\.", "acoustic_encoder.conv1."), (r"^encoder\.block\.6\.", "acoustic_encoder.snake1."),
        (r"^encoder\.block\.7\.", "acoustic_encoder.conv2."),
        (r"^encoder\.block\.(\d)\.block\.([012])\.block\.(\d)\.",
         lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{names[int(m[3])]}."),
        (r"^encoder\.block\.(\d)\.block\.3\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.snake1."),
        (r"^encoder\.block\.(\d)\.block\.4\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.conv1."),
        (r"^decoder_2\.model\.0\.", "acoustic_decoder.conv1."), (r"^decoder_2\.model\.6\.", "acoustic_decoder.snake1."),
        (r"^decoder_2\.model\.7\.", "acoustic_decoder.conv2."),
        (r"^decoder_2\.model\.(\d)\.block\.0\.", lambda m: f"acoustic_decoder.block.{int(m[1]) - 1}.snake1."),
        (r"^decoder_2\.model\.(\d)\.block\.1\.", lambda m: f"acoustic_decoder.block.{int(m[1]) - 1}.conv_t1."),
        (r"^decoder_2\.model\.(\d)\.block\.([234])\.block\.(\d)\.",
         lambda m: f"acoustic_decoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) - 1}.{names[int(m[3])]}."),
        (r"^quantizer\.vq\.layers\.", "quantizer.quantizers."), (r"\._codebook\.", ".codebook."),
        (r"^fc_prior\.", "fc."), (r"^fc_post2\.", "fc2."),
        (r"\.conv\.conv\.", ".conv."), (r"\.conv1\.conv\.", ".conv1."),
    ]
    mapped = {}
    for k, v in state.items():
        if k.endswith(".weight_v") or k.startswith(("fc_post1.", "decoder_semantic.")) or "masked_spec" in k:
            continue
        if k.endswith(".weight_g"):
            vv = state[k[:-1] + "v"]
            if fold == "textbook":  # g * v / |v| over all dims but 0
                k, v = k[:-2], v * vv / vv.flatten(1).norm(dim=1)[:, None, None]
            elif fold == "official":
                k, v = k[:-2], torch._weight_norm(vv, v, 0)
            else:
                mapped[_rename(k[:-9] + ".parametrizations.weight.original1", rules)] = vv
                k = k[:-9] + ".parametrizations.weight.original0"
        mapped[_rename(k, rules)] = v
    return mapped


def _rename(k, rules):
    for pat, rep in rules:
        k = re.sub(pat, rep, k)
    return k


# ---- the same weights in transformers' layouts ----------------------------------------------------

def transformers_config(t: dict = TINY):
    """TINY as a transformers HiggsAudioV2TokenizerConfig, with the released framing and quantizer count."""
    from transformers import HiggsAudioV2TokenizerConfig
    return HiggsAudioV2TokenizerConfig(
        acoustic_model_config=dict(encoder_hidden_size=t["encoder_dim"], downsampling_ratios=t["ratios"],
                                   decoder_hidden_size=t["decoder_dim"], upsampling_ratios=t["ratios"],
                                   hidden_size=t["D"]),
        semantic_model_config=dict(t["hubert"]), codebook_size=t["bins"], codebook_dim=t["codebook_dim"],
        target_bandwidths=[0.5, 1, 1.5, 2])  # 2 kbps / (25 frames/s * 10 bits) = 8 quantizers


def tiny_released(released: dict) -> dict:
    """higgs_min's RELEASED table with TINY's widths: what the tests patch in so that the tiny model
    counts as "the released architecture" (the check itself is tested with the real table)."""
    out = copy.deepcopy(released)
    out["codebook_dim"] = TINY["codebook_dim"]
    out["acoustic_model_config"].update(hidden_size=TINY["D"], encoder_hidden_size=TINY["encoder_dim"],
                                        decoder_hidden_size=TINY["decoder_dim"])
    out["semantic_model_config"].update(TINY["hubert"])
    return out


def write_transformers(folder: Path, state: dict, max_shard_size=None):
    """folder as HiggsAudioV2TokenizerModel.save_pretrained writes it, holding `state`'s weights (the DAC
    folded with torch._weight_norm, HuBERT's positional conv as parametrizations). Returns the model."""
    from transformers import HiggsAudioV2TokenizerModel
    ref = HiggsAudioV2TokenizerModel(transformers_config()).eval()
    missing, unexpected = ref.load_state_dict(to_transformers(state, fold="official"), strict=False)
    missing = [k for k in missing if not k.startswith(("decoder_semantic.", "fc1."))]  # training-only there too
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    ref.save_pretrained(folder, **kw)
    return ref


def write_v3(folder: Path, state: dict, prefix: str, codec: bool = True) -> dict:
    """A v3-style model folder: config.json of the LLM, three shards + index. The codec's tensors (DAC
    weight norm as parametrizations) under `prefix`, split over two shards; fake LLM tensors in all three,
    the first holding only LLM tensors. Returns the LLM's tensors."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    llm = {f"body.layers.{i}.mlp.up_proj.weight": torch.randn(64, 32, generator=g) for i in range(3)}
    llm["tied.embedding.modality_embeddings.0.embedding.weight"] = torch.randn(1026 * 8, 4, generator=g)
    codec_tensors = {prefix + k: v.contiguous() for k, v in to_transformers(state, fold="parametrizations").items()}
    names = sorted(codec_tensors) if codec else []
    shards = [{k: llm[k] for k in list(llm)[:2]},
              {**{k: llm[k] for k in list(llm)[2:]}, **{k: codec_tensors[k] for k in names[: len(names) // 2]}},
              {k: codec_tensors[k] for k in names[len(names) // 2:]}]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(shard or {"body.norm.weight": torch.ones(4)}, str(folder / name))
        weight_map.update({k: name for k in shard or {"body.norm.weight": 0}})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "higgs_multimodal_qwen3", "hidden_size": 2560}))
    return llm
