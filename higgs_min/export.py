"""Merge a LoRA adapter into base weights and write full weights.

    python -m higgs_min.export --adapter output/checkpoint-300 --base-weights BASE --out merged/
    python -m higgs_min.export --format transformers output/checkpoint-300 --out hf/ [--adapter-only]

The second form writes a folder that transformers' HiggsAudioV2ForConditionalGeneration loads
(`from_pretrained(DIR, use_text_head=True)`), or with --adapter-only a PEFT adapter for that
model; the format itself lives in transformers_format.py.

BASE is a `.safetensors` file or a folder (sharded with `model.safetensors.index.json`,
or holding `model.safetensors`). The output keeps the base's tensor names, shard
file names and index, so `higgs_min.model.load_pretrained` (and the released
loader) read it. Each merged tensor is W + scale·B@A computed in fp32 and cast
once to W's dtype. Works shard by shard; the output folder appears only when
complete (written to a temporary sibling, then renamed).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from higgs_min import transformers_format as tf
from higgs_min.config import ModelConfig
from higgs_min.errors import Parser, guard
from higgs_min.lora import PEFT_PREFIX, merge_lora, read_adapter
from higgs_min.model import HiggsAudioModel, load_pretrained, weight_files
from higgs_min.runs import load_trained, read_settings


def merge_into_weights(adapter_dir: str | Path, base: str | Path, out: str | Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg, tensors = read_adapter(adapter_dir)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs = {}
    for key in tensors:
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
        if b_key not in tensors:
            raise KeyError(f"{adapter_dir}: {key!r} has no matching {b_key!r}")
        pairs[f"{module}.weight"] = (tensors[key], tensors[b_key])
    name_to_file, index = weight_files(base)
    unknown = sorted(set(pairs) - set(name_to_file))
    if unknown:
        raise KeyError(f"{adapter_dir}: adapter modules not in the base weights {base}: {unknown[:3]}")

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    committed = False
    try:
        by_file: dict[Path, list[str]] = {}
        for name, file in name_to_file.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            shard = {}
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata()
                for name in names:
                    w = f.get_tensor(name)
                    if name in pairs:
                        a, b = pairs[name]
                        delta = (b.float() @ a.float()) * scale  # (out, in)
                        if delta.shape != w.shape:
                            raise ValueError(f"{name}: LoRA update {tuple(delta.shape)} != weight {tuple(w.shape)}")
                        if not torch.isfinite(delta).all():
                            raise ValueError(f"{name}: LoRA update is not finite; refusing to merge")
                        w = (w.float() + delta).to(w.dtype)
                    shard[name] = w.contiguous()
            save_file(shard, str(tmp / file.name), metadata=metadata)
        if index is not None:
            shutil.copyfile(index, tmp / index.name)
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, out)
        committed = True
    finally:
        if not committed:  # never leave a half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    source = Path(source)
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
            return tf.write_adapter_folder(out, adapter_cfg, tensors)
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
    # shard, existing output): reported in one line; --debug shows the traceback.
    return guard(_main, argv, "python -m higgs_min.export", runtime=(ValueError, KeyError, OSError))


def _main(argv) -> int:
    ap = Parser(prog="python -m higgs_min.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", help="--format transformers: checkpoint, adapter or base folder")
    ap.add_argument("--adapter", help="folder with adapter_config.json + adapter_model.safetensors")
    ap.add_argument("--base-weights", help="base .safetensors file or folder of shards")
    ap.add_argument("--out", required=True, help="new folder for the merged weights")
    ap.add_argument("--format", default="higgs_min", choices=["higgs_min", "transformers"],
                    help="higgs_min: the base's names and shards; transformers: HiggsAudioV2ForConditionalGeneration's")
    ap.add_argument("--adapter-only", action="store_true",
                    help="--format transformers: write only the adapter, for peft.PeftModel.from_pretrained")
    ap.add_argument("--base-only", action="store_true",
                    help="--format transformers: write the run's base model without its LoRA")
    ap.add_argument("--tokenizer", help="--format transformers: tokenizer.json (default: the run's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="--format transformers: dtype of the written weights (default: the base's)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = ap.parse_args(argv)
    if args.format == "transformers":
        if not args.source and not args.adapter:
            ap.error("--format transformers needs a checkpoint, adapter or base folder")
        if args.adapter_only and args.base_only:
            ap.error("--adapter-only and --base-only exclude each other")
        out = export_transformers(args.source or args.adapter, args.out, args.base_weights, args.tokenizer,
                                  args.adapter_only, args.base_only, getattr(torch, args.dtype) if args.dtype else None)
        print(f"transformers-format {'adapter' if args.adapter_only else 'model'} written to {out.resolve()}")
        return 0
    if not (args.adapter or args.source) or not args.base_weights:
        ap.error("the higgs_min format needs --adapter (or a positional folder) and --base-weights")
    out = merge_into_weights(args.adapter or args.source, args.base_weights, args.out)
    print(f"merged weights written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
