"""A checkpoint's manifest, and a folder checked against it: the reading half of `checkpoint.py`.

`manifest.json` (written last by checkpoint.save, in canonical JSON) lists every other file of the folder:

    {"format": 2, "step": 300, "block_bytes": 33554432,
     "files": {name: {"bytes": 315000000, "sha256": [sha256 of bytes 0..32 MiB, of 32..64 MiB, ...]}}}

Format 2 records one sha256 per block of `block_bytes` (a file of at most one block: one sha256, that of the
whole file; an empty file: the sha256 of nothing). Why blocks: one sha256 of a file runs on one core, byte
after byte, so the largest file (AdamW's moments, 2/3 of a LoRA checkpoint) bounded both the save and the
resume; blocks are hashed in parallel, on every core, while the file is written or read. Every byte is still
covered by exactly one sha256, in its place (the list is in file order and the sizes are checked).
Format 1 (checkpoints written before) records one sha256 per file ("sha256": hex): read as one block per file.

A folder is a checkpoint if and only if its manifest verifies. Loading maps each file (copy-on-write), hashes
its blocks (parallel threads), and builds the tensors on that same mapping once every hash matches
(`read_verified`): each byte is read from the disk once and hashed once, and nothing is restored from an
unverified checkpoint. A resume hashes the checkpoint it restores once on rank 0: the read that chose it
(`verify(keep=True)`) is the one `read_verified` restores from.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from higgs_min.atomic import SAFETENSORS_DTYPES, json_bytes, read_safetensors_header, sha256_hex

FORMAT = 2
READABLE = (1, 2)
BLOCK_BYTES = 32 << 20  # 473 MB of a 3B LoRA run state: 15 blocks, enough to keep every core busy to the end
MANIFEST = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def hash_threads() -> int:
    """One hashing thread per core this process may run on (sha256 releases the GIL)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def block_ranges(nbytes: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of each block of a file of `nbytes`; one empty block for an empty file (as atomic.write_file
    cuts them)."""
    return [(s, min(s + block, nbytes)) for s in range(0, max(nbytes, 1), block)]


def make(step: int, files: dict) -> dict:
    """The manifest of a checkpoint: files = {name: {"bytes", "sha256": [block hashes]}}."""
    return {"format": FORMAT, "step": step, "block_bytes": BLOCK_BYTES, "files": files}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers
    return h.hexdigest()


# ----------------------------------------------------------------------------- checking a folder

def _expected(manifest: dict) -> dict:
    """name -> (bytes, [(start, end) of each block], [its sha256]), from either format; ValueError if malformed."""
    files, out = manifest["files"], {}
    block = manifest.get("block_bytes")
    if manifest["format"] == 2 and not (isinstance(block, int) and block > 0):
        raise ValueError(f"block_bytes {block!r}")
    for name, meta in files.items():
        n, digests = meta["bytes"], meta["sha256"]
        if manifest["format"] == 1:  # one sha256 of the whole file
            digests = [digests] if isinstance(digests, str) else None
        ranges = block_ranges(n, block if manifest["format"] == 2 else max(n, 1))
        if not (isinstance(n, int) and isinstance(digests, list) and len(digests) == len(ranges)
                and all(isinstance(d, str) for d in digests)):
            raise ValueError(f"{name}: {n!r} bytes with {len(digests) if isinstance(digests, list) else 'no'} "
                             f"block hashes")
        out[name] = (n, ranges, digests)
    return out


def _manifest(folder: Path) -> tuple[dict, dict]:
    """(the manifest, _expected of it), after the checks that read no data file but their names and sizes."""
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if not mpath.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
        files = manifest["files"]
        if manifest.get("format") not in READABLE or not isinstance(files, dict) or not files:
            raise ValueError(f"format {manifest.get('format')!r} (this version reads {READABLE}) "
                             f"or an empty file list")
        expected = _expected(manifest)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest: {e}") from e
    # The manifest is written in one canonical form, so any edit to it shows, even one
    # that leaves the JSON valid and the same in meaning.
    if raw != json_bytes(manifest):
        raise CheckpointError(f"{mpath}: manifest is not byte-identical to its canonical form (edited or corrupted)")
    m = CHECKPOINT_RE.match(folder.name)
    if m and manifest.get("step") != int(m.group(1)):
        raise CheckpointError(f"{mpath}: manifest says step {manifest.get('step')}, folder says {m.group(1)}")
    for name, (nbytes, _, _) in expected.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{folder}: {name} is listed in the manifest but missing")
        size = p.stat().st_size
        if size != nbytes:
            raise CheckpointError(f"{folder}: {name} has {size} bytes, manifest says {nbytes}")
    extra = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        raise CheckpointError(f"{folder}: files not in the manifest: {extra}")
    return manifest, expected


def verify(folder: str | Path, hashes: bool = True, keep: bool = False) -> dict:
    """Check a checkpoint folder against its manifest. Returns the manifest; raises CheckpointError.

    hashes=False checks everything but the sha256 of the data (manifest form, step, names, sizes, no extra file).
    keep=True: the verified read is kept for the next `read_verified` of this folder (a resume chooses its
    checkpoint, then loads it: the chosen one is hashed once, not twice).
    """
    folder = Path(folder)
    manifest, expected = _manifest(folder)
    if hashes:
        stamp = _stamp(folder)
        data = _read_all(folder, expected)
        _kept.clear()
        if keep:
            _kept[folder.resolve()] = (stamp, data)
    return manifest


def _read_hashed(path: Path, nbytes: int, ranges: list, pool) -> tuple:
    """(the file mapped into memory copy-on-write, a future of the sha256 of each block, hashed in `pool`):
    each page is read from the disk once, by the hashing, and the tensors built on the mapping see those
    same pages (no second read, no copy)."""
    if nbytes == 0:
        return bytearray(), [pool.submit(sha256_hex, [])]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: in-place updates never reach the file
    if len(mm) != nbytes:
        raise CheckpointError(f"{path}: {len(mm)} bytes, manifest says {nbytes} (changed while reading?)")
    if hasattr(mm, "madvise"):  # ask for the whole file now: disk reads overlap the hashing
        mm.madvise(mmap.MADV_WILLNEED)
    view = memoryview(mm)
    return mm, [pool.submit(sha256_hex, [view[s:e]]) for s, e in ranges]


def _read_all(folder: Path, expected: dict) -> dict:
    """name -> buffer of every file, its blocks hashed in parallel (largest file first) and checked against
    the manifest; raises CheckpointError naming the first file that does not match (after all were hashed)."""
    order = sorted(expected, key=lambda n: -expected[n][0])
    with ThreadPoolExecutor(hash_threads()) as pool:  # leaving the block waits for every hash
        read = {n: _read_hashed(folder / n, expected[n][0], expected[n][1], pool) for n in order}
    for name, (_, _, digests) in expected.items():
        if [f.result() for f in read[name][1]] != digests:
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")
    return {name: read[name][0] for name in expected}


# A verified read kept by verify(keep=True), at most one, for the read_verified that follows it. It stands for
# the folder only while every file in it is the same file (inode, size, mtime) as when it was hashed.
_kept: dict = {}


def _stamp(folder: Path) -> tuple:
    return tuple((p.name, st.st_ino, st.st_size, st.st_mtime_ns)
                 for p in sorted(folder.iterdir()) for st in (p.stat(),))


def read_verified(folder: str | Path) -> dict:
    """Every file of a checkpoint, read once and checked against the manifest: name -> buffer (a private
    memory map; bytes(buffer) for the JSON files).

    Nothing is returned unless all files match, so a caller restores state only from a whole, verified
    checkpoint: the buffers are the very pages that were hashed, whether hashed here or by the verify(keep=True)
    that chose this folder (then nothing is hashed again, unless a file changed since). Raises CheckpointError.
    """
    folder = Path(folder)
    kept = _kept.pop(folder.resolve(), None)
    if kept is not None and folder.is_dir() and kept[0] == _stamp(folder):
        return kept[1]
    return _read_all(folder, _manifest(folder)[1])


def tensors_from_safetensors(buf, source: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (the layout `safetensors_chunks` writes) into tensors that share `buf`."""
    by_code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    try:
        header, base = read_safetensors_header(buf)
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = by_code[meta["dtype"]], meta["shape"], meta["data_offsets"]
            count = end - start
            numel = 1
            for d in shape:
                numel *= d
            item = torch.empty((), dtype=dtype).element_size()
            if not 0 <= start <= end <= len(buf) - base or count != numel * item:
                raise ValueError(f"tensor {name!r}: offsets {start}..{end} do not fit shape {shape}")
            t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start) if numel else \
                torch.empty(0, dtype=dtype)
            out[name] = t.view(shape)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: not a safetensors file we can read: {e}") from e
    return out
