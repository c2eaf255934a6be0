"""`prepare pack`: JSONL conversations (codes already prepared) -> a packed corpus folder (see corpus.py).

    python -m higgs_min.prepare pack --data a.jsonl [b.jsonl ...] --tokenizer tokenizer.json --out CORPUS/

Each source is cut into fixed ranges of --shard-lines lines, one shard each, so the output is the same
bytes whatever --workers is, and packing twice gives byte-identical shards. Everything is written into
.CORPUS.partial/ (each shard to a temp name, fsynced, renamed), then manifest.json (last), then the folder
is renamed to CORPUS: a pack killed at any moment leaves nothing that looks like a corpus, and the next
run removes the partial folder and starts over.

Every line is checked in the one pass; the rejected ones go to CORPUS.rejected.jsonl ({file, line, field, reason,
detail} each, as the trainer writes them; the first 20 logged, counts per reason). Strict (default): any rejected line -> exit 1, no
corpus. --skip-bad-samples publishes the good ones with the counts in the manifest, unless more than
--max-bad-fraction of the lines are bad (a wrong codes folder or tokenizer makes most lines bad).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from higgs_min import atomic
from higgs_min.manifest import sha256_file
from higgs_min.prepare.corpus import FORMAT, MANIFEST, VERSION, CorpusError, shard_bytes
from higgs_min.chat import ChatEncoder
from higgs_min.schema import DataError
from higgs_min.prepare.sanitize import RejectReport, Rejection, line_to_plan
from higgs_min.v3.layout import V3Encoder

# --layout: which model family's samples the Plans are (the manifest records it; training checks it)
ENCODERS = {"v2": ChatEncoder, "v3": V3Encoder}

log = logging.getLogger("higgs_min.prepare.pack")
SHARD_NAME = "shard-{:05d}.safetensors"


# ----------------------------------------------------------------------------- one shard

_ENCODER = None  # set once per worker process


def _init_worker(tokenizer: str, K: int, C: int, layout: str = "v2"):
    global _ENCODER
    _ENCODER = ENCODERS[layout](tokenizer, K, C, vocab_size=2**31 - 1)


def pack_shard(task: dict) -> dict:
    """Plan every line of one range and write the shard into the staging folder. Returns its record."""
    enc = _ENCODER
    path, K = Path(task["path"]), enc.K
    with open(path, "rb") as f:
        f.seek(task["byte_start"])
        raw = f.read(task["byte_end"] - task["byte_start"])
    lines = raw.split(b"\n")
    plans, rejected, skipped, codecs = [], [], Counter(), Counter()
    for k, line in enumerate(lines[:task["line_end"] - task["line_start"]]):
        line_no = task["line_start"] + k
        if not line.strip():
            continue
        # the one per-line boundary (sanitize); no length limit here: --max-length is applied when training opens it
        plan = line_to_plan(line, line_no, path, enc, 2**31 - 1, task["audio_root"] and Path(task["audio_root"]))
        if isinstance(plan, Rejection):  # {file, line, field, reason (short, counted), detail}
            if plan.filtered:
                skipped[plan.reason] += 1
            else:
                rejected.append(plan)
            continue
        for c in plan.codecs:
            codecs[c or ""] += 1
        plans.append(plan)
    n = len(plans)
    cat = lambda xs, dt, shape=(0,): np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
    offsets = lambda sizes: np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)  # noqa: E731
    arrays = {
        "tokens": cat([p.tokens for p in plans], np.int32), "flags": cat([p.flags for p in plans], np.uint8),
        "codes": cat([p.codes for p in plans], np.int16, (0, K)),
        "segments": cat([p.segments for p in plans], np.int32, (0, 2)),
        "token_offsets": offsets([len(p.tokens) for p in plans]),
        "frame_offsets": offsets([len(p.codes) for p in plans]),
        "segment_offsets": offsets([len(p.segments) for p in plans]),
        "lengths": np.array([p.length(enc.streams) for p in plans], dtype=np.int32),
        "source": np.full(n, task["source"], dtype=np.int32),
        "line": np.array([p.index for p in plans], dtype=np.int32),
    }
    name = SHARD_NAME.format(task["shard"])
    staging = Path(task["staging"])
    digest = atomic.replace_file(staging / name, shard_bytes(arrays))
    return {"name": name, "samples": n, "bytes": (staging / name).stat().st_size, "sha256": digest,
            "source": task["source"], "lines": [task["line_start"], task["line_end"] - 1],
            "rejected": [asdict(r) for r in rejected], "skipped": dict(skipped), "codecs": dict(codecs),
            "tokens": int(len(arrays["tokens"])), "frames": int(len(arrays["codes"])),
            "positions": int(arrays["lengths"].sum())}


# ----------------------------------------------------------------------------- the whole pack

def line_ranges(path: Path, shard_lines: int):
    """[(first line, end line, byte start, byte end)] of fixed --shard-lines ranges (1-based lines)."""
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    block = 1 << 26  # scanned in blocks: a temporary bool array of the whole file would be its size again
    ends = np.concatenate([np.flatnonzero(data[i:i + block] == 10) + i for i in range(0, len(data), block)]
                          or [np.zeros(0, np.int64)])  # the newline of each line
    if len(data) and (not len(ends) or ends[-1] != len(data) - 1):
        ends = np.append(ends, len(data))  # a last line without a newline
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    out = []
    for a in range(0, len(ends), shard_lines):
        b = min(a + shard_lines, len(ends))
        out.append((a + 1, b + 1, int(starts[a]), int(ends[b - 1])))
    return out, len(ends)


def pack(sources: list[Path], tokenizer: Path, out: Path, num_codebooks: int = 8, codebook_size: int = 1024,
         skip_bad: bool = False, max_bad_fraction: float = 0.01, workers: int = 1, shard_lines: int = 16384,
         overwrite: bool = False, audio_root: Path | None = None, layout: str = "v2") -> dict:
    """Pack `sources` into `out`; returns the manifest. Raises CorpusError (nothing published) on failure."""
    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    report_path = out.parent / f"{out.name}.rejected.jsonl"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CorpusError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    if staging.exists():
        log.warning("removing %s, left by a pack that did not finish", staging)
        shutil.rmtree(staging)
    sources = [Path(s).resolve() for s in sources]
    for s in sources:
        if not s.is_file():
            raise CorpusError(f"{s}: --data file does not exist")
    enc = ENCODERS[layout](tokenizer, num_codebooks, codebook_size, vocab_size=2**31 - 1)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    # --overwrite (or an empty folder): the old folder is swapped out once the new one is complete
    with atomic.staged_folder(out, replace=out.exists(), tmp=staging):
        tasks, source_records = [], []
        for i, src in enumerate(sources):
            ranges, n_lines = line_ranges(src, shard_lines)
            source_records.append({"path": str(src), "bytes": src.stat().st_size, "sha256": sha256_file(src),
                                   "lines": n_lines})
            for a, b, s0, s1 in ranges:
                tasks.append({"path": str(src), "source": i, "line_start": a, "line_end": b, "byte_start": s0,
                              "byte_end": s1, "shard": len(tasks), "staging": str(staging),
                              "audio_root": str(audio_root) if audio_root else None})
        args = (str(tokenizer), num_codebooks, codebook_size, layout)
        if workers > 1 and len(tasks) > 1:
            with multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), _init_worker, args) as pool:
                records = list(pool.imap(pack_shard, tasks))
        else:
            _init_worker(*args)
            records = [pack_shard(t) for t in tasks]
        manifest = _manifest(records, source_records, enc, tokenizer, num_codebooks, codebook_size, shard_lines)
        report = RejectReport()  # the same rows, counts and log lines as the trainer's JSONL path
        for rec in records:
            for r in rec["rejected"]:
                report.add(Rejection(**r))
        report.write(report_path)
        _check(manifest, report, records, report_path, skip_bad, max_bad_fraction)
        atomic.write_json(staging / MANIFEST, manifest)  # last: a folder with a manifest is complete
    c = manifest["counts"]
    log.info("packed %s: %d samples in %d shards (%.1f MB) from %d lines in %.1f s (%.0f samples/s); "
             "rejected %d, skipped %d", out, c["packed"], len(manifest["shards"]),
             sum(s["bytes"] for s in manifest["shards"]) / 1e6, c["lines"], time.time() - t0,
             c["packed"] / max(time.time() - t0, 1e-9), sum(c["rejected"].values()), sum(c["skipped"].values()))
    return manifest


def _manifest(records, source_records, enc, tokenizer, K, C, shard_lines) -> dict:
    codecs = Counter()
    for rec in records:
        codecs.update(rec["codecs"])
    rejected = Counter(r["reason"] for rec in records for r in rec["rejected"])
    skipped = Counter()
    for rec in records:
        skipped.update(rec["skipped"])
    return {
        "format": FORMAT, "version": VERSION, "shard_lines": shard_lines, "layout": enc.layout,
        "tokenizer": {"path": str(Path(tokenizer).resolve()), "sha256": sha256_file(Path(tokenizer)),
                      "vocab_size": enc.tok.get_vocab_size(), "special_ids": enc.ids},
        "audio": {"num_codebooks": K, "codebook_size": C, "codes_dtype": "int16", "delay_pattern": "not applied",
                  # the audio tokenizer named by the items' "codec" fields (None: not recorded); a list is a mix
                  "codec": sorted(codecs) if len(codecs) > 1 else (next(iter(codecs), "") or None)},
        "sources": source_records,
        "counts": {"lines": sum(s["lines"] for s in source_records), "packed": sum(r["samples"] for r in records),
                   "rejected": dict(sorted(rejected.items())), "skipped": dict(sorted(skipped.items())),
                   "tokens": sum(r["tokens"] for r in records), "frames": sum(r["frames"] for r in records),
                   "positions": sum(r["positions"] for r in records)},
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256", "source", "lines")} for r in records],
    }


def _check(manifest, report: RejectReport, records, report_path, skip_bad, max_bad_fraction) -> None:
    """Log the first 20 rejected lines and the counts; raise CorpusError when the pack must not be published."""
    c = manifest["counts"]
    bad = report.rows  # the filtered reasons (no supervised token) are counted skips, not in the report
    report.log_first(20, logging.ERROR)
    if bad:
        log.error("rejected %d line(s): %s; all in %s", len(bad), report.summary(), report_path)
    nonempty = c["packed"] + len(bad) + sum(c["skipped"].values())
    if bad and not skip_bad:
        raise CorpusError(f"{len(bad)} of {nonempty} lines rejected (the first: {bad[0].file}:{bad[0].line}); "
                          f"every one is in {report_path}. Nothing was published; fix them, or pass "
                          f"--skip-bad-samples to pack the good ones")
    too_many = report.check_fraction(nonempty, max_bad_fraction)
    if too_many:
        raise CorpusError(f"{too_many}; the report is {report_path}; nothing was published")
    codec = manifest["audio"]["codec"]
    if isinstance(codec, list):
        firsts = {}
        for rec in records:
            for name in rec["codecs"]:
                firsts.setdefault(name, f"shard lines {rec['lines'][0]}-{rec['lines'][1]} of source {rec['source']}")
        raise CorpusError("the audio items were made by different audio tokenizers (codec fields): " + "; ".join(
            f"{name or 'none recorded'} (first in {w})" for name, w in firsts.items()) + "; pack one kind at a time")
    if not c["packed"]:
        raise CorpusError(f"no usable sample in {c['lines']} lines")


def pack_main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.prepare pack", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="JSONL files (codes prepared)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="the tokenizer.json training will use")
    ap.add_argument("--out", type=Path, required=True, help="the corpus folder to create")
    ap.add_argument("--num-codebooks", type=int, default=8, help="codebooks K of the codes")
    ap.add_argument("--codebook-size", type=int, default=1024, help="codes per codebook C")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel packing processes "
                    "(the output does not depend on it)")
    ap.add_argument("--shard-lines", type=int, default=16384, help="source lines per shard")
    ap.add_argument("--skip-bad-samples", action="store_true", help="publish the good lines, counting the bad ones")
    ap.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail when more of the lines are bad, "
                    "even with --skip-bad-samples")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing corpus folder")
    ap.add_argument("--audio-root", type=Path, help="folder the codes paths are relative to (default: each JSONL's)")
    ap.add_argument("--layout", default="v2", choices=sorted(ENCODERS), help="the samples of which model family: "
                    "v2 (ChatML conversations, Higgs Audio v2) or v3 (the TTS prompt of Higgs Audio v3)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.shard_lines < 1 or args.workers < 1:
        ap.error("--shard-lines and --workers must be >= 1")
    try:
        pack(args.data, args.tokenizer, args.out, args.num_codebooks, args.codebook_size, args.skip_bad_samples,
             args.max_bad_fraction, args.workers, args.shard_lines, args.overwrite, args.audio_root, args.layout)
    except (CorpusError, DataError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(pack_main())
