"""Higgs Audio v3 weights on disk: read a released folder strictly (export/merge.py writes one).

A released folder (bosonai/higgs-audio-v3-tts-4b) holds config.json, tokenizer.json and safetensors (one
model.safetensors, or shards listed by model.safetensors.index.json) whose names are the model's state-dict
names (see model.py) plus the audio codec's tensors under `tied.embedding.modality_embeddings.0.model.*`.
The codec is not part of the LLM (sglang-omni weight_loader.py `DiscreteWeightMapper.map` returns None for it;
audio_codec.py `load_codec_state_dict` reads it separately): it is recognized by name and never read here.

Strict: every LLM tensor of the files is consumed, every model tensor is present with its exact shape; all
mismatches are reported in one error naming the file (the index or the weights file).
"""

from __future__ import annotations

from pathlib import Path

import torch

from higgs_min.weights import weight_files
from higgs_min.v3.config import V3Config
from higgs_min.v3.model import HiggsV3Model

CODEC_PREFIX = "tied.embedding.modality_embeddings.0.model."
# Untied heads: absent from a tied release; named so the error says why they are refused.
UNTIED_HEADS = ("tied.head.text_head.", "tied.head.modality_heads.0.")


class WeightsError(ValueError):
    """The folder's tensors do not match the model (the message names the file and every mismatch)."""


def is_codec(name: str) -> bool:
    return name.startswith(CODEC_PREFIX)


def plan(model: HiggsV3Model, folder: str | Path) -> dict[str, Path]:
    """Model tensor name -> the file holding it, after checking names and shapes (no tensor data read)."""
    from safetensors import safe_open

    name_to_file, index = weight_files(folder)
    where = index or next(iter(set(name_to_file.values())), Path(folder))
    llm = {n: f for n, f in name_to_file.items() if not is_codec(n)}
    params = model.state_dict()
    missing = sorted(set(params) - set(llm))
    unexpected = sorted(set(llm) - set(params))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {missing[:5]}")
    if unexpected:
        why = " (untied heads are not supported: the release ties both)" if any(
            n.startswith(UNTIED_HEADS) for n in unexpected) else ""
        problems.append(f"unexpected {len(unexpected)}: {unexpected[:5]}{why}")
    shapes = []
    for file in sorted(set(llm.values())):
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())
            for name in (n for n, ff in llm.items() if ff == file and n in params):
                if name not in present:
                    problems.append(f"{file.name}: {name!r} listed in the index is not in the shard")
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(params[name].shape):
                    shapes.append(f"{name} {shape} (model {tuple(params[name].shape)})")
    if shapes:
        problems.append(f"wrong shape {len(shapes)}: {shapes[:5]}")
    if problems:
        raise WeightsError(f"{where}: weights do not match the v3 model ({model.config.num_hidden_layers} layers, "
                           f"hidden {model.config.hidden_size}): " + "; ".join(problems))
    return llm


@torch.no_grad()
def load_v3(model: HiggsV3Model, folder: str | Path, dtype: torch.dtype | None = None) -> HiggsV3Model:
    """Load a released v3 folder into `model` (built on any device, or on meta: materialized on the CPU),
    shard by shard, memory-mapped; the codec's tensors are skipped unread. See `plan` for the checks."""
    from safetensors import safe_open

    llm = plan(model, folder)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")  # every parameter is overwritten below
    if dtype is not None:
        model.to(dtype)
    params = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for name, file in llm.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                params[name].copy_(f.get_tensor(name).to(params[name].dtype))
    return model


def build_v3(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
             ) -> HiggsV3Model:
    """The model of a released folder: config.json read, built on meta, loaded, moved to `device`."""
    cfg = V3Config.from_pretrained_config(folder)
    with torch.device("meta"):
        model = HiggsV3Model(cfg)
    return load_v3(model, folder, dtype).to(device)


# ----------------------------------------------------------------------------- the codec's tensors

def codec_tensors(folder: str | Path) -> dict[str, Path]:
    """Codec tensor name -> file in a released folder (names from the headers; no tensor read). Writing a folder
    in the released layout is export/merge.py's (the base's shards rewritten, these tensors copied unchanged)."""
    name_to_file, _ = weight_files(folder)
    return {n: f for n, f in name_to_file.items() if is_codec(n)}
