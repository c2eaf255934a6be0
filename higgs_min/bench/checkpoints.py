"""Checkpoint rows of `make bench` (#27): save vs the durability floor, verified load and resume vs theirs.

Contestants alternate (speed.alternate: min over the repeats after one warm-up each), os.sync() before each
save or load; the state is a 3B-shape LoRA run's (adapter + AdamW moments, 473 MB in 2 files).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from higgs_min.bench.common import ROOT
from higgs_min.bench.speed import alternate, load_avg


def _adapter_like_3b():
    """LoRA r=16 on every default target of higgs-v2-3b, plus AdamW's two moments: ~39M params, ~470 MB."""
    from higgs_min.config import ModelConfig
    cfg = ModelConfig.from_preset("higgs-v2-3b")
    H, I, q, kv, r = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim, 16
    shapes = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
              "self_attn.o_proj": (H, q), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I),
              "audio_mlp.gate_proj": (I, H), "audio_mlp.up_proj": (I, H), "audio_mlp.down_proj": (H, I)}
    t = {}
    for layer in range(cfg.num_hidden_layers):
        for name, (o, i) in shapes.items():
            base = f"base_model.model.layers.{layer}.{name}"
            for part, shape in (("lora_A", (r, i)), ("lora_B", (o, r))):
                for suffix in ("weight", "exp_avg", "exp_avg_sq"):
                    t[f"{base}.{part}.{suffix}"] = torch.randn(shape)
    return t


def bench_checkpoint(quick=False):
    """Save: ours (atomic, hashed while writing, files in parallel, fsync, rename) vs the durability floor
    (save_file + fsync of each file and the folder) and vs a bare save_file. Load: one-pass verified read vs
    load_file, both then touching every byte, as a resume does; resume (choose + load, hashed once) vs its floor."""
    tensors = _adapter_like_3b()
    files = {"adapter_model.safetensors": {k: v for k, v in tensors.items() if k.endswith(".weight")},
             "optimizer.safetensors": {k: v for k, v in tensors.items() if not k.endswith(".weight")}}
    reps = 2 if quick else 4
    load0 = load_avg()
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        ts, latest = _time_saves(files, Path(d), reps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # 1680 small copies: intra-op threads only add spin-waits on a loaded machine
        try:
            tl, tc = _time_loads(files, latest, reps)
        finally:
            torch.set_num_threads(threads)
    return _checkpoint_rows(files, ts, tl, tc, load0)


def _time_saves(files: dict, d: Path, reps: int) -> tuple[dict, Path]:
    """Seconds (min over 2·reps, alternating) of ours / floor / bare save, the ratio of ours' median to the floor's;
    and the last checkpoint ours wrote."""
    from safetensors.torch import save_file

    from higgs_min import checkpoint

    for sub in ("ours", "floor", "bare"):
        (d / sub).mkdir()
    step = [0]

    def ours_save():
        step[0] += 1
        checkpoint.save(d / "ours", step[0], files)

    def before():  # untimed: keep one checkpoint (the disk must not fill), flush dirty pages
        for old in (d / "ours").glob("checkpoint-*"):
            if old.name != f"checkpoint-{step[0]}":
                shutil.rmtree(old)
        os.sync()

    def floor_save():
        for name, t in files.items():
            save_file(t, str(d / "floor" / name))
            fd = os.open(d / "floor" / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        checkpoint.fsync_dir(d / "floor")

    def bare_save():
        for name, t in files.items():
            save_file(t, str(d / "bare" / name))

    times = {}
    ts = alternate({"ours": ours_save, "floor": floor_save, "bare": bare_save}, 2 * reps, before=before, times=times)
    ts["median_ratio"] = statistics.median(times["ours"]) / statistics.median(times["floor"])
    return ts, d / "ours" / f"checkpoint-{step[0]}"


def _time_loads(files: dict, latest: Path, reps: int) -> tuple[dict, dict]:
    """Seconds of ours / resume / plain load and of the hashing floors, files in the page cache; and of ours /
    plain load with the files evicted first (cold)."""
    from safetensors.torch import load_file

    from higgs_min import checkpoint, manifest

    dest = {k: torch.empty_like(v) for part in files.values() for k, v in part.items()}

    def restore(parts):  # what a resume does with the tensors: copy them into the model / optimizer state
        for part in parts:
            for k, t in part.items():
                dest[k].copy_(t)

    def ours_load():
        data = manifest.read_verified(latest)
        restore([manifest.tensors_from_safetensors(data[n], n) for n in files])

    def ours_resume():  # rank 0's resume: choose the newest valid checkpoint (hashed, kept), then load it
        data = manifest.read_verified(checkpoint.latest_valid(latest.parent, keep=True))
        restore([manifest.tensors_from_safetensors(data[n], n) for n in files])

    def plain_load():
        restore([load_file(str(latest / n)) for n in files])

    def evict():  # cold: a resume after a restart reads from the disk, not the page cache
        os.sync()
        for n in files:
            fd = os.open(latest / n, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    hash_only, hash_even = _hash_floors(files)
    tl = alternate({"ours": ours_load, "resume": ours_resume, "plain": plain_load, "hash": hash_only,
                    "even": hash_even}, reps, before=os.sync)
    tc = alternate({"ours": ours_load, "plain": plain_load}, reps, before=evict)
    return tl, tc


def _hash_floors(files: dict):
    """Two floors of any sha256 verification of the same bytes already in memory: one sha256 per file (files
    in parallel threads), and every byte hashed once spread evenly over the cores (the physical floor)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def hash_only():
        def one(part):
            h = hashlib.sha256()
            for t in part.values():
                h.update(memoryview(t.numpy()).cast("B"))
            return h.hexdigest()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, files.values()))

    views = [memoryview(t.numpy()).cast("B") for part in files.values() for t in part.values()]
    cores = os.cpu_count() or 1

    def hash_even():
        def one(k):
            h = hashlib.sha256()
            for v in views[k::cores]:
                h.update(v)
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(one, range(cores)))

    return hash_only, hash_even


def _checkpoint_rows(files: dict, ts: dict, tl: dict, tc: dict, load0: float) -> list[dict]:
    from higgs_min.bench.common import row

    n_params = sum(v.numel() for v in files["adapter_model.safetensors"].values())
    nbytes = sum(v.numel() * 4 for part in files.values() for v in part.values())
    shapes = f"{n_params / 1e6:.1f}M LoRA params + AdamW moments, {nbytes / 1e6:.0f} MB in 2 files"
    return [row("checkpoint save (atomic, sha256 while writing, fsync, rename) vs durability floor "
                "(save_file + fsync files and folder)", ts["ours"], ts["floor"], "s", shapes, target="ratio <= 1.1",
                bare_save_file_s=ts["bare"], median_ratio=ts["median_ratio"], ratio_to_bare=ts["ours"] / ts["bare"], load_avg=(load0, load_avg())),
            row("checkpoint load with sha256 verification (one pass) vs plain load_file, both copied into place; "
                "files in the page cache", tl["ours"], tl["plain"], "s", shapes, target="ratio <= 1.2",
                sha256_only_s=tl["hash"], load_avg=(load0, load_avg())),
            row("resume on rank 0 (choose the newest valid checkpoint, then load it, each byte hashed once) vs its "
                "floor (plain load_file + sha256 of every byte spread evenly over the cores); page cache",
                tl["resume"], tl["plain"] + tl["even"], "s", shapes, target="ratio <= 1.1", plain_load_s=tl["plain"],
                sha256_even_s=tl["even"], sha256_per_file_s=tl["hash"], load_avg=(load0, load_avg())),
            row("same, cold: files evicted from the page cache (posix_fadvise DONTNEED) before each load",
                tc["ours"], tc["plain"], "s", shapes, target="ratio <= 1.2", load_avg=(load0, load_avg()))]
