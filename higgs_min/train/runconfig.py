"""The record of what a run trains, and the guard that keeps a resume honest.

output_dir/run_config.json is written by the first run of an output folder and never rewritten
while the folder holds a valid checkpoint (a rerun before any checkpoint rewrites it: nothing was
trained from it). It holds

    {"train": {option: value, ...},    resolved option values (valid input to --config)
     "identity": {"data": {"path", "sha256"}, "tokenizer": ..., "base_weights": ..., "eval_data": ...},
     "model": ModelConfig as a dict, "world_size": N}

On resume the current settings are compared with the recorded ones, each by its class in the options
table (options.py OPTIONS, the only list):
  - TRAINED: a change refuses to start and lists each `setting: old -> new`; --allow-changed-settings
    lets it through (logged, and appended to settings_changes.jsonl);
  - SHAPE: refused even with --allow-changed-settings (the checkpoint cannot load into the new model);
  - OPERATIONAL: logged and recorded in settings_changes.jsonl;
  - a recorded setting that is no longer an option counts as TRAINED.
Data, tokenizer and base weights are compared by content (sha256), so a moved file is not a change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from higgs_min import atomic, checkpoint, distributed, manifest
from higgs_min.errors import UsageError
from higgs_min.train.options import NOT_CONFIG, OPERATIONAL, RESUME_CLASS, SHAPE, TRAINED
from higgs_min.train.runs import RunError, resolve_checkpoint

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
CHANGES = "settings_changes.jsonl"
# Compared by content, not by the path string.
IDENTITY = ("data", "tokenizer", "base_weights", "eval_data")
_HASH_LIMIT = 256 << 20  # files above this in a folder are identified by name and size (base shards)


def fingerprint(path) -> dict | None:
    """{"path", "sha256"} of a file, or of a folder's (name, size, content-if-small) list."""
    if path is None:
        return None
    path = Path(path).resolve()
    if path.is_file():
        return {"path": str(path), "sha256": manifest.sha256_file(path)}
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            size = p.stat().st_size
            h.update(f"{p.relative_to(path)}\0{size}\0".encode())
            h.update((manifest.sha256_file(p) if size <= _HASH_LIMIT else "large").encode())
        return {"path": str(path), "sha256": h.hexdigest()}
    return {"path": str(path), "sha256": None}


def settings_of(args) -> dict:
    """The resolved option values as JSON-able data (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def identities(args) -> dict:
    return {k: fingerprint(getattr(args, k, None)) for k in IDENTITY}


def _show(value, ident=None) -> str:
    if ident and ident.get("sha256"):
        return f"{value} (sha256 {ident['sha256'][:12]})"
    return json.dumps(value)


def compare(old: dict, old_ident: dict, new: dict, new_ident: dict) -> tuple[dict, dict]:
    """(refused, allowed): setting -> "old -> new" for every setting that differs."""
    refused, allowed = {}, {}
    for key in sorted(set(old) | set(new)):
        if key in NOT_CONFIG or key == "resume":
            continue
        a, b = old.get(key), new.get(key)
        ia, ib = (old_ident or {}).get(key), (new_ident or {}).get(key)
        if key in IDENTITY and ia and ib and ia.get("sha256") and ib.get("sha256"):
            if ia["sha256"] == ib["sha256"]:
                if a != b:
                    allowed[key] = f"{_show(a)} -> {_show(b)} (same content)"
                continue
        elif a == b:
            continue
        diff = f"{_show(a, ia)} -> {_show(b, ib)}"
        (allowed if RESUME_CLASS.get(key, TRAINED) == OPERATIONAL else refused)[key] = diff
    return refused, allowed


class Run:
    """What the guard decided: the checkpoint to resume from, and the record to write."""

    def __init__(self, resume_from, settings, identity, previous, changes):
        self.resume_from, self.settings, self.identity = resume_from, settings, identity
        self.previous, self.changes = previous, changes  # previous: the recorded run_config (or None)

    def record(self, args, model_config: dict, world_size: int) -> None:
        """Rank 0: write run_config.json (the final resolved settings) unless the folder's record is kept;
        append any changes to settings_changes.jsonl."""
        output_dir = Path(args.output_dir)
        self.settings = settings_of(args)
        if self.previous is None or self.previous.get("_source") != "run_config":
            atomic.write_json(output_dir / RUN_CONFIG, {
                "train": self.settings, "identity": self.identity, "model": model_config, "world_size": world_size})
        if self.changes:
            with open(Path(output_dir) / CHANGES, "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "resumed_from": str(self.resume_from), **self.changes}) + "\n")


def _refuse_beside_checkpoints(args, why: str) -> None:
    """A fresh run (step 1) in a folder that holds checkpoint-N folders would interleave two runs' steps there:
    `latest` naming the new run's checkpoint while --resume auto later took the old run's higher step, one
    metrics.jsonl for both. Refused, naming the newest folder."""
    held = checkpoint.checkpoint_folders(Path(args.output_dir))  # names only: valid or not, they are a run's
    if held:
        raise UsageError(f"--resume {args.resume}: {args.output_dir} holds {held[0][1].name}{why}; a new run there "
                         "would mix with it\n  start it in a new --output-dir, or move the old run away first")


def _resume_folder(args) -> Path | None:
    if args.resume == "auto":
        folder = checkpoint.latest_valid(args.output_dir, keep=True)  # kept: the load hashes nothing again
        if folder is None:
            _refuse_beside_checkpoints(args, " but no checkpoint there verifies (`higgs-min checkpoint list` says why)")
        return folder
    if args.resume == "none":
        _refuse_beside_checkpoints(args, "")
        return None
    try:
        folder = resolve_checkpoint(args.resume)
        checkpoint.verify(folder, keep=True)
    except (checkpoint.CheckpointError, RunError) as e:
        msg = str(e)  # most name the path already: "--resume PATH: not a folder", not the path twice
        msg = msg if msg.startswith(str(Path(args.resume))) else f"{args.resume}: {msg}"
        raise UsageError(f"--resume {msg}") from e
    return folder


def _previous(output_dir: Path, folder: Path | None) -> dict | None:
    """The settings to compare with: the folder's run_config.json while it holds a checkpoint,
    else the resumed checkpoint's own record."""
    path = output_dir / RUN_CONFIG
    # a resumed folder is a verified checkpoint already: do not hash every checkpoint again to learn that
    has_checkpoint = folder is not None or checkpoint.latest_valid(output_dir) is not None
    if path.exists() and has_checkpoint:
        try:
            raw = json.loads(path.read_text())
            return {"train": raw["train"], "identity": raw.get("identity") or {}, "_source": "run_config"}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path}: unreadable run record ({e}); move it away to start a new record") from e
    if folder is not None:
        state = json.loads((folder / "trainer_state.json").read_text())
        return {"train": state.get("config") or {}, "identity": state.get("identity") or {}, "_source": "checkpoint"}
    return None


def decide(args, is_main: bool) -> Run:
    """On rank 0: find the checkpoint to resume, compare settings, refuse or log. Every rank gets the same Run."""
    outcome = None
    if is_main:
        try:
            outcome = _decide(args)
        except UsageError as e:
            outcome = e
    outcome = distributed.broadcast_from_main(outcome)
    if isinstance(outcome, UsageError):
        raise outcome
    return outcome


def _decide(args) -> Run:
    output_dir = Path(args.output_dir)
    try:  # a crash inside a save over checkpoint-N left its old copy aside: back first, so resume can choose it
        checkpoint.restore_replaced(output_dir)
    except OSError as e:
        log.warning("could not restore a checkpoint left aside by an interrupted save in %s: %s", output_dir, e)
    folder = _resume_folder(args)
    settings, identity = settings_of(args), identities(args)
    previous = _previous(output_dir, folder)
    changes = {}
    if previous is not None:
        refused, allowed = compare(previous["train"], previous["identity"], settings, identity)
        if allowed:
            log.info("changed on resume (allowed): %s", "; ".join(f"{k}: {v}" for k, v in allowed.items()))
            changes["allowed"] = allowed
        shape = {k: v for k, v in refused.items() if RESUME_CLASS.get(k) == SHAPE}
        if shape and folder is not None:
            raise UsageError(
                f"{folder} was trained with other shapes: " + "; ".join(f"{k}: {v}" for k, v in shape.items())
                + "\n  its adapter cannot load into this model; start this run in a new --output-dir")
        if refused and not getattr(args, "allow_changed_settings", False):
            src = output_dir / RUN_CONFIG if previous["_source"] == "run_config" else folder
            raise UsageError(
                f"these settings differ from the run recorded in {src}: "
                + "; ".join(f"{k}: {v}" for k, v in refused.items())
                + "\n  use the recorded values (--config " + str(output_dir / RUN_CONFIG) + " restores them), "
                "a new --output-dir, or --allow-changed-settings to continue anyway (recorded)")
        if refused:
            log.warning("continuing with changed settings (--allow-changed-settings): %s",
                        "; ".join(f"{k}: {v}" for k, v in refused.items()))
            changes["overridden"] = refused
    return Run(folder, settings, identity, previous, changes)
