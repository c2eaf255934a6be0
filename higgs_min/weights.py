"""Base weights from disk: the released Higgs Audio v2 layout, or transformers' HiggsAudioV2 names.

    weight_files(path) -> ({tensor name: shard file}, index or None)    a folder, an index or one .safetensors
    load_pretrained(model, path, dtype)                                 strict: every tensor, exact shapes
    NAME_MAP / to_transformers_name / from_transformers_name            released <-> transformers tensor names

The released layout (bosonai/higgs-audio-v2-generation-3B-base) uses higgs_min's own parameter names, so a
released folder loads name for name. A folder exported in transformers' format (config.json model_type
"higgs_audio_v2"; config.py reads that config) is read under NAME_MAP.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from higgs_min.config import is_transformers_config
from higgs_min.model import HiggsAudioModel

# Released (= higgs_min) name prefix -> transformers name prefix. Follows ORIGINAL_TO_CONVERTED_KEY_MAPPING in
# transformers' src/transformers/models/higgs_audio_v2/convert_higgs_audio_v2_to_hf.py (huggingface/transformers
# @0d502730; the 5.24 wheel does not ship that script): audio_codebook_embeddings -> model.embed_audio_tokens.
# embed_audio_tokens, embed_tokens|layers|norm -> model.*, the audio_decoder_proj. level dropped from the heads.
NAME_MAP = (
    ("audio_codebook_embeddings.", "model.embed_audio_tokens.embed_audio_tokens."),
    ("embed_tokens.", "model.embed_tokens."),
    ("layers.", "model.layers."),
    ("norm.", "model.norm."),
    ("audio_decoder_proj.audio_lm_head.", "audio_lm_head."),
    ("audio_decoder_proj.text_lm_head.", "text_lm_head."),
)


def _rename(name: str, table, where: str) -> str:
    probe = name + "."  # so that a module path ("norm") maps as its weights ("norm.weight") do
    for src, dst in table:
        if probe.startswith(src):
            return (dst + probe[len(src):])[:-1]
    raise KeyError(f"{where}: {name!r} has no counterpart (known prefixes: {[s for s, _ in table]})")


def to_transformers_name(name: str) -> str:
    """'layers.3.mlp.up_proj.weight' -> 'model.layers.3.mlp.up_proj.weight' (also module paths)."""
    return _rename(name, NAME_MAP, "higgs_min -> transformers")


def from_transformers_name(name: str) -> str:
    return _rename(name, [(t, h) for h, t in NAME_MAP], "transformers -> higgs_min")


def is_transformers_folder(path: str | Path) -> bool:
    """True for a folder whose config.json is transformers' HiggsAudioV2 format."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return is_transformers_config(json.loads(config.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: cannot read config: {e}") from e


def weight_files(path: str | Path) -> tuple[dict[str, Path], Path | None]:
    """Map tensor name -> shard file for a .safetensors file or a folder.

    A folder holds `model.safetensors.index.json` (sharded) or `model.safetensors`.
    Returns (name -> file, index path or None).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from e
            return {name: path / shard for name, shard in weight_map.items()}, index
        single = path / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{path}: neither model.safetensors.index.json nor model.safetensors")
        path = single
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    with safe_open(str(path), framework="pt") as f:
        return {name: path for name in f.keys()}, None


@torch.no_grad()
def load_pretrained(model: HiggsAudioModel, path: str | Path, dtype: torch.dtype | None = None) -> HiggsAudioModel:
    """Load released-format weights into `model`, strictly, shard by shard (memory-mapped).

    A folder in transformers' HiggsAudioV2 format (its config.json says so) is read under
    the name map above (NAME_MAP).

    A model built on the meta device is materialized first. Every tensor of the
    model must be present with its exact shape, and no other tensor may be.
    """
    from safetensors import safe_open

    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
        model.init_buffers()  # every parameter is overwritten below
    if dtype is not None:
        model.to(dtype)
    params = model.state_dict()
    name_to_file, _ = weight_files(path)
    stored = {name: name for name in name_to_file}  # our name -> the name in the file
    hint = ""
    if is_transformers_folder(path):
        try:
            stored = {from_transformers_name(n): n for n in name_to_file}
        except KeyError as e:
            raise KeyError(f"{path}: {e.args[0]}") from None
        name_to_file = {ours: name_to_file[theirs] for ours, theirs in stored.items()}
        hint = " (a transformers folder saved without use_text_head=True has no text head)"
    missing = sorted(set(params) - set(name_to_file))
    unexpected = sorted(set(name_to_file) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"{path}: weights do not match the model: missing {len(missing)} {missing[:5]}, "
            f"unexpected {len(unexpected)} {unexpected[:5]}{hint if missing else ''}"
        )
    by_file: dict[Path, list[str]] = {}
    for name, file in name_to_file.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if stored[name] not in present:
                    raise KeyError(f"{file}: tensor {stored[name]!r} listed in the index is not in the shard")
                t = f.get_tensor(stored[name])
                want = params[name]
                if tuple(t.shape) != tuple(want.shape):
                    raise ValueError(
                        f"{file}: tensor {name!r} has shape {tuple(t.shape)}, model expects {tuple(want.shape)}"
                    )
                want.copy_(t.to(want.dtype))
    return model
