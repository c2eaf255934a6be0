"""A tiny seeded random Higgs audio tokenizer, written the way the released files are laid out.

The released model.pth is a state dict of the official HiggsAudioTokenizer: DAC convs weight-normed
as `weight_g`/`weight_v` (torch.nn.utils.weight_norm, dim 0), HuBERT's positional conv as
`parametrizations.weight.original0/1` (dim 2), plus training-only tensors. `released_state` builds
exactly that layout from random weights; `folded` is what the loader must end up with.
"""

from __future__ import annotations

import json
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


def to_transformers(state: dict) -> dict:
    """Released-layout tensors -> transformers' HiggsAudioV2TokenizerModel names (the mapping of its
    conversion script, re-derived), weight norm folded as g * v / |v|; training-only tensors dropped."""
    import re
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
        if k.endswith(".weight_g"):  # g * v / |v| over all dims but 0, the textbook weight norm
            vv = state[k[:-1] + "v"]
            k, v = k[:-2], v * vv / vv.flatten(1).norm(dim=1)[:, None, None]
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        mapped[k] = v
    return mapped
