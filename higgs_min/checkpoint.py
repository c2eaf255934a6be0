"""Checkpoints that are complete or absent, never partial: the writing half (the reading half, the manifest
and the checks against it: manifest.py).

A checkpoint is the folder `output_dir/checkpoint-{step}/` whose `manifest.json`
(written last) lists every other file with its size and the sha256 of each of its blocks. The folder
exists under that name only after all of it was written and fsynced and its names
and sizes were checked against the manifest (nothing is read back):

    .tmp-checkpoint-{step}-{random}/   write each file (one thread per file, largest first), cut into blocks
                                       of 32 MiB hashed while written (the very buffers written, in a pool
                                       of one thread per core shared by all files), flush, fsync
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

A folder is a checkpoint if and only if its manifest verifies (manifest.verify). Only safetensors and JSON
are written; loading never unpickles anything.

    python -m higgs_min.checkpoint verify DIR
    python -m higgs_min.checkpoint list OUTPUT_DIR
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from higgs_min import atomic, manifest
from higgs_min.atomic import fsync_dir, json_bytes, safetensors_chunks, write_file  # noqa: F401
from higgs_min.manifest import CHECKPOINT_RE, MANIFEST, CheckpointError, verify  # noqa: F401

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-checkpoint-"
REPLACED_RE = re.compile(r"^(checkpoint-\d+)\.replaced-[0-9a-f]+$")  # the old copy during a save over it


def _nbytes(content) -> int:
    if isinstance(content, dict):
        return sum(t.numel() * t.element_size() for t in content.values())
    return len(content)


def _write_parallel(folder: Path, files: dict) -> dict:
    """Write every file into `folder`; returns the manifest's {name: {"sha256": [block hashes], "bytes"}}.

    Each file is written in its own thread (largest first), and cut into blocks of manifest.BLOCK_BYTES that
    are hashed in one pool shared by all files, one thread per core, while the writing goes on (write_file).
    File writes and sha256 both release the GIL: the cores share the hashing of the largest file too.
    """
    with ThreadPoolExecutor(manifest.hash_threads()) as hashers:
        def write_one(name):
            content = files[name]
            digests = write_file(folder / name, safetensors_chunks(content) if isinstance(content, dict) else content,
                                 block_bytes=manifest.BLOCK_BYTES, pool=hashers)
            return {"sha256": digests, "bytes": (folder / name).stat().st_size}

        order = sorted(files, key=lambda n: -_nbytes(files[n]))
        with ThreadPoolExecutor(min(4, len(order))) as writers:  # leaving the block waits for every write
            written = dict(zip(order, writers.map(write_one, order)))
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
        write_file(tmp / MANIFEST, json_bytes(manifest.make(step, _write_parallel(tmp, files))))
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


POINTERS = ("best", "latest")  # write_latest / update_best: one line, a checkpoint folder's name


def resolve_pointer(path: str | Path) -> Path:
    """The checkpoint a path means: OUT/best or OUT/latest -> OUT/<the folder named inside>; any other path as
    it is. The one place where a pointer is followed, so that verify, generate, export, eval and --resume accept
    `runs/x/best` wherever they accept a checkpoint folder. CheckpointError when the named folder is gone."""
    path = Path(path)
    if path.name not in POINTERS or not path.is_file():
        return path
    try:
        name = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint it names: {e}") from e
    target = path.parent / name
    if not name or Path(name).name != name or not target.is_dir():
        there = [p.name for _, p in checkpoint_folders(path.parent)[:4]]  # the newest, by step
        raise CheckpointError(f"{path} names {name!r}, which is not a folder in {path.parent} (deleted by hand or "
                              f"by --keep-last?); pass a checkpoint folder instead (there: {there or 'none'})")
    return target


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


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N entry, newest first; nothing is read."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found, key=lambda c: -c[0])


def scan(output_dir: str | Path) -> list[dict]:
    """Every checkpoint-N folder, newest first, each verified: {step, path, ok, reason, bytes}."""
    out = []
    for step, p in checkpoint_folders(Path(output_dir)):
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
    for _, p in checkpoint_folders(Path(output_dir)):
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


def _valid(folder: Path, hashes: bool = True) -> bool:
    try:
        verify(folder, hashes=hashes)
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


def rotate(output_dir: str | Path, keep_last: int, saved: str | None = None) -> list[Path]:
    """Delete checkpoints beyond the newest `keep_last` whole ones; never the newest one that verifies, nor
    the one `best` names, nor a broken one. Returns the deleted folders.

    Choosing what to delete hashes nothing: "whole" is the check that reads no data (manifest, names, sizes:
    verify(hashes=False)). Hashing every kept checkpoint at every save read the whole output folder each time,
    for a choice that only needs this: a checkpoint that verifies must survive. So nothing is deleted unless
    one of the kept ones verifies: `saved`, the folder this process has just written (its hashes were
    computed from the very buffers written, and save checked its names and sizes), is trusted without a
    re-read; else the kept ones are hashed newest first until one verifies; if none does (damage that keeps
    sizes, e.g. flipped bits), the doomed ones are hashed newest first and the first that verifies is spared.
    A whole-looking but damaged checkpoint may thus count as kept: --keep-last 3 then leaves 2 good ones.
    """
    if keep_last <= 0:
        return []
    whole = [p for _, p in checkpoint_folders(Path(output_dir)) if _valid(p, hashes=False)]
    best = read_pointer(output_dir, "best")
    kept, doomed = whole[:keep_last], [p for p in whole[keep_last:] if p.name != best]
    if doomed and saved not in {p.name for p in kept} and not any(_valid(p) for p in kept):
        spare = next((p for p in doomed if _valid(p)), None)  # the newest that verifies
        doomed = [p for p in doomed if p != spare]
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
            folder = resolve_pointer(args.dir)  # OUT/latest, OUT/best: the folder they name
            m = verify(folder)
        except CheckpointError as e:
            print(f"INVALID {e}")
            return 1
        total = sum(f["bytes"] for f in m["files"].values())
        print(f"OK {folder}: step {m['step']}, {len(m['files'])} files, {total / 1e6:.2f} MB, sha256 verified")
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
