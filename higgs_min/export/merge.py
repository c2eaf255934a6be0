"""Merge a LoRA adapter into base weights: a complete base folder that `train --base-weights` reads.

    python -m higgs_min.export --adapter output/checkpoint-300 --base-weights BASE --out merged/
    python -m higgs_min.export --adapter output/checkpoint-300 --out merged/    # run on a preset: base rebuilt
    python -m higgs_min.export --format transformers output/checkpoint-300 --out hf/ [--adapter-only]
    python -m higgs_min.export --adapter-only output/checkpoint-300 --out adapter/   # the adapter as saved

The last form writes a folder that transformers' HiggsAudioV2ForConditionalGeneration loads
(`from_pretrained(DIR, use_text_head=True)`), or with --adapter-only a PEFT adapter for that
model; the format itself lives in transformers_format.py. The rest of this docstring is the
higgs_min format.

merged/ holds
    *.safetensors + model.safetensors.index.json   W + scale·B@A computed in fp32 and cast once to W's dtype;
                                                   the base's tensor names and shard files (one shard for a
                                                   rebuilt preset base)
    config.json                                    the base's (released format); for a preset run, the preset's
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json when the base has them)
                                                   --tokenizer, else the base folder's, else the run's recorded one

Higgs Audio v3 (a v3 BASE folder, or a run on a v3 preset) is exported the same way, in the released layout
that sglang-omni serves: the released tensor names and shards, each tied matrix once (text embedding = text
head, fused audio matrix = audio head), the bundled codec's tensors copied unchanged, the base's config.json (a
preset run: V3Config.released_config()); a fused audio matrix the run trained (--train-audio-embedding) replaces
the base's, cast once to its dtype. --format transformers refuses v3 (transformers has no v3 model).

BASE is a folder (sharded with `model.safetensors.index.json`, or holding `model.safetensors`) or a
`.safetensors` file with config.json beside it. Without --base-weights the base is the run's seeded
preset, rebuilt by `runs.build_base` from the settings the checkpoint recorded. Works shard by shard;
the output folder appears only when complete (written to a temporary sibling, then renamed).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch

from higgs_min import atomic
from higgs_min.export import transformers_format as tf
from higgs_min.config import REFUSED_FIELDS, ModelConfig
from higgs_min.errors import Parser, guard
from higgs_min.lora import (PEFT_PREFIX, TRAINED_TENSORS, lora_scale, merge_lora, merged_weight, read_adapter,
                            read_trained_tensors)
from higgs_min.model import HiggsAudioModel
from higgs_min.weights import load_pretrained, weight_files
from higgs_min.train.runs import (PROMPT_FILE, find_adapter, load_trained, read_prompt, read_settings,
                                  resolve_checkpoint)
from higgs_min.v3.config import PRESETS as V3_PRESETS
from higgs_min.v3.config import V3Config, is_v3_config

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def released_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> the released config.json layout (Llama fields in text_config, audio fields on top);
    `ModelConfig.from_pretrained_config` reads it back to the same ModelConfig."""
    text = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                         "rope_theta", "rope_scaling", "initializer_range")}
    audio = {k: getattr(cfg, k) for k in ("audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id",
                                          "audio_stream_eos_id", "audio_dual_ffn_layers",
                                          "audio_ffn_intermediate_size", "use_delay_pattern", "audio_adapter_type",
                                          "audio_embed_avg")}
    # Every field the reader would otherwise default: the official defaults are not the release's
    # (adapter "stack", no delay), so a field left out would read back as another model.
    honoured = {name: value for name, value, _ in REFUSED_FIELDS}
    honoured["audio_ffn_hidden_size"] = cfg.hidden_size
    return {"model_type": "higgs_audio", "architectures": ["HiggsAudioModel"],
            "text_config": {"model_type": "llama", **text}, **audio, **honoured}


def lora_deltas(adapter_dir) -> tuple[dict, float, dict]:
    """(weight name -> (A, B), scale, adapter config) from a PEFT-format adapter folder."""
    cfg, tensors = read_adapter(adapter_dir)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = lora_scale(r, alpha, bool(cfg.get("use_rslora")))
    pairs = {}
    for key in tensors:
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
        if b_key not in tensors:
            raise KeyError(f"{adapter_dir}: {key!r} has no matching {b_key!r}")
        pairs[f"{module}.weight"] = (tensors[key], tensors[b_key])
    return pairs, scale, cfg


def merged(name: str, w: torch.Tensor, pairs: dict, scale: float, trained: dict | None = None) -> torch.Tensor:
    """One base tensor of the merged folder: the run's trained tensor (fp32 master, cast once to W's dtype) for a
    trained one, lora.merged_weight where the adapter has a pair for it, else W unchanged."""
    if trained and name in trained:
        t = trained[name]
        if t.shape != w.shape:
            raise ValueError(f"{name}: trained tensor {tuple(t.shape)} != base {tuple(w.shape)}")
        return t.to(w.dtype).contiguous()
    if name not in pairs:
        return w.contiguous()
    a, b = pairs[name]
    return merged_weight(w, a, b, scale, name).contiguous()


def _commit(out: Path, fill) -> Path:
    """Run fill(tmp_folder), fsync every file, rename to `out`; remove the temporary folder on any failure."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged_folder(out) as tmp:  # never a half-written folder: renamed in only when complete
        fill(tmp)
    return out


def _write_index(tmp: Path, weight_map: dict[str, str]) -> None:
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))  # an upper bound, as HF writes it
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _tokenizer_files(tmp: Path, tokenizer, vocab_size: int) -> None:
    """Copy the tokenizer (and its sibling config files) after checking its vocabulary fits the model."""
    from tokenizers import Tokenizer

    tokenizer = Path(tokenizer)
    try:
        size = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"--tokenizer {tokenizer}: cannot load: {e}") from e
    if size > vocab_size:
        raise ValueError(f"--tokenizer {tokenizer} has {size} tokens, the model's vocabulary is {vocab_size}: "
                         f"use the tokenizer the base was trained with")
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    for name in TOKENIZER_FILES[1:]:
        if (tokenizer.parent / name).is_file():
            shutil.copyfile(tokenizer.parent / name, tmp / name)


def _prompt_file(tmp: Path, adapter_dir) -> None:
    """prompt.json: the prompt the run trained on (runs.read_prompt), so that `generate --base-weights OUT`
    uses it as it would with the adapter. Nothing when the adapter records none."""
    prompt = read_prompt(Path(adapter_dir))
    if prompt is not None:
        (tmp / PROMPT_FILE).write_text(json.dumps(prompt, indent=2) + "\n")


def _recorded_tokenizer(adapter_dir) -> Path | None:
    path = read_settings(Path(adapter_dir)).get("tokenizer")
    return Path(path) if path and Path(path).is_file() else None


def merge_into_weights(adapter_dir, base, out, tokenizer=None, trained: dict | None = None) -> Path:
    """Adapter + released-format base -> `out`, a base folder (see the module docstring). trained: tensors the run
    trained whole ({name: fp32}, e.g. v3's fused audio matrix), written in place of the base's; default: those
    saved beside the adapter (lora.read_trained_tensors). A Higgs Audio v3 base keeps its layout: same names and
    shards, each tied matrix once, the bundled codec's tensors unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    pairs, scale, _ = lora_deltas(adapter_dir)
    trained = read_trained_tensors(adapter_dir) if trained is None else trained
    name_to_file, index = weight_files(base)
    unknown = sorted((set(pairs) | set(trained)) - set(name_to_file))
    if unknown:
        raise KeyError(f"{adapter_dir}: adapter modules not in the base weights {base}: {unknown[:3]}")
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    config = folder / "config.json"
    if tokenizer is None and (folder / "tokenizer.json").is_file():
        tokenizer = folder / "tokenizer.json"

    def fill(tmp: Path) -> None:
        by_file: dict[Path, list[str]] = {}
        for name, file in name_to_file.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata()
                shard = {name: merged(name, f.get_tensor(name), pairs, scale, trained) for name in names}
            save_file(shard, str(tmp / file.name), metadata=metadata)
        if index is not None:
            shutil.copyfile(index, tmp / index.name)
        else:
            _write_index(tmp, {name: file.name for name, file in name_to_file.items()})
        if config.is_file():
            shutil.copyfile(config, tmp / "config.json")
        if tokenizer is not None:
            vocab = _config_class(config).from_pretrained_config(config).vocab_size if config.is_file() else math.inf
            _tokenizer_files(tmp, tokenizer, vocab)
        _prompt_file(tmp, adapter_dir)

    out = _commit(out, fill)
    missing = [n for n in ("config.json", "tokenizer.json") if not (out / n).exists()]
    if missing:
        log.warning("%s has no %s (the base %s had none): `--base-weights %s` needs both", out, missing, base, out)
    return out


def _config_class(config: Path):
    """V3Config for a Higgs Audio v3 config.json, else ModelConfig."""
    return V3Config if is_v3_config(config) else ModelConfig


def _config_json(cfg) -> dict:
    return cfg.released_config() if getattr(cfg, "family", None) == "v3" else released_config(cfg)


def export_rebuilt(adapter_dir, out, tokenizer=None, trained: dict | None = None) -> Path:
    """A run trained on a preset: rebuild its seeded base from the checkpoint's record, merge, write a base folder."""
    from safetensors.torch import save_file

    from higgs_min.errors import RunError
    from higgs_min.train.runs import build_base

    settings = read_settings(Path(adapter_dir))
    if not settings:
        raise RunError(f"{adapter_dir}: no trainer_state.json records the base; pass --base-weights BASE")
    if settings.get("base_weights"):
        raise RunError(f"{adapter_dir}: the run trained on --base-weights {settings['base_weights']}; "
                       f"pass --base-weights with that folder")
    tokenizer = tokenizer or _recorded_tokenizer(adapter_dir)
    if tokenizer is None:
        raise RunError(f"{adapter_dir}: the run's tokenizer {settings.get('tokenizer')} is gone; pass --tokenizer")
    pairs, scale, _ = lora_deltas(adapter_dir)
    trained = read_trained_tensors(adapter_dir) if trained is None else trained
    model, cfg, base_name = build_base(settings.get("preset", "tiny"), None, int(settings.get("seed", 0)))
    state = model.state_dict()
    unknown = sorted((set(pairs) | set(trained)) - set(state))
    if unknown:
        raise KeyError(f"{adapter_dir}: adapter modules not in {base_name}: {unknown[:3]}")

    def fill(tmp: Path) -> None:
        save_file({n: merged(n, w, pairs, scale, trained) for n, w in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_index(tmp, {n: "model.safetensors" for n in state})
        (tmp / "config.json").write_text(json.dumps(_config_json(cfg), indent=2))
        _tokenizer_files(tmp, tokenizer, cfg.vocab_size)
        _prompt_file(tmp, adapter_dir)

    return _commit(out, fill)


def export_adapter(adapter_dir, out) -> Path:
    """The adapter alone, as the run saved it: adapter_config.json + adapter_model.safetensors (PEFT's layout), the
    tensors the run trained whole (lora.TRAINED_TENSORS, v3 --train-audio-embedding) and prompt.json. It applies
    to the base the run trained on: `generate --base-weights BASE --adapter OUT` (a preset run's base is only
    recorded in its checkpoints)."""
    adapter_dir = Path(adapter_dir)
    read_adapter(adapter_dir)  # a damaged adapter is named here, never copied
    read_trained_tensors(adapter_dir)

    def fill(tmp: Path) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors", TRAINED_TENSORS):
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, tmp / name)
        _prompt_file(tmp, adapter_dir)

    return _commit(out, fill)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(weights: str | Path) -> torch.dtype:
    """The dtype of the base weights on disk (of their first tensor), read from the header only."""
    from safetensors import safe_open

    name_to_file, _ = weight_files(weights)
    name, file = next(iter(sorted(name_to_file.items())))
    with safe_open(str(file), framework="pt") as f:
        kind = f.get_slice(name).get_dtype()
    if kind not in _DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has dtype {kind}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[kind]


def export_transformers(source: str | Path, out: str | Path, base_weights: str | Path | None = None,
                        tokenizer: str | Path | None = None, adapter_only: bool = False, base_only: bool = False,
                        dtype: torch.dtype | None = None, shard_bytes: int = tf.SHARD_BYTES) -> Path:
    """Write `source` in transformers' HiggsAudioV2 format.

    source: a checkpoint or adapter folder (its LoRA merged into the base the run trained on: the
    recorded base weights, `base_weights`, or the recorded preset rebuilt from its seed), or a base
    folder (config.json + weights), converted as it is. The written weights are in the base's dtype
    on disk (float32 for a preset) unless `dtype` says otherwise; config.json records that dtype.
    base_only: write the run's base without its LoRA (what an --adapter-only export loads onto).
    """
    source = resolve_checkpoint(source)
    v3_base = source if not (source / "adapter_config.json").exists() else (
        base_weights or read_settings(source).get("base_weights"))
    if (v3_base and is_v3_config(v3_base)) or read_settings(source).get("preset") in V3_PRESETS:
        raise ValueError(f"{source}: --format transformers: transformers has no Higgs Audio v3 model (the release's "
                         f"config.json has no auto_map); the default format writes the released v3 layout")
    if not (source / "adapter_config.json").exists():
        if adapter_only:
            raise ValueError(f"{source}: --adapter-only needs a checkpoint or adapter folder (no adapter_config.json)")
        cfg = ModelConfig.from_pretrained_config(source)
        tf.check_expressible(cfg)
        base_dtype = stored_dtype(source)
        with torch.device("meta"):
            model = HiggsAudioModel(cfg)
        load_pretrained(model, source, dtype=base_dtype)
        tokenizer = tokenizer or (source / "tokenizer.json" if (source / "tokenizer.json").exists() else None)
    else:
        base = base_weights or read_settings(source).get("base_weights")
        base_dtype = stored_dtype(base) if base and Path(base).exists() else torch.float32
        trained = load_trained(source, base_weights, dtype=base_dtype)
        model, cfg = trained.model, trained.cfg
        tf.check_expressible(cfg)
        if adapter_only:
            adapter_cfg, tensors = read_adapter(source)
            with torch.device("meta"):
                plain = HiggsAudioModel(cfg)
            linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
            adapter_cfg, tensors = tf.adapter_to_transformers(adapter_cfg, tensors, linears, PEFT_PREFIX)
            prompt = read_prompt(source)
            extra = {PROMPT_FILE: json.dumps(prompt, indent=2) + "\n"} if prompt is not None else {}
            return tf.write_adapter_folder(out, adapter_cfg, tensors, extra)
        if not base_only:
            merge_lora(model)  # W + scale·B@A in fp32, cast once to W's dtype
        tokenizer = tokenizer or trained.tokenizer
    if tokenizer is None:
        raise ValueError(f"{source}: no tokenizer recorded or found beside the weights; pass --tokenizer tokenizer.json")
    state = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    tokenizer_json, token_ids = tf.export_tokenizer(tokenizer, cfg.vocab_size)
    config = tf.to_transformers_config(cfg, token_ids, dtype or base_dtype)
    return tf.write_model_folder(out, state, config, tokenizer_json, shard_bytes)


def main(argv=None) -> int:
    # Every exception merge raises on its own names the file and the problem (bad adapter, missing
    # shard, existing output, tokenizer too large): one line; --debug shows the traceback.
    return guard(_main, argv, "python -m higgs_min.export", runtime=(ValueError, KeyError, OSError))


def _main(argv) -> int:
    ap = Parser(prog="python -m higgs_min.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", help="a checkpoint or adapter folder (= --adapter); with --format "
                                              "transformers also a base folder")
    ap.add_argument("--adapter", help="a checkpoint, or a folder with adapter_config.json + "
                                      "adapter_model.safetensors")
    ap.add_argument("--base-weights", help="base folder (or .safetensors file with config.json beside it); "
                                           "default: the run's recorded base, or its seeded preset rebuilt")
    ap.add_argument("--tokenizer", help="tokenizer.json to ship (default: the base folder's, else the run's)")
    ap.add_argument("--out", required=True, help="new folder for the merged base")
    ap.add_argument("--format", default="higgs_min", choices=["higgs_min", "transformers"],
                    help="higgs_min: the base's names and shards; transformers: HiggsAudioV2ForConditionalGeneration's")
    ap.add_argument("--adapter-only", action="store_true",
                    help="write only the adapter: as the run saved it (with its trained tensors, for generate "
                         "--base-weights BASE --adapter OUT), or with --format transformers for "
                         "peft.PeftModel.from_pretrained")
    ap.add_argument("--base-only", action="store_true",
                    help="--format transformers: write the run's base model without its LoRA")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="--format transformers: dtype of the written weights (default: the base's)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.format == "transformers":
        if not args.source and not args.adapter:
            ap.error("--format transformers needs a checkpoint, adapter or base folder")
        if args.adapter_only and args.base_only:
            ap.error("--adapter-only and --base-only exclude each other")
        # a positional source may be a base folder; --adapter is what generate --adapter accepts
        out = export_transformers(args.source or find_adapter(args.adapter), args.out, args.base_weights, args.tokenizer,
                                  args.adapter_only, args.base_only, getattr(torch, args.dtype) if args.dtype else None)
        print(f"transformers-format {'adapter' if args.adapter_only else 'model'} written to {out.resolve()}")
        return 0
    adapter = args.adapter or args.source
    if not adapter:
        ap.error("needs --adapter (a checkpoint such as output/checkpoint-300, or an adapter folder)")
    adapter = find_adapter(adapter)  # as generate --adapter: a checkpoint, adapter folder, OUT/best, or a run folder
    if args.adapter_only:
        out = export_adapter(adapter, args.out)
        print(f"adapter written to {out.resolve()} (generate --base-weights BASE --adapter {out})")
        return 0
    base = args.base_weights or read_settings(Path(adapter)).get("base_weights")
    if base:
        out = merge_into_weights(adapter, base, args.out, args.tokenizer or _base_or_recorded_tokenizer(adapter, base))
    else:
        out = export_rebuilt(adapter, args.out, args.tokenizer)
    print(f"merged base written to {out.resolve()} (train on it with --base-weights {out})")
    return 0


def _base_or_recorded_tokenizer(adapter, base):
    base = Path(base)
    folder = base if base.is_dir() else base.parent
    return None if (folder / "tokenizer.json").is_file() else _recorded_tokenizer(adapter)
