"""The model a run trained, rebuilt from what the run recorded: one definition for training,
generation and export.

    build_base(preset, base_weights, seed)   the frozen base, exactly as the trainer builds it
        base_weights given -> released-format weights loaded from disk (no RNG used)
        else               -> torch.manual_seed(seed); HiggsAudioModel(preset)   (random init)

    resolve_checkpoint(PATH)                 OUT/best and OUT/latest (text files naming a checkpoint) ->
                                             the folder they name; every other path unchanged
    load_trained(CKPT)                       base + the checkpoint's LoRA adapter
        CKPT/trainer_state.json["config"]    the trainer's resolved options: preset, seed,
                                             base_weights, tokenizer (what the base was)
        CKPT/adapter_config.json             LoRA targets, r, alpha, rslora
        CKPT/adapter_model.safetensors       the LoRA tensors (strict: every key used)
        CKPT/trained_tensors.safetensors     base tensors trained in full, when any (v3 --train-audio-embedding)

A run trained on a preset has no base weights on disk: its base is the seeded random init,
so re-seeding with the recorded seed rebuilds the same tensors bit for bit (the trainer seeds
torch with --seed right before building the model, and nothing draws from the RNG between).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from higgs_min.errors import RunError, UsageError  # a run folder that cannot be turned back into its model
from higgs_min.config import ModelConfig
from higgs_min.lora import TRAINED_TENSORS, load_adapter, load_trained_tensors, read_trained_tensors
from higgs_min.model import HiggsAudioModel
from higgs_min.weights import load_pretrained

if TYPE_CHECKING:  # annotations only: the v3 modules load lazily, when a run is v3
    from higgs_min.v3.config import V3Config
    from higgs_min.v3.model import HiggsV3Model


@dataclass
class Trained:
    model: HiggsAudioModel  # base + LoRA layers (not merged), eval mode; a HiggsV3Model for a v3 run
    cfg: ModelConfig  # a V3Config for a v3 run
    tokenizer: Path | None  # the tokenizer the run trained with, when it still exists
    settings: dict  # the trainer's resolved options ({} for a bare adapter folder)
    base_name: str  # what the base was, in words


def build_base(preset: str, base_weights: str | Path | None, seed: int, dtype: torch.dtype = torch.float32
               ) -> tuple[HiggsAudioModel | HiggsV3Model, ModelConfig | V3Config, str]:
    """The frozen base model on the CPU. Released weights when given, else the seeded preset.
    Higgs Audio v3 (a folder whose config.json says higgs_multimodal_qwen3, or a v3 preset) builds HiggsV3Model."""
    from higgs_min.v3 import config as v3_config

    if base_weights and v3_config.is_v3_config(base_weights):
        from higgs_min.v3.weights import build_v3

        model = build_v3(base_weights, dtype)
        return model, model.config, str(base_weights)
    if not base_weights and preset in v3_config.PRESETS:
        from higgs_min.v3.model import HiggsV3Model

        cfg = v3_config.V3Config.from_preset(preset)
        torch.manual_seed(seed)  # as for v2: the trainer seeds the same way right before this
        return HiggsV3Model(cfg).to(dtype), cfg, f"higgs_min preset {preset} (random init, seed {seed})"
    if base_weights:
        cfg = ModelConfig.from_pretrained_config(base_weights)
        with torch.device("meta"):
            model = HiggsAudioModel(cfg)
        load_pretrained(model, base_weights, dtype=dtype)
        return model, cfg, str(base_weights)
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(seed)  # the trainer seeds the same way right before this: same draws, same tensors
    model = HiggsAudioModel(cfg)
    return model.to(dtype), cfg, f"higgs_min preset {preset} (random init, seed {seed})"


def resolve_checkpoint(path: str | Path) -> Path:
    """checkpoint.resolve_pointer (OUT/best, OUT/latest -> the folder they name), its error as a RunError."""
    from higgs_min import checkpoint

    try:
        return checkpoint.resolve_pointer(path)
    except checkpoint.CheckpointError as e:
        raise RunError(str(e)) from e


def find_adapter(path: str | Path, option: str = "--adapter") -> Path:
    """What `option` accepts wherever an adapter is asked for (generate, export): a checkpoint or adapter
    folder, OUT/best or OUT/latest (resolve_checkpoint), or a run's output folder: its newest valid checkpoint."""
    from higgs_min import checkpoint

    path = resolve_checkpoint(path)
    if (path / "adapter_config.json").exists():
        return path
    if path.is_dir():
        latest = checkpoint.latest_valid(path)
        if latest is not None:
            return latest
    never_evaluated = path.name == "best" and not path.exists() and (path.parent / "latest").exists()  # a run's
    hint = ("; OUT/best exists once a run evaluates (--eval-data or --eval-split): OUT/latest or OUT is the newest"
            if never_evaluated else "")
    raise UsageError(f"{option} {path}: neither a checkpoint (adapter_config.json) "
                     f"nor an output folder with a valid checkpoint{hint}")


PROMPT_FILE = "prompt.json"  # an exported folder's copy of the run's prompt record (export/merge.py)


def read_prompt(folder: Path) -> dict | None:
    """The prompt format the run trained on: a checkpoint's trainer_state.json "prompt" ({"system": text or
    None, ...}), else an exported folder's prompt.json; None for a bare adapter, a released base, or a run
    recorded before prompts were."""
    for name, key in (("trainer_state.json", "prompt"), (PROMPT_FILE, None)):
        try:
            raw = json.loads((Path(folder) / name).read_text())
            prompt = raw.get(key) if key else raw
        except (OSError, ValueError, AttributeError):
            continue
        return prompt if isinstance(prompt, dict) and "system" in prompt else None
    return None


def read_settings(folder: Path) -> dict:
    """The trainer's resolved options recorded in a checkpoint ({} when the folder is a bare adapter)."""
    state = folder / "trainer_state.json"
    if not state.exists():
        return {}
    try:
        return json.loads(state.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunError(f"{state}: cannot read the run's recorded options: {e}") from e


def load_trained(folder: str | Path, base_weights: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Trained:
    """Base + adapter of a checkpoint (or of an adapter folder plus `base_weights`)."""
    from higgs_min import checkpoint

    folder = resolve_checkpoint(folder)
    if not (folder / "adapter_config.json").exists():
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else "nothing (no such folder)"
        raise RunError(f"{folder}: not a checkpoint or adapter folder (no adapter_config.json; found {found}); "
                       f"pass a checkpoint such as output/checkpoint-300")
    if (folder / checkpoint.MANIFEST).exists():
        checkpoint.verify(folder)  # a damaged checkpoint is named, never half-loaded
    settings = read_settings(folder)
    recorded = settings.get("base_weights")
    base = base_weights or recorded
    if base and not Path(base).exists():
        raise RunError(f"{folder}: the run was trained on base weights {base}, which do not exist here; "
                       f"pass --base-weights DIR with the same weights")
    if not base and not settings:
        raise RunError(f"{folder}: a bare adapter records no base model; pass --base-weights DIR "
                       f"(the adapter says its base was {_adapter_base(folder)!r})")
    model, cfg, base_name = build_base(settings.get("preset", "tiny"), base, int(settings.get("seed", 0)), dtype)
    try:
        load_adapter(model, folder)
        # base tensors trained in full beside the adapter (v3 --train-audio-embedding: the tied audio matrix)
        load_trained_tensors(model, read_trained_tensors(folder), source=str(folder / TRAINED_TENSORS))
        if getattr(cfg, "family", "v2") == "v3":
            from higgs_min.v3.finetune import check_tie
            check_tie(model, str(folder))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise RunError(f"{folder}: the adapter does not fit the base {base_name}: {e}") from e
    tokenizer = None
    for candidate in ([settings.get("tokenizer")] if settings.get("tokenizer") else []) + (
            [Path(base) / "tokenizer.json"] if base and Path(base).is_dir() else []):
        if Path(candidate).exists():
            tokenizer = Path(candidate)
            break
    return Trained(model.to(device).eval(), cfg, tokenizer, settings, base_name)


def _adapter_base(folder: Path) -> str:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path", "")
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable adapter_config.json: {e}"
