"""Bench rows for the packed corpus (`python -m higgs_min.bench --only corpus`), measured side by side:

  pack throughput (samples/s, 2 workers), then per size (10k, 100k, 1M samples of ~400 positions):
  open time, time to the first batch, and RssAnon added by opening (per sample) -- packed corpus vs the
  JSONL path (JsonlDataset: every line planned and held; 10k and 100k only) -- and read+collate samples/s
  against the tiny training step's consumption at the same lengths.

Synthetic data: conversations of ~50 text tokens and one assistant stream of 300-380 frames (8 codebooks),
so ~400 positions after materialize. The codes come from a pool of 1,000 .npy files referenced in turn (the
packer still reads and checks one file per line; only the disk footprint is saved). The 1M corpus is the
100k corpus's shards tiled ten times: symlinks named as new shards and a manifest listing them (opening
costs the same per shard; each shard's bytes are still distinct files to the reader).
Each open is measured in a fresh process (RssAnon from /proc/self/status: page cache does not count).

Measured 2026-12-02 on the project's 2-core machine at load 6-10 (the table is in README "Benchmarks"):
RssAnon slope from 10k to 1M: 6.8 bytes per extra sample (the int32 lengths, plus the int64 epoch permutation
after the first batch). Read + collate from the packed corpus in one process: 2,199 samples/s at batch 8 (the
JSONL path: 1,776/s), against the tiny preset's training step at these lengths, which consumed 0.33 samples/s
in the same run (thread contention made that step unusually slow; the ratio stays far above 1 with any
plausible step time). The pack missed its 2,000 samples/s target (1,100): per line it parses JSON, tokenizes
three texts and reads one .npy (numpy's header parser is about a third of it); with the machine to itself,
2 workers would need <= 1 ms per line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tokenizer.json"
WORDS = ("the capital of france is paris a week has seven days water boils at one hundred degrees "
         "please answer in the language of the question what is how many are in").split()

OPEN_SNIPPET = r"""
import sys, time, json
from pathlib import Path
def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
import torch.utils.data  # imported before the baseline: module code is not data
from higgs_min.batches import BatchStream
from higgs_min.prepare.corpus import open_dataset
from higgs_min.chat import ChatEncoder
from higgs_min.prepare.corpus import verify
enc = ChatEncoder(sys.argv[2], 8, 1024, 1024)
check = sys.argv[4] if len(sys.argv) > 4 else "none"  # none | all (every shard hashed first) | lazy (on first use)
base = rss_anon()
t0 = time.perf_counter()
if check == "all":  # the trainer's start before #27
    verify(sys.argv[1], check_sources=False)
ds = open_dataset(sys.argv[1], enc, 2048, verify=check == "lazy")
t_open = time.perf_counter() - t0
rss = rss_anon() - base
stream = BatchStream(ds, 8, 1, 0, seed=0, pad_id=enc.ids["end_of_text"])
stream.next()
t_first = time.perf_counter() - t0
rss_first = rss_anon() - base
rss_total = rss_anon()
t1 = time.perf_counter()
n_read = 0
while time.perf_counter() - t1 < float(sys.argv[3]):
    n_read += len(stream.next()["sample_index"])
print(json.dumps({"n": len(ds), "open_s": t_open, "first_batch_s": t_first, "rss_anon": rss, "rss_anon_first": rss_first, "rss_total": rss_total,
                  "read_collate_per_s": n_read / (time.perf_counter() - t1)}))
"""


def synthetic_jsonl(folder: Path, n: int, pool: int = 1000, seed: int = 0) -> Path:
    """n conversations of ~400 positions (tiny preset, demo tokenizer), codes from a pool of .npy files."""
    rng = np.random.default_rng(seed)
    codes = folder / "codes"
    codes.mkdir(parents=True, exist_ok=True)
    for i in range(pool):
        if not (codes / f"{i}.npy").exists():
            np.save(codes / f"{i}.npy", rng.integers(0, 1024, (8, int(rng.integers(300, 381)))).astype(np.int16))
    path = folder / f"synthetic-{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
            f.write(json.dumps({"messages": [
                {"role": "system", "content": words(8)}, {"role": "user", "content": words(10)},
                {"role": "assistant", "content": [{"type": "text", "text": words(10)},
                                                  {"type": "audio", "codes": f"codes/{i % pool}.npy"}]}]}) + "\n")
    return path


def tile(corpus: Path, out: Path, times: int) -> Path:
    """A corpus `times` as large, made of symlinks to `corpus`'s shards and a manifest listing them all."""
    m = json.loads((corpus / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for t in range(times):
        for s in m["shards"]:
            name = f"shard-{len(shards):05d}.safetensors"
            if not (out / name).exists():
                os.symlink(corpus / s["name"], out / name)
            shards.append(dict(s, name=name))
    m["shards"] = shards
    for k in ("packed", "lines", "tokens", "frames", "positions"):
        m["counts"][k] *= times
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return out


def measure_open(path: Path, read_seconds: float, check: str = "none") -> dict:
    out = subprocess.run([sys.executable, "-c", OPEN_SNIPPET, str(path), str(TOKENIZER), str(read_seconds), check],
                         cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_consumption(dataset) -> float:
    """Samples/s the tiny preset's training step (Scorer + objective + AdamW, batch 8) consumes at these lengths."""
    import torch
    from argparse import Namespace

    from higgs_min.batches import BatchStream
    from higgs_min.bench.common import median_time
    from higgs_min.config import ModelConfig
    from higgs_min.lora import apply_lora
    from higgs_min.loss import target_counts
    from higgs_min.model import HiggsAudioModel
    from higgs_min.loop import Scorer, objective

    torch.manual_seed(0)
    model = HiggsAudioModel(ModelConfig.from_preset("tiny"))
    apply_lora(model, r=16, alpha=32)
    batch = BatchStream(dataset, 8, 1, 0, seed=0, pad_id=0).next()
    scorer = Scorer(model, text_chunk=128)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    args = Namespace(text_weight=1.0, audio_weight=1.0, audio_reduction="codebook_mean")
    counts = target_counts(batch["text_targets"], batch["audio_targets"])

    def step():
        text, audio = scorer(batch)
        objective(text, audio, counts, args).backward()
        opt.step()
        opt.zero_grad()
    return 8 / median_time(step, 3, 1)


def bench_corpus(quick=False):
    from higgs_min.bench.common import row
    from higgs_min.prepare.corpus import open_dataset
    from higgs_min.chat import ChatEncoder
    from higgs_min.prepare.sanitize import load_jsonl
    from higgs_min.prepare.pack import pack

    small, large = (2_000, 20_000) if quick else (10_000, 100_000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="higgs-corpus-bench-") as tmp:
        tmp = Path(tmp)
        enc = ChatEncoder(TOKENIZER, 8, 1024, 1024)
        sizes = {}
        for n in (small, large):
            src = synthetic_jsonl(tmp, n)
            t = time.perf_counter()
            m = pack([src], TOKENIZER, tmp / f"c{n}", workers=2, shard_lines=16384)
            sizes[n] = (src, tmp / f"c{n}", time.perf_counter() - t, m)
        src, corpus, t_pack, m = sizes[large]
        rows.append(row("corpus: prepare pack throughput, 2 workers, codes given", large / t_pack, 2000, "samples/s",
                        f"{large} samples, {m['counts']['positions'] / large:.0f} positions each, "
                        f"{sum(s['bytes'] for s in m['shards']) / 1e6:.0f} MB in {len(m['shards'])} shards",
                        target=">= 2000 samples/s", better="higher"))
        tiled = tile(corpus, tmp / f"c{large * 10}", 10)
        read_s = 2.0 if quick else 5.0
        opened = {n: measure_open(sizes[n][1], read_s) for n in (small, large)}
        opened[large * 10] = measure_open(tiled, read_s)
        jsonl = {n: measure_open(sizes[n][0], read_s) for n in (small, large)}
        for n, r in opened.items():
            j = jsonl.get(n)
            rows.append(row(f"corpus: open + first batch, packed vs JSONL path, {n} samples" + (
                " (tiled)" if n == large * 10 else ""), r["first_batch_s"],
                            j["first_batch_s"] if j else float("nan"), "s", f"{n} samples of ~400 positions",
                            target="open <= 1 s at 1M", open_s=r["open_s"], jsonl_open_s=j and j["open_s"]))
            rows.append(row(f"corpus: RssAnon added by opening, per sample, packed vs JSONL path, {n} samples",
                            r["rss_anon"] / n, j["rss_anon"] / n if j else float("nan"), "B/sample",
                            f"{n} samples; packed total {r['rss_anon'] / 2**20:.1f} MiB after open, "
                            f"{r['rss_anon_first'] / 2**20:.1f} MiB after the first batch",
                            target="<= 64 B/sample + O(batch)"))
        load0, tiled_manifest = os.getloadavg()[0], (tiled / "manifest.json").read_text()
        starts = {"all": [], "lazy": []}
        for check in ("all", "lazy") * 2:  # alternated, each a fresh process
            starts[check].append(measure_open(tiled, 0.0, check)["first_batch_s"])
        rows.append(row(f"corpus: start with verification, open + first batch, {large * 10} samples (tiled): each "
                        "shard hashed before its first sample vs every shard hashed first", min(starts["lazy"]),
                        min(starts["all"]), "s", f"{large * 10} samples, {len(json.loads(tiled_manifest)['shards'])} "
                        "shards", target="< 5 s", load_avg=(load0, os.getloadavg()[0])))
        big, one = opened[large * 10], opened[small]
        slope = (big["rss_anon"] - one["rss_anon"]) / (large * 10 - small)
        rows.append(row(f"corpus: RssAnon slope, bytes per extra sample, {small} -> {large * 10} samples (packed)",
                        slope, 64, "B/sample", "(RssAnon after open at 1M - at 10k) / 990k samples",
                        target="<= 64 B/sample"))
        rows.append(row(f"corpus: process RssAnon after open + first batch, {large * 10} vs {small} samples",
                        big["rss_total"] / 2**20, one["rss_total"] / 2**20, "MiB",
                        "whole process (torch imported), one rank", target="ratio <= 1.5"))
        ds = open_dataset(sizes[large][1], enc, 2048)
        consume = step_consumption(ds)
        rows.append(row("corpus: read+collate samples/s (packed, 1 process) vs tiny training step consumption",
                        opened[large]["read_collate_per_s"], consume, "samples/s",
                        f"batch 8, ~400 positions; JSONL path reads {jsonl[large]['read_collate_per_s']:.0f}/s",
                        target="ratio >> 1", better="higher"))
        t = time.perf_counter()
        load_jsonl(sizes[small][0], enc, 2048)
        rows.append(row(f"corpus: the old eager load_jsonl (every sample materialized), {small} samples",
                        time.perf_counter() - t, opened[small]["first_batch_s"], "s",
                        f"{small} samples; vs packed open + first batch", target="(reference)"))
    return rows
