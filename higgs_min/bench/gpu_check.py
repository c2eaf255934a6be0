"""`make gpu-check`: the CUDA path at the released 3B shape, on one GPU. Not part of `make test`.

    python -m higgs_min.bench.gpu_check [--seq 4096] [--steps 3] [--skip-trainer]

1. bench: one LoRA step of `higgs-v2-3b` (random base in bf16, LoRA and AdamW state in fp32, loss in fp32 under
   bf16 autocast, fused AdamW) on a batch of one `--seq`-position sample, half of it audio, with and without
   activation checkpointing: step time, MFU against the best of a few large bf16 matmuls measured here, and
   peak CUDA memory.
2. trainer: `torchrun --nproc-per-node=1 -m higgs_min.train --preset higgs-v2-3b --device cuda` for `--steps`
   steps on the demo set (nccl process group, bf16 autocast, fused AdamW, a final checkpoint), its log tail.

Exit 0 when both ran; 2 when there is no CUDA device (one line says so).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def peak_bf16_flops(dev) -> float:
    best = 0.0
    for n in (4096, 8192):
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                a @ b
            torch.cuda.synchronize()
            best = max(best, 10 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def build_3b(dev, activation_checkpointing: bool):
    from higgs_min.config import ModelConfig
    from higgs_min.lora import apply_lora
    from higgs_min.model import HiggsAudioModel

    cfg = ModelConfig.from_preset("higgs-v2-3b")
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    model.to_empty(device=dev)
    torch.manual_seed(0)
    model.init_weights()  # on the GPU: seconds, not the minutes a CPU init of 5.8B parameters takes
    model.to(torch.bfloat16)  # frozen base in bf16; LoRA below is created in fp32
    apply_lora(model, r=16, alpha=32)
    model.activation_checkpointing = activation_checkpointing
    return cfg, model


def bench_3b(seq: int, activation_checkpointing: bool, peak: float) -> str:
    from argparse import Namespace

    from higgs_min.bench.speed import audio_batch, step_flops
    from higgs_min.loss import target_counts
    from higgs_min.loop import Scorer, objective

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg, model = build_3b(dev, activation_checkpointing)
    batch = {k: v.to(dev) for k, v in audio_batch(cfg, 1, seq).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    scorer = Scorer(model, text_chunk=1024)
    args = Namespace(text_weight=1.0, audio_weight=1.0, audio_reduction="codebook_mean")
    counts = target_counts(batch["text_targets"], batch["audio_targets"])
    info = {}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            text, audio = scorer(batch)
            loss = objective(text, audio, counts, args)
        assert loss.dtype == torch.float32
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info.update(n_text=int(text.count), n_audio=audio.logits_shape[0])

    step()  # warm-up (allocates AdamW state)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    flops = step_flops(cfg, 1, seq, info["n_text"], info["n_audio"], 16)
    mem = torch.cuda.max_memory_allocated() / 2**30
    return (f"3B LoRA step, 1 x {seq} positions (half audio), activation checkpointing "
            f"{'on ' if activation_checkpointing else 'off'}: {best * 1e3:.0f} ms, {seq / best:.0f} tokens/s, "
            f"MFU {flops / best / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (bf16 matmul here), "
            f"peak memory {mem:.1f} GiB")


def trainer(steps: int) -> int:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "higgs_min.train", "--preset", "higgs-v2-3b", "--device", "cuda", "--max-steps", str(steps),
               "--save-steps", str(steps), "--batch-size", "2", "--log-every", "1", "--warmup-steps", "1",
               "--activation-checkpointing", "--output-dir", out]
        print("running:", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        print("\n".join((r.stdout + r.stderr).strip().splitlines()[-15:]))
        print(f"trainer exit code {r.returncode}")
        return r.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096, help="positions of the bench sample")
    ap.add_argument("--steps", type=int, default=3, help="trainer steps")
    ap.add_argument("--skip-trainer", action="store_true", help="bench only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing was run")
        return 2
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, nccl {torch.cuda.nccl.version()}")
    peak = peak_bf16_flops(torch.device("cuda"))
    for ckpt in (False, True):
        try:
            print(bench_3b(args.seq, ckpt, peak), flush=True)
        except torch.OutOfMemoryError as e:
            print(f"3B LoRA step, {args.seq} positions, activation checkpointing {ckpt}: out of memory ({e})")
    return 0 if args.skip_trainer else trainer(args.steps)


if __name__ == "__main__":
    sys.exit(main())
