"""What every bench row shares: peak-memory probes, timing, the row format, fresh-interpreter snippets, the mid shape.

Kept apart from the rows so that rows.py, speed.py and corpus.py all import it and none imports another.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def median_time(fn, repeats=5, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name, ours, theirs, units, shapes, target=None, better="lower", **extra):
    ratio = ours / theirs if theirs else float("nan")
    return {"name": name, "ours": ours, "theirs": theirs, "ratio": ratio, "units": units, "shapes": shapes,
            "target": target, "better": better, **extra}


# --------------------------------------------------------------------------- 1. audio loss

def run_snippet(snippet, *args) -> str:
    """Run `snippet` in a fresh interpreter (its own memory high-water mark); return its last output line."""
    out = subprocess.run([sys.executable, "-c", snippet, *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


MID = dict(vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
           num_attention_heads=16, num_key_value_heads=4, head_dim=64, audio_dual_ffn_layers=list(range(8)),
           audio_ffn_intermediate_size=2816, rope_scaling=None, rope_theta=500000.0)
LABEL_DENSITY = 233 / (8 * 504)


def text_batch(cfg, B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    labels = torch.full((B, L), -100)
    n = int(round(LABEL_DENSITY * B * L))
    labels.view(-1)[torch.randperm(B * L, generator=g)[:n]] = ids.view(-1)[torch.randperm(B * L, generator=g)[:n]]
    return ids, labels, n
