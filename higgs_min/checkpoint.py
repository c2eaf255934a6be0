"""Checkpoints that are complete or absent, never partial.

A checkpoint is the folder `output_dir/checkpoint-{step}/` whose `manifest.json`
(written last) lists every other file with its sha256 and size. The folder
exists under that name only after all of it was written and fsynced and its names
and sizes were checked against the manifest (nothing is read back):

    .tmp-checkpoint-{step}-{random}/   write each file (sha256 of the very buffers written, hashed in a
                                       second thread while the first writes; the files in parallel threads,
                                       one per core), flush, fsync
                                       write manifest.json, fsync; fsync the folder
                                       check names and sizes against the manifest (no re-read: a read-back
                                       right after writing comes from the page cache and proves nothing
                                       about the disk; the hashes catch later damage at load and in verify)
    rename -> checkpoint-{step}/       fsync output_dir. Over an existing checkpoint-{step}: atomic.swap_in
                                       (old one aside, new one in; an error between the two renames puts
                                       the old one back, a crash there is undone by `restore_replaced` at
                                       the next start)
    latest  (temp file + rename)       names the checkpoint saved last
    best    (the same way)             names the best evaluation (--best-by; kept by --keep-last)

A folder is a checkpoint if and only if its manifest verifies. Only safetensors
and JSON are written; loading never unpickles anything. Loading maps each file
(copy-on-write), hashes it page by page, and builds the tensors on that same
mapping once every hash matches (`read_verified`): each byte is read from the
disk once and hashed once, and nothing is restored from an unverified checkpoint.
A resume hashes the checkpoint it restores once on rank 0: the read that chose it
(`verify(keep=True)`) is the one `read_verified` restores from.

    python -m higgs_min.checkpoint verify DIR
    python -m higgs_min.checkpoint list OUTPUT_DIR
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from higgs_min import atomic
from higgs_min.atomic import (SAFETENSORS_DTYPES, fsync_dir, json_bytes, read_safetensors_header,  # noqa: F401
                              safetensors_chunks, write_file)

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
REPLACED_RE = re.compile(r"^(checkpoint-\d+)\.replaced-[0-9a-f]+$")  # the old copy during a save over it


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def verify(folder: str | Path, hashes: bool = True, keep: bool = False) -> dict:
    """Check a checkpoint folder against its manifest. Returns the manifest; raises CheckpointError.

    hashes=False checks everything but the sha256 of each file (manifest form, step, names, sizes, no extra file).
    keep=True: the verified read is kept for the next `read_verified` of this folder (a resume chooses its
    checkpoint, then loads it: the chosen one is hashed once, not twice).
    """
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if not mpath.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError(f"unsupported format {manifest.get('format')!r} or empty file list")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest: {e}") from e
    # The manifest is written in one canonical form, so any edit to it shows, even one
    # that leaves the JSON valid and the same in meaning.
    if raw != json_bytes(manifest):
        raise CheckpointError(f"{mpath}: manifest is not byte-identical to its canonical form (edited or corrupted)")
    m = CHECKPOINT_RE.match(folder.name)
    if m and manifest.get("step") != int(m.group(1)):
        raise CheckpointError(f"{mpath}: manifest says step {manifest.get('step')}, folder says {m.group(1)}")
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{folder}: {name} is listed in the manifest but missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{folder}: {name} has {size} bytes, manifest says {meta['bytes']}")
    extra = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        raise CheckpointError(f"{folder}: files not in the manifest: {extra}")
    if hashes:
        stamp = _stamp(folder)
        data = _read_all(folder, files)
        _kept.clear()
        if keep:
            _kept[folder.resolve()] = (stamp, data)
    return manifest


def _read_hashed(path: Path, nbytes: int):
    """The file mapped into memory (copy-on-write) and its sha256: each page is read from the disk once, by
    the hashing, and the tensors built on the mapping see those same pages (no second read, no copy)."""
    if nbytes == 0:
        return bytearray(), hashlib.sha256().hexdigest()
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: in-place updates never reach the file
    if len(mm) != nbytes:
        raise CheckpointError(f"{path}: {len(mm)} bytes, manifest says {nbytes} (changed while reading?)")
    if hasattr(mm, "madvise"):  # ask for the whole file now: disk reads overlap the hashing below
        mm.madvise(mmap.MADV_WILLNEED)
    h, view = hashlib.sha256(), memoryview(mm)
    for pos in range(0, nbytes, 1 << 23):
        h.update(view[pos:pos + (1 << 23)])  # releases the GIL: files are hashed in parallel threads
    view.release()
    return mm, h.hexdigest()


def _read_all(folder: Path, files: dict) -> dict:
    """name -> buffer of every file, each hashed in its own thread (largest first) and checked against the
    manifest's `files`; raises CheckpointError naming the first file that does not match."""
    order = sorted(files, key=lambda n: -files[n]["bytes"])
    with ThreadPoolExecutor(min(4, len(files))) as pool:
        read = dict(zip(order, pool.map(lambda n: _read_hashed(folder / n, files[n]["bytes"]), order)))
    for name in files:
        if read[name][1] != files[name]["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")
    return {name: read[name][0] for name in files}


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
    return _read_all(folder, verify(folder, hashes=False)["files"])


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


def _nbytes(content) -> int:
    if isinstance(content, dict):
        return sum(t.numel() * t.element_size() for t in content.values())
    return len(content)


def _write_parallel(folder: Path, files: dict) -> dict:
    """Write every file into `folder`; returns the manifest's {name: {"sha256", "bytes"}}.

    One sha256 per file cannot be split across cores, but files can: each file is written (and hashed while
    written, in write_file) in its own thread, largest first. File writes and sha256 both release the GIL,
    so the adapter and the optimizer state are written and hashed at the same time, each on its own core.
    """
    def write_one(name):
        content = files[name]
        digest = write_file(folder / name, safetensors_chunks(content) if isinstance(content, dict) else content)
        return {"sha256": digest, "bytes": (folder / name).stat().st_size}

    order = sorted(files, key=lambda n: -_nbytes(files[n]))
    with ThreadPoolExecutor(min(4, len(order))) as pool:  # leaving the block waits for every write
        written = dict(zip(order, pool.map(write_one, order)))
    return {name: written[name] for name in files}


def save(output_dir: str | Path, step: int, files: dict) -> Path:
    """Atomically write `files` as output_dir/checkpoint-{step}. Returns its path.

    files: name -> bytes, or name -> {tensor name: tensor} (written as safetensors).

    On any failure the temporary folder is removed and the error re-raised with
    the path. An existing checkpoint-{step} is replaced only by a complete one (names
    and sizes checked against its manifest), and is missing only between the two
    renames of atomic.swap_in: an error there puts it back, a crash there leaves it
    whole beside, for `restore_replaced` at the next start.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        manifest = {"format": FORMAT, "step": step, "files": _write_parallel(tmp, files)}
        write_file(tmp / MANIFEST, json_bytes(manifest))
        fsync_dir(tmp)
        verify(tmp, hashes=False)  # names, sizes and the manifest's canonical form; see the module docstring
        if final.exists():
            # Never delete what was there: a broken folder is kept for inspection,
            # a valid one is removed only once the new one is in place.
            try:
                verify(final)
                aside, keep = final.with_name(f"{final.name}.replaced-{secrets.token_hex(4)}"), False
            except CheckpointError as e:
                aside, keep = final.with_name(f"{final.name}.invalid-{secrets.token_hex(4)}"), True
                log.warning("%s exists but is invalid (%s); moving it to %s", final, e, aside.name)
            atomic.swap_in(tmp, final, aside, keep_old=keep)  # an error in between puts the old one back
        else:
            os.rename(tmp, final)
        fsync_dir(output_dir)
        write_latest(output_dir, final.name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            code = errno.errorcode.get(e.errno, e.errno)
            raise CheckpointError(f"saving {final} failed: [{code}] {e.strerror or e} (path: {e.filename or tmp})") from e
        raise
    return final


def write_latest(output_dir: Path, name: str) -> None:
    atomic.write_text(output_dir / "latest", name + "\n")


def read_pointer(output_dir: str | Path, name: str = "latest") -> str | None:
    """The checkpoint folder name held by output_dir/latest or output_dir/best (None when absent)."""
    try:
        return (Path(output_dir) / name).read_text().strip() or None
    except FileNotFoundError:
        return None


def eval_value_of(folder: Path, key: str = "loss") -> float | None:
    """A figure of the evaluation recorded in a checkpoint's trainer_state.json (None when it has none)."""
    try:
        ev = json.loads((folder / "trainer_state.json").read_text()).get("eval")
    except (OSError, ValueError):
        return None
    return ev.get(key) if isinstance(ev, dict) else None


def update_best(output_dir: str | Path, name: str, value: float, key: str = "loss", higher: bool = False) -> bool:
    """Point output_dir/best at `name` when its evaluation figure `key` (default the eval loss; --best-by) is
    better than the current best's: lower, or higher when `higher`. A current best that did not record `key`
    is replaced. Same atomic update as `latest` (atomic.write_text). Returns whether it moved."""
    output_dir = Path(output_dir)
    current = read_pointer(output_dir, "best")
    if current and current != name and (output_dir / current).is_dir():
        previous = eval_value_of(output_dir / current, key)
        if previous is not None and not (value > previous if higher else value < previous):
            return False
    atomic.write_text(output_dir / "best", name + "\n")
    return True


def _checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N entry, newest first; nothing is read."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found, key=lambda c: -c[0])


def scan(output_dir: str | Path) -> list[dict]:
    """Every checkpoint-N folder, newest first, each verified: {step, path, ok, reason, bytes}."""
    out = []
    for step, p in _checkpoint_folders(Path(output_dir)):
        try:
            verify(p)
            ok, reason = True, "ok"
        except CheckpointError as e:
            ok, reason = False, str(e)
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else 0
        out.append({"step": step, "path": p, "ok": ok, "reason": reason, "bytes": size})
    return out


def latest_valid(output_dir: str | Path, keep: bool = False) -> Path | None:
    """The newest checkpoint whose manifest verifies; broken ones are reported, never deleted.
    Verifies newest first and stops at the first good one: a run with 300 checkpoints hashes one at resume.
    keep: as in `verify` (the resume that loads it next hashes nothing again)."""
    for _, p in _checkpoint_folders(Path(output_dir)):
        try:
            verify(p, keep=keep)
            return p
        except CheckpointError as e:
            log.warning("passing over %s: %s", p, e)
    return None


def restore_replaced(output_dir: str | Path) -> list[Path]:
    """Undo a crash inside a save that replaced checkpoint-N (atomic.swap_in): call on rank 0 before the
    resume is chosen. A `checkpoint-N.replaced-*` folder is the old copy, whole, moved aside just before the
    new one was renamed in. When no checkpoint-N verifies it is put back (a checkpoint-N that is there but
    does not verify is moved to `.invalid-*` first, kept for inspection); when checkpoint-N verifies it is
    superseded and removed. One that does not verify itself is left alone. Returns the restored folders."""
    output_dir, restored = Path(output_dir), []
    if not output_dir.is_dir():
        return restored
    for aside in sorted(p for p in output_dir.iterdir() if REPLACED_RE.match(p.name)):
        final = output_dir / REPLACED_RE.match(aside.name).group(1)
        if _valid(final):
            log.warning("removing %s: superseded by %s (left by an interrupted save)", aside.name, final)
            shutil.rmtree(aside)
        elif _valid(aside):
            if final.exists():
                os.rename(final, final.with_name(f"{final.name}.invalid-{secrets.token_hex(4)}"))
            os.rename(aside, final)
            fsync_dir(output_dir)
            log.warning("restored %s from %s (the previous copy, moved aside by an interrupted save)",
                        final, aside.name)
            restored.append(final)
    return restored


def _valid(folder: Path) -> bool:
    try:
        verify(folder)
        return True
    except CheckpointError:
        return False


def remove_stale_tmp(output_dir: str | Path) -> list[Path]:
    """Remove `.tmp-checkpoint-*` folders left by a crash (call on rank 0 before training)."""
    stale = [p for p in Path(output_dir).glob(f"{TMP_PREFIX}*")]
    for p in stale:
        log.warning("removing stale temporary checkpoint folder %s (left by an interrupted save)", p)
        shutil.rmtree(p)
    return stale


def rotate(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete valid checkpoints beyond the newest `keep_last` valid ones. Broken ones are left alone,
    and so is the one `best` names (the lowest eval loss)."""
    if keep_last <= 0:
        return []
    valid = [c["path"] for c in scan(output_dir) if c["ok"]]
    best = read_pointer(output_dir, "best")
    doomed = [p for p in valid[keep_last:] if p.name != best]
    for p in doomed:
        log.info("keep-last %d: deleting %s", keep_last, p)
        shutil.rmtree(p)
    return doomed


def preflight(output_dir: str | Path, estimated_bytes: int, save_steps: int, max_steps: int,
              strict_space: bool = False) -> Path:
    """Prove the output folder is writable and roomy before step 1. Returns its absolute path."""
    output_dir = Path(output_dir).resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".probe-{secrets.token_hex(4)}"
        write_file(probe, b"higgs_min write probe\n")
        probe.unlink()
        fsync_dir(output_dir)
    except OSError as e:
        raise CheckpointError(f"output folder {output_dir} is not writable: {e.strerror or e} "
                              f"(errno {errno.errorcode.get(e.errno, e.errno)}); nothing was trained") from e
    free = shutil.disk_usage(output_dir).free
    if free < 2 * estimated_bytes:
        msg = (f"{output_dir}: {free / 1e6:.1f} MB free, a checkpoint needs about "
               f"{estimated_bytes / 1e6:.1f} MB (x2 while a save is in flight)")
        if strict_space:
            raise CheckpointError(msg + " (--strict-space)")
        log.warning("%s", msg)
    saves = sorted({s for s in range(save_steps, max_steps + 1, save_steps)} | {max_steps}) if save_steps > 0 else [max_steps]
    shown = saves if len(saves) <= 8 else saves[:4] + ["…"] + saves[-2:]
    log.info("checkpoints: output %s, save_steps %d, max_steps %d, saves at steps %s, "
             "estimated %.1f MB each, %.1f MB free", output_dir, save_steps, max_steps, shown,
             estimated_bytes / 1e6, free / 1e6)
    if save_steps > max_steps:
        log.warning("save_steps %d > max_steps %d: only the final checkpoint (step %d) will be written",
                    save_steps, max_steps, max_steps)
    return output_dir


def main(argv=None) -> int:
    from higgs_min.errors import Parser

    ap = Parser(prog="python -m higgs_min.checkpoint", description="Verify or list checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify", help="check one checkpoint folder against its manifest").add_argument("dir", type=Path)
    sub.add_parser("list", help="list the checkpoints of an output folder").add_argument("output_dir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "verify":
        try:
            m = verify(args.dir)
        except CheckpointError as e:
            print(f"INVALID {e}")
            return 1
        total = sum(f["bytes"] for f in m["files"].values())
        print(f"OK {args.dir}: step {m['step']}, {len(m['files'])} files, {total / 1e6:.2f} MB, sha256 verified")
        return 0
    if not args.output_dir.is_dir():
        print(f"{args.output_dir}: " + ("is a file, not an output folder" if args.output_dir.exists()
                                       else "no such folder"), file=sys.stderr)
        return 1
    rows = scan(args.output_dir)
    if not rows:
        print(f"{args.output_dir}: no checkpoint-N folders")
    for c in rows:
        print(f"{c['path'].name:>20}  {'valid' if c['ok'] else 'INVALID'}  {c['bytes'] / 1e6:9.2f} MB"
              + ("" if c["ok"] else f"  {c['reason']}"))
    for p in Path(args.output_dir).glob(f"{TMP_PREFIX}*"):
        print(f"{p.name:>20}  stale temporary folder (an interrupted save)")
    return 0 if all(c["ok"] for c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
