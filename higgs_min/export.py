"""Merge a LoRA adapter into base weights and write full weights.

    python -m higgs_min.export --adapter output/checkpoint-300 --base-weights BASE --out merged/

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

from higgs_min.errors import Parser, guard
from higgs_min.lora import PEFT_PREFIX, read_adapter
from higgs_min.model import weight_files


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


def main(argv=None) -> int:
    # Every exception merge raises on its own names the file and the problem (bad adapter, missing
    # shard, existing output): reported in one line; --debug shows the traceback.
    return guard(_main, argv, "python -m higgs_min.export", runtime=(ValueError, KeyError, OSError))


def _main(argv) -> int:
    ap = Parser(prog="python -m higgs_min.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    ap.add_argument("--base-weights", required=True, help="base .safetensors file or folder of shards")
    ap.add_argument("--out", required=True, help="new folder for the merged weights")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = ap.parse_args(argv)
    out = merge_into_weights(args.adapter, args.base_weights, args.out)
    print(f"merged weights written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
