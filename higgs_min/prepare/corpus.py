"""A packed corpus: the Plans of many conversations in memory-mapped shards, opened in O(shards).

    CORPUS/
      shard-00000.safetensors   one fixed range of source lines (see pack.py); flat arrays, n samples:
          tokens          int32 (Σ N_i,)       Plan.tokens of every sample, concatenated
          flags           uint8 (Σ N_i,)       Plan.flags
          codes           int16 (Σ F_i, K)     Plan.codes (raw codes, BEFORE the delay pattern)
          segments        int32 (Σ S_i, 2)     Plan.segments (frames, role index)
          token_offsets   int64 (n + 1,)       sample i's tokens are tokens[token_offsets[i]:token_offsets[i+1]]
          frame_offsets   int64 (n + 1,)       … codes, likewise
          segment_offsets int64 (n + 1,)       … segments, likewise
          lengths         int32 (n,)           positions after materialize (what the sampler needs)
          source          int32 (n,)           index into the manifest's sources
          line            int32 (n,)           1-based line in that source
      manifest.json             written last; a folder without it is never a corpus

A sample is `materialize(read(i))`: the same function as the JSONL path's `materialize(plan(line))`,
so the two cannot drift apart. Opening reads the manifest, stats each shard, parses each shard's
header and concatenates the `lengths` arrays: no sample is built to learn its length, and the
resident memory is ~4-8 bytes per sample. `verify` hashes every shard against the manifest; a dataset opened
with verify=True (the trainer, unless --no-verify-data) hashes each shard before the first of its samples is
built, so start-up stays O(shards) in stat calls and headers, whatever the corpus's size.

manifest.json holds the format version; the tokenizer's sha256, vocabulary size and special ids; the
codebook count and size and the audio tokenizer that made the codes (`codec`; a mix is refused at pack);
every source's path, bytes, sha256 and line count; counts packed / rejected / skipped by reason; each
shard's name, samples, bytes, sha256. Opening checks the tokenizer, codebook count and size against this
run's model and tokenizer (a mismatch names both sides); a truncated shard is an error at open naming it; a
flipped byte is caught by `prepare verify` and, in training, by the full sha256 of the shard before any of
its samples is used (on every rank, skipped with --no-verify-data), naming the shard. Shards are memory-mapped; samples are built
in `__getitem__`. A test compares every field of every demo sample on the corpus and JSONL paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from higgs_min.atomic import HeaderError, read_safetensors_header
from higgs_min.manifest import sha256_file
from higgs_min.chat import ChatEncoder
from higgs_min.data import Plan, materialize
from higgs_min.prepare.sanitize import LoadReport, read_jsonl
from higgs_min.schema import DataError

log = logging.getLogger(__name__)

FORMAT = "higgs_min-corpus"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8}
# name -> (dtype, trailing shape: "K" for codebooks), for the header checks at open
ARRAYS = {"tokens": ("I32", ()), "flags": ("U8", ()), "codes": ("I16", ("K",)), "segments": ("I32", (2,)),
          "token_offsets": ("I64", ()), "frame_offsets": ("I64", ()), "segment_offsets": ("I64", ()),
          "lengths": ("I32", ()), "source": ("I32", ()), "line": ("I32", ())}


class CorpusError(DataError):
    """A packed corpus that cannot be used as it is (names the folder, file and what is wrong)."""


# ----------------------------------------------------------------------------- shard file format

def shard_bytes(arrays: dict[str, np.ndarray]) -> list:
    """The safetensors layout (u64 header length | JSON header | raw little-endian data), widest dtype
    first so every array is aligned to its item size when memory-mapped. Returns byte chunks."""
    names = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    code = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset = {"__metadata__": {"format": FORMAT, "version": str(VERSION)}}, 0
    for name in names:
        a = arrays[name]
        header[name] = {"dtype": code[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)) + head] + [np.ascontiguousarray(arrays[n]).astype(
        arrays[n].dtype.newbyteorder("<"), copy=False).tobytes() for n in names]


def read_header(path: Path, size: int) -> tuple[int, dict]:
    """(data start, header) of a shard, checked against the file size. Raises CorpusError naming the shard."""
    try:
        header, start = read_safetensors_header(path, size, max_header=1 << 20)
    except HeaderError as e:
        raise CorpusError(f"{path}: {e} ({'truncated' if e.truncated else 'damaged'}?)") from e
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the shard header: {e}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end != size:
        raise CorpusError(f"{path}: header describes {start + end} bytes, the file has {size} (truncated or damaged)")
    return start, header


class Shard:
    """One shard's arrays as read-only views of one memory map (mapped on first use)."""

    def __init__(self, path: Path, size: int, samples: int, K: int):
        self.path, self.samples = path, samples
        self.start, self.header = read_header(path, size)
        for name, (dtype, tail) in ARRAYS.items():
            h = self.header.get(name)
            want = tuple(K if t == "K" else t for t in tail)
            if h is None or h["dtype"] != dtype or tuple(h["shape"][1:]) != want:
                raise CorpusError(f"{path}: array {name!r} is {h and (h['dtype'], h['shape'])}, "
                                  f"expected {dtype} with trailing shape {list(want)}")
        if self.header["lengths"]["shape"][0] != samples or self.header["token_offsets"]["shape"][0] != samples + 1:
            raise CorpusError(f"{path}: holds {self.header['lengths']['shape'][0]} samples, the manifest says {samples}")
        self._arrays = None

    def array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._arrays = {}
            for k, h in self.header.items():
                if k == "__metadata__":
                    continue
                a, b = h["data_offsets"]
                dt = np.dtype(DTYPES[h["dtype"]]).newbyteorder("<")
                self._arrays[k] = np.frombuffer(mm, dtype=dt, count=(b - a) // dt.itemsize,
                                                offset=self.start + a).reshape(h["shape"])
        return self._arrays[name]

    def plan(self, j: int) -> Plan:
        t0, t1 = self.array("token_offsets")[j:j + 2]
        f0, f1 = self.array("frame_offsets")[j:j + 2]
        s0, s1 = self.array("segment_offsets")[j:j + 2]
        return Plan(int(self.array("line")[j]), np.array(self.array("tokens")[t0:t1]),
                    np.array(self.array("flags")[t0:t1]), np.array(self.array("codes")[f0:f1]),
                    np.array(self.array("segments")[s0:s1]))

    def __getstate__(self):  # a DataLoader worker maps the file itself
        return {**self.__dict__, "_arrays": None}


# ----------------------------------------------------------------------------- opening

def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CorpusError(f"{folder}: not a folder (a packed corpus is a folder made by `prepare pack`)")
    if not path.exists():
        from higgs_min.prepare.convert import file_hint  # an LJSpeech folder or a folder of wavs: convert it
        hint = file_hint(folder, b"")
        if hint:
            raise CorpusError(f"{folder}: not a packed corpus (no {MANIFEST}){hint}")
        raise CorpusError(f"{folder}: no {MANIFEST}, so not a corpus (an unfinished pack?); "
                          f"pack it with: python -m higgs_min.prepare pack --data DATA.jsonl --tokenizer T --out {folder}")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: cannot read the manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CorpusError(f"{path}: format {m.get('format') if isinstance(m, dict) else None!r} version "
                          f"{m.get('version') if isinstance(m, dict) else None!r}; this code reads {FORMAT!r} "
                          f"version {VERSION}")
    return m


def check_identity(m: dict, folder: Path, encoder: ChatEncoder, tokenizer_sha256: str) -> None:
    """The corpus's token ids and codes mean what this run's tokenizer and model mean, or a clear error."""
    tok, audio = m["tokenizer"], m["audio"]
    if tok["sha256"] != tokenizer_sha256:
        raise CorpusError(f"{folder}: packed with tokenizer sha256 {tok['sha256'][:16]}… ({tok['vocab_size']} tokens, "
                          f"from {tok['path']}); this run's tokenizer {encoder.tokenizer_path} has sha256 "
                          f"{tokenizer_sha256[:16]}… ({encoder.tok.get_vocab_size()} tokens): repack with it, or "
                          f"train with --tokenizer {tok['path']}")
    # Plans are one layout's token sequences (v2 ChatML or v3 TTS; the same tokenizer file can serve both). A
    # manifest without the field was packed before v3 existed, so in v2's layout.
    layout = m.get("layout", "higgs-v2-chatml")
    if layout != encoder.layout:
        raise CorpusError(f"{folder}: packed in the {layout} layout; this model reads {encoder.layout}: pack the "
                          f"JSONL again for this model (python -m higgs_min.prepare pack ... with its tokenizer)")
    if tok["special_ids"] != encoder.ids:
        raise CorpusError(f"{folder}: special ids {tok['special_ids']} differ from this run's {encoder.ids}")
    if (audio["num_codebooks"], audio["codebook_size"]) != (encoder.K, encoder.C):
        raise CorpusError(f"{folder}: packed with {audio['num_codebooks']} codebooks of {audio['codebook_size']}; "
                          f"the model has {encoder.K} codebooks of {encoder.C}")


class PackedDataset:
    """A packed corpus: __len__, lengths (numpy), __getitem__(i) -> Sample, report, where(i)."""

    def __init__(self, folder: str | Path, encoder: ChatEncoder, max_length: int, tokenizer_sha256: str | None = None,
                 verify: bool = False):
        self.folder = folder = Path(folder)
        m = self.manifest = read_manifest(folder)
        check_identity(m, folder, encoder, tokenizer_sha256 or sha256_file(encoder.tokenizer_path))
        if not encoder.streams.delay:  # its stored lengths assume the delay pattern
            raise DataError(f"{folder}: a packed corpus with use_delay_pattern false is not supported; "
                            "train on the JSONL file instead")
        self.K, self.streams = encoder.K, encoder.streams
        self.shards = []
        for s in m["shards"]:
            path = folder / s["name"]
            try:
                size = path.stat().st_size
            except OSError as e:
                raise CorpusError(f"{path}: listed in the manifest, cannot stat: {e}") from e
            if size != s["bytes"]:
                raise CorpusError(f"{path}: {size} bytes, the manifest says {s['bytes']} (truncated or replaced)")
            self.shards.append(Shard(path, size, s["samples"], self.K))
        self.starts = np.cumsum([0] + [s.samples for s in self.shards]).astype(np.int64)
        lengths = np.concatenate([np.asarray(s.array("lengths")) for s in self.shards]) if self.shards else (
            np.zeros(0, np.int32))
        keep = lengths <= max_length
        long = int((~keep).sum())
        self.index = None if not long else np.flatnonzero(keep).astype(np.int32 if len(keep) < 2**31 else np.int64)
        self.lengths = lengths if not long else lengths[keep]
        skipped = dict(m["counts"]["skipped"])
        skipped.update({f"rejected at pack: {r}": n for r, n in m["counts"]["rejected"].items()})
        if long:
            skipped["longer than max length"] = long
        self.load_report = LoadReport(len(self.lengths), skipped)
        self.report = (f"{folder}: {self.load_report.summary()}, {len(self.shards)} shards, "
                       f"codec {m['audio'].get('codec') or 'not recorded'}")
        if not len(self.lengths):
            raise CorpusError(f"{folder}: no usable sample ({self.load_report.summary()})")
        # verify: 1 = this shard's sha256 matched. An anonymous shared mapping, so that DataLoader workers
        # (forked) and the process that checks batches before handing them to them (BatchStream) share it.
        self.verified = np.frombuffer(mmap.mmap(-1, max(1, len(self.shards))), np.uint8) if verify else None

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard number, sample within it) of sample i."""
        if not 0 <= i < len(self.lengths):
            raise IndexError(i)
        g = int(self.index[i]) if self.index is not None else i
        s = int(np.searchsorted(self.starts, g, side="right")) - 1
        return s, g - int(self.starts[s])

    def check_shard(self, k: int) -> None:
        """Hash shard k against the manifest unless done (verify=True only). Raises CorpusError naming it."""
        if self.verified is not None and not self.verified[k]:
            check_shard_sha256(self.shards[k].path, self.manifest["shards"][k]["sha256"])
            self.verified[k] = 1

    def check_samples(self, indices) -> None:
        """Every shard holding one of these samples verified (a batch, before it is handed to a worker); the
        shards not yet verified are hashed in parallel threads (sha256 and file reads release the GIL)."""
        if self.verified is None:
            return
        todo = sorted({k for k in (self._locate(int(i))[0] for i in indices) if not self.verified[k]})
        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            list(pool.map(self.check_shard, todo))  # raises the first damaged shard's CorpusError

    def plan(self, i: int, check: bool = True) -> Plan:
        """Sample i's Plan, its shard verified first (check=False: a look at what the data holds, never trained on)."""
        k, j = self._locate(i)
        if check:
            self.check_shard(k)
        return self.shards[k].plan(j)

    def __getitem__(self, i: int):
        return materialize(self.plan(i), self.streams)

    def where(self, i: int) -> str:
        k, j = self._locate(i)
        shard = self.shards[k]
        return f"{self.manifest['sources'][int(shard.array('source')[j])]['path']}:{int(shard.array('line')[j])}"

    def __getstate__(self):  # a spawned worker gets a copy of the flags (it verifies what it finds unverified)
        return {**self.__dict__, "verified": None if self.verified is None else np.array(self.verified)}


class JsonlDataset:
    """A JSONL file through the same per-line code and the same `materialize` as the packer: the whole file is
    checked in one pass (every bad line collected), then samples are built on __getitem__ from their Plans."""

    def __init__(self, path: str | Path, encoder: ChatEncoder, max_length: int, skip_bad: bool = False,
                 audio_root: Path | None = None, max_bad_fraction: float = 0.01, report_path: Path | None = None):
        self.path = path = Path(path)
        self.K, self.streams = encoder.K, encoder.streams
        # sanitize.read_jsonl: every line through the one per-line boundary, all bad lines in one report
        self.plans, rejected = read_jsonl(path, encoder, max_length, skip_bad, audio_root, max_bad_fraction,
                                          report_path)
        skipped = rejected.counts()
        self.lengths = np.array([p.length(self.streams) for p in self.plans], dtype=np.int32)
        self.load_report = LoadReport(len(self.plans), skipped)
        codec = one_codec(self.plans, path)
        self.report = f"{path}: {self.load_report.summary()}, codec {codec or 'not recorded'}"
        if not self.plans:
            raise DataError(f"{path}: no usable sample ({self.load_report.summary()})")

    def __len__(self) -> int:
        return len(self.plans)

    def plan(self, i: int, check: bool = True) -> Plan:  # (every line was checked when the file was read)
        return self.plans[i]

    def __getitem__(self, i: int):
        return materialize(self.plans[i], self.streams)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.plans[i].index}"


def one_codec(plans, path: Path) -> str | None:
    """The audio tokenizer named by the items' "codec" fields (prepare writes them), or None when none is
    recorded; codes of different tokenizers (or some recorded, some not) are refused, naming the first line of each."""
    first = {}
    for p in plans:
        for c in p.codecs:
            first.setdefault(c, p.index)
    if len(first) > 1:
        raise DataError(f"{path}: the audio items were made by different audio tokenizers (codec fields): " + "; ".join(
            f"{c or 'none recorded'} (first at line {n})" for c, n in first.items()) + "; prepare them with one")
    return next(iter(first), None)


def open_dataset(path: str | Path, encoder: ChatEncoder, max_length: int, skip_bad: bool = False,
                 verify: bool = False, **jsonl):
    """A packed corpus folder or a JSONL file, as a dataset: __len__, lengths, __getitem__(i) -> Sample, report.
    Samples longer than `max_length` are left out (counted in `report`). `jsonl`: read_jsonl's options.
    verify: a corpus's shards are each hashed before the first of their samples is built."""
    path = Path(path)
    if path.is_dir():
        return PackedDataset(path, encoder, max_length, verify=verify)
    return JsonlDataset(path, encoder, max_length, skip_bad, **jsonl)  # audio_root, max_bad_fraction, report_path


# ----------------------------------------------------------------------------- verify

def check_shard_sha256(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise CorpusError(f"{path}: sha256 {digest[:16]}… differs from the manifest's {expected[:16]}… (damaged; repack)")


def verify(folder: str | Path, check_sources: bool = True) -> dict:
    """Hash every shard against the manifest (and the sources, when present here). Raises CorpusError
    naming the first damaged shard or changed source; returns {'shards', 'samples', 'bytes', 'notes'}."""
    folder = Path(folder)
    m = read_manifest(folder)
    total, notes = 0, []
    for s in m["shards"]:
        path = folder / s["name"]
        if not path.exists():
            raise CorpusError(f"{path}: listed in the manifest, missing")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise CorpusError(f"{path}: {size} bytes, the manifest says {s['bytes']} (truncated or replaced)")
        check_shard_sha256(path, s["sha256"])
        total += size
    for src in m["sources"] if check_sources else []:
        p = Path(src["path"])
        if not p.exists():
            notes.append(f"source {p} is not here; not checked")
            continue
        if p.stat().st_size != src["bytes"] or sha256_file(p) != src["sha256"]:
            raise CorpusError(f"{folder}: source {p} changed after packing (sha256 {src['sha256'][:16]}… at pack time); "
                              f"the corpus no longer matches it: repack")
    return {"shards": len(m["shards"]), "samples": m["counts"]["packed"], "bytes": total, "notes": notes}


def verify_main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.prepare verify",
                                 description="Check a packed corpus: every shard's sha256 against its manifest, "
                                             "and whether its sources changed since packing.")
    ap.add_argument("corpus", type=Path, help="the corpus folder")
    ap.add_argument("--no-sources", action="store_true", help="do not compare the source files' sha256")
    args = ap.parse_args(argv)
    try:
        r = verify(args.corpus, not args.no_sources)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"{args.corpus}: ok, {r['samples']} samples in {r['shards']} shards, {r['bytes'] / 1e6:.1f} MB verified")
    return 0
