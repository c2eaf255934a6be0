"""Fault-injection suite: kill, fill, corrupt and feed garbage; count what survives.

    python -m tests.faults            # `make faults`: the full trial counts (<= 20 min on 2 cores)
    python -m tests.faults --quick    # the subset that `make test` runs (tests/test_faults.py)

Every trial runs real training processes and checks the output folder with the
project's own verify/list code. "Data lost" counts trials after which a
checkpoint that had been committed no longer verifies, a folder named
checkpoint-N does not verify, or a resumed run does not end bitwise equal to an
uninterrupted one. The suite prints a table and exits non-zero if any is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from higgs_min import checkpoint
from tests.trainutil import ROOT, adapter, env, run_cli, torchrun, train_args

STEPS = 6  # steps of each faulted run: short, so many trials fit


# rank 64: checkpoints large enough (~6 MB) that a save takes long enough to be hit by a kill
RUN = ["--max-steps", STEPS, "--save-steps", 1, "--log-every", 1, "--lora-rank", 64]


def _cmd(out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "higgs_min.train"] + train_args(out, *RUN, *extra)


def _no_invalid_named_checkpoint(out: Path) -> bool:
    return all(c["ok"] for c in checkpoint.scan(out))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bad data corpus

K, C = 8, 1024


def _conv(audio_item, text="Hello there."):
    return {"messages": [{"role": "user", "content": "Say hello."},
                         {"role": "assistant", "content": [{"type": "text", "text": text}, audio_item]}]}


def bad_corpus(folder: Path) -> dict[str, tuple[bytes, str]]:
    """kind -> (one JSONL line as bytes, text the error must contain). Writes the codes files it needs."""
    import numpy as np
    from safetensors.numpy import save_file

    codes = folder / "codes"
    codes.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(codes / "k7.npy", rng.integers(0, C, (7, 20)).astype(np.int16))
    np.save(codes / "flat.npy", rng.integers(0, C, (160,)).astype(np.int16))
    np.save(codes / "float.npy", rng.random((K, 20)).astype(np.float32))
    np.save(codes / "big.npy", np.full((K, 20), C, dtype=np.int16))
    np.save(codes / "neg.npy", np.full((K, 20), -3, dtype=np.int16))
    np.save(codes / "empty.npy", np.zeros((K, 0), dtype=np.int16))
    (codes / "garbage.npy").write_bytes(b"this is not a numpy file")
    (codes / "audio.wav").write_bytes(b"RIFF")
    save_file({"a": np.zeros((K, 5), np.int16), "b": np.zeros((K, 5), np.int16)}, str(codes / "two.safetensors"))
    np.save(codes / "long.npy", rng.integers(0, C, (K, 3000)).astype(np.int16))
    j = lambda obj: json.dumps(obj, ensure_ascii=False).encode()  # noqa: E731
    audio = lambda path: {"type": "audio", "codes": path}  # noqa: E731
    return {
        "malformed JSON": (b'{"messages": [{"role": "user"', "malformed JSON"),
        "non-UTF-8 bytes": (b'{"messages": "\xff\xfe\xfa"}', "not valid UTF-8"),
        "not an object": (j([1, 2, 3]), "expected an object with a 'messages' list"),
        "no messages key": (j({"conversation": []}), "expected an object with a 'messages' list"),
        "messages not a list": (j({"messages": "hi"}), "expected an object with a 'messages' list"),
        "empty conversation": (j({"messages": []}), "the conversation is empty"),
        "message not an object": (j({"messages": ["hi"]}), "messages[0]: expected an object"),
        "unknown role": (j({"messages": [{"role": "narrator", "content": "x"}]}), "unknown role 'narrator'"),
        "content of wrong type": (j({"messages": [{"role": "user", "content": 42}]}), "expected a string or a list"),
        "unknown item type": (j({"messages": [{"role": "user", "content": [{"type": "image"}]}]}), "expected 'text' or 'audio'"),
        "text not a string": (j({"messages": [{"role": "assistant", "content": [{"type": "text", "text": 5}]}]}), ".text: expected a string"),
        "codes path not a string": (j(_conv({"type": "audio", "codes": 7})), ".codes: expected a path string"),
        "missing codes file": (j(_conv(audio("codes/none.npy"))), "does not exist"),
        "unreadable codes file": (j(_conv(audio("codes/garbage.npy"))), "cannot read"),
        "codes of unknown format": (j(_conv(audio("codes/audio.wav"))), "neither .npy nor .safetensors"),
        "wrong codebook count": (j(_conv(audio("codes/k7.npy"))), "has shape [7, 20], expected [8, T]"),
        "one-dimensional codes": (j(_conv(audio("codes/flat.npy"))), "has shape [160], expected [8, T]"),
        "float codes": (j(_conv(audio("codes/float.npy"))), "expected integers"),
        "codes out of range": (j(_conv(audio("codes/big.npy"))), "expected [0, 1024)"),
        "negative codes": (j(_conv(audio("codes/neg.npy"))), "has values in [-3, -3]"),
        "codes with no frames": (j(_conv(audio("codes/empty.npy"))), "has no frames"),
        "safetensors with two tensors": (j(_conv(audio("codes/two.safetensors"))), "holds 2 tensors, expected 1"),
        "raw audio not prepared": (j(_conv({"type": "audio", "audio": "a.wav"})), "raw audio must be encoded first"),
        "audio item without codes": (j(_conv({"type": "audio"})), "needs 'codes'"),
        "no supervised token": (j({"messages": [{"role": "user", "content": "Hi."}]}), "no supervised token"),
        "longer than max length": (j(_conv(audio("codes/long.npy"))), "longer than max length"),
    }


ALWAYS_SKIPPED = {"no supervised token", "longer than max length"}  # counted skips, never errors


class Suite:
    def __init__(self, work: Path, seed: int):
        self.work, self.rng, self.rows = work, random.Random(seed), []
        ref = work / "reference"
        t0 = time.time()
        done = run_cli(ref, *RUN)
        self.run_seconds = time.time() - t0
        assert done.returncode == 0, done.stdout[-2000:]
        self.reference = adapter(ref / f"checkpoint-{STEPS}")
        self.ref_dir = ref

    def record(self, fault, trials, survived, lost, note=""):
        self.rows.append({"fault": fault, "trials": trials, "survived": survived, "data_lost": lost, "note": note})
        print(f"  {fault}: {survived}/{trials} survived, {lost} data lost {note}", file=sys.stderr, flush=True)

    # 1 ---------------------------------------------------------------------------------
    def kill9(self, trials: int):
        survived = lost = mid_save = 0
        for t in range(trials):
            out = self.work / f"kill9-{t}"
            p = subprocess.Popen(_cmd(out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            if t % 2:  # odd trials: kill inside a save, once its temporary folder shows, after a random delay
                deadline = time.time() + 3 * self.run_seconds
                while not list(out.glob(".tmp-checkpoint-*")) and time.time() < deadline and p.poll() is None:
                    time.sleep(0.0005)
                time.sleep(self.rng.uniform(0, 0.02))
            else:  # even trials: anywhere from late start-up to the end of the run
                time.sleep(self.rng.uniform(0.5, 1.0) * self.run_seconds)
            p.kill()
            p.wait()
            committed = [c["path"] for c in checkpoint.scan(out) if c["ok"]]
            mid_save += bool(list(out.glob(".tmp-checkpoint-*")))  # killed inside a save
            ok = _no_invalid_named_checkpoint(out)
            done = run_cli(out, *RUN)
            ok = ok and done.returncode == 0 and all(c.exists() and _verifies(c) for c in committed)
            ok = ok and _same(adapter(out / f"checkpoint-{STEPS}"), self.reference)
            survived += ok
            lost += not ok
            shutil.rmtree(out, ignore_errors=True)
        self.record("kill -9 at a random moment (--save-steps 1), then --resume auto", trials, survived, lost,
                    f"({mid_save} killed inside a save)")

    # 2 ---------------------------------------------------------------------------------
    def disk_full(self):
        small = self.work / "small"
        small.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                                 capture_output=True).returncode == 0
        trials = survived = lost = 0
        note = "(tmpfs of 4 MiB)" if mounted else "(injected ENOSPC: no tmpfs here)"
        try:
            for backup in (None, self.work / "backup"):
                trials += 1
                out = small / f"out-{trials}"
                extra = ["--backup-dir", str(backup)] if backup else []
                if mounted:
                    done = run_cli(out, "--max-steps", STEPS, "--save-steps", 1, *extra)
                else:
                    done = subprocess.run([sys.executable, "tests/faultinject.py", "0:ENOSPC:12000000", "--"]
                                          + train_args(out, "--max-steps", STEPS, "--save-steps", 1, *extra),
                                          cwd=ROOT, env=env(), capture_output=True, text=True)
                    done.stdout = done.stdout + done.stderr
                committed = checkpoint.scan(out)
                intact = bool(committed) and all(c["ok"] for c in committed) and not list(out.glob(".tmp-checkpoint-*"))
                clear = "ENOSPC" in done.stdout and "No space left on device" in done.stdout
                if backup is None:
                    ok = done.returncode == 1 and clear and intact
                else:
                    ok = done.returncode == 0 and clear and intact and _verifies(backup / f"checkpoint-{STEPS}")
                survived += ok
                lost += not intact
                shutil.rmtree(out, ignore_errors=True)
        finally:
            if mounted:
                subprocess.run(["umount", str(small)], check=True)
        self.record("disk full mid-run: error, earlier checkpoints intact, no partial folder; backup dir used",
                    trials, survived, lost, note)

    # 3 ---------------------------------------------------------------------------------
    def read_only_and_vanishing(self):
        trials = survived = 0
        ro = self.work / "ro"
        ro.mkdir()
        bound = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0
        bound = bound and subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode == 0
        if bound or os.geteuid() != 0:
            if not bound:
                ro.chmod(0o555)
            trials += 1
            done = run_cli(ro / "out", "--max-steps", 3)
            ok = done.returncode == 1 and "not writable" in done.stdout and str(ro / "out") in done.stdout
            survived += ok and "step 1/" not in done.stdout
            subprocess.run(["umount", str(ro)], capture_output=True)
        # vanishing mid-run
        trials += 1
        out = self.work / "vanish"
        p = subprocess.Popen(_cmd(out, "--max-steps", 200, "--save-steps", 50), cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _wait_for_metrics(out, 3)
        shutil.rmtree(out)
        log, _ = p.communicate(timeout=300)
        survived += p.returncode == 1 and "ENOENT" in log and str(out) in log and "Traceback" not in log
        self.record("read-only output (fails in preflight) / output folder removed mid-run (error at next save)",
                    trials, survived, 0)

    # 4 ---------------------------------------------------------------------------------
    def corruption(self, trials: int):
        caught = lost = 0
        kinds = ["flip", "truncate", "delete file", "delete manifest", "edit manifest"]
        for t in range(trials):
            out = self.work / "corrupt"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(self.ref_dir, out)
            victim = out / f"checkpoint-{STEPS}"
            kind = self.rng.choice(kinds)
            files = sorted(p for p in victim.iterdir())
            target = self.rng.choice(files)
            if kind == "flip":
                data = bytearray(target.read_bytes())
                for _ in range(self.rng.randint(1, 4)):
                    data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
                target.write_bytes(bytes(data))
            elif kind == "truncate":
                target.write_bytes(target.read_bytes()[: self.rng.randrange(target.stat().st_size)])
            elif kind == "delete file":
                target.unlink()
            elif kind == "delete manifest":
                (victim / "manifest.json").unlink()
            else:
                m = json.loads((victim / "manifest.json").read_text())
                name = self.rng.choice(sorted(m["files"]))
                m["files"][name][self.rng.choice(["sha256", "bytes"])] = (
                    "%064x" % self.rng.getrandbits(256) if self.rng.random() < 0.5 else 12345)
                (victim / "manifest.json").write_text(json.dumps(m))
            detected = not _verifies(victim)
            previous = checkpoint.latest_valid(out)
            ok = detected and previous == out / f"checkpoint-{STEPS - 1}"
            caught += ok
            lost += not ok
        self.record("corruption (bit flips, truncation, deleted file/manifest, edited manifest): verify catches, "
                    "resume takes the previous one", trials, caught, lost)

    # 5 ---------------------------------------------------------------------------------
    def bad_data(self, quick: bool):
        from higgs_min.chat import ChatEncoder
        from higgs_min.schema import DataError
        from higgs_min.prepare.sanitize import load_jsonl
        folder = self.work / "bad"
        corpus = bad_corpus(folder)
        enc = ChatEncoder(ROOT / "data" / "tokenizer.json", K, C, 1024)
        trials = survived = 0
        for kind, (line, expected) in corpus.items():
            trials += 1
            path = folder / f"{len(os.listdir(folder))}.jsonl"
            path.write_bytes(line + b"\n")
            if quick:  # the loader in-process: the same code the trainer runs before step 1
                try:
                    load_jsonl(path, enc, 2048)
                    ok = False
                except DataError as e:
                    ok = expected in str(e)
            else:  # the trainer itself: exit 1 with the message, no traceback
                done = run_cli(self.work / "bad-out", "--data", path, "--max-steps", 1)
                ok = done.returncode == 1 and expected in done.stdout and "Traceback" not in done.stdout
            survived += ok
            if not ok:
                print(f"    bad data kind not handled as expected: {kind}", file=sys.stderr)
        trials += 1  # an empty file
        (folder / "empty.jsonl").write_text("\n")
        done = run_cli(self.work / "bad-out", "--data", folder / "empty.jsonl", "--max-steps", 1)
        survived += done.returncode == 1 and "the data file is empty" in done.stdout
        trials += 1  # every bad line mixed into good ones: the run goes on, each counted and named
        good = (ROOT / "data" / "demo.jsonl").read_bytes().splitlines()[:4]
        shutil.copytree(ROOT / "data" / "codes", folder / "codes", dirs_exist_ok=True)
        lines = good[:2] + [line for line, _ in corpus.values()] + good[2:]
        (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        done = run_cli(self.work / "bad-mixed", "--data", folder / "mixed.jsonl", "--skip-bad-samples",
                       "--max-bad-fraction", 1, "--max-steps", 3, "--max-length", 1000)
        rows = (self.work / "bad-mixed" / "rejected.jsonl").read_text().splitlines() if done.returncode == 0 else []
        survived += (done.returncode == 0 and f"loaded 4, skipped {len(corpus)} (" in done.stdout
                     and len(rows) == len(corpus))
        self.record(f"bad data ({len(corpus) + 1} kinds): each a clear error or counted skip; all mixed "
                    "into good data: the run completes with counted skips", trials, survived, 0)

    # 6 ---------------------------------------------------------------------------------
    def distributed(self):
        trials = survived = 0
        args = ["--max-steps", "3", "--device", "cpu", "--lora-rank", "4", "--batch-size", "2", "--log-samples", "0"]
        trials += 1
        t0 = time.time()
        p = torchrun(2, ["0:ENOSPC:5000", "--"] + args + ["--output-dir", str(self.work / "d1")],
                     script=str(ROOT / "tests" / "faultinject.py"))
        log, _ = p.communicate(timeout=120)
        both = sum("ERROR" in line and "ENOSPC" in line for line in log.splitlines()) >= 2
        survived += p.returncode != 0 and time.time() - t0 < 60 and both
        trials += 1
        out = self.work / "d2"
        p = torchrun(2, args[:1] + ["200"] + args[2:] + ["--output-dir", str(out), "--log-every", "1"],
                     start_new_session=True)
        _wait_for_metrics(out, 2)
        victim = _child_ranks(p.pid)[-1]
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        try:
            log, _ = p.communicate(timeout=60)
            survived += p.returncode != 0 and time.time() - t0 < 60
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
        self.record("2-rank gloo: rank 0's save fails / one rank killed: all exit non-zero within 60 s",
                    trials, survived, 0)

    # 7 ---------------------------------------------------------------------------------
    def preemption(self, trials: int):
        survived = lost = 0
        for t in range(trials):
            out = self.work / f"term-{t}"
            p = subprocess.Popen(_cmd(out, "--save-steps", 100), cwd=ROOT, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _wait_for_metrics(out, self.rng.randint(1, STEPS - 1))
            p.send_signal(signal.SIGTERM)
            log, _ = p.communicate(timeout=120)
            saved = checkpoint.latest_valid(out)
            done = run_cli(out, *RUN, "--save-steps", 100)
            ok = p.returncode == 0 and saved is not None and done.returncode == 0
            ok = ok and _same(adapter(out / f"checkpoint-{STEPS}"), self.reference)
            survived += ok
            lost += not ok
            shutil.rmtree(out, ignore_errors=True)
        self.record("SIGTERM at a random step: saves, exits 0, resumes to the same final weights",
                    trials, survived, lost)


    # 8 ---------------------------------------------------------------------------------
    def replace_window(self, trials: int):
        """A save into an existing checkpoint-N (a resume from checkpoint-(N-1) while N..STEPS are committed),
        killed or failed exactly between moving the old checkpoint-N aside and renaming the new one in. Lost:
        a committed checkpoint that does not verify after the next start, or that start not resuming from
        the newest (checkpoint-STEPS)."""
        for action in ("kill", "raise"):
            survived = lost = 0
            for t in range(trials):
                out = self.work / f"window-{action}-{t}"
                shutil.copytree(self.ref_dir, out)
                n = self.rng.randint(2, STEPS)
                committed = [c["path"] for c in checkpoint.scan(out) if c["ok"]]
                faulted = subprocess.run([sys.executable, "tests/faultinject.py", f"replace-window:{action}", "--"]
                                         + train_args(out, *RUN, "--resume", out / f"checkpoint-{n - 1}"),
                                         cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
                hit = faulted.returncode == -signal.SIGKILL if action == "kill" else (
                    faulted.returncode == 1 and "EIO" in faulted.stdout and "Traceback" not in faulted.stdout)
                # an error in the window puts the old copy back at once; a kill leaves it to the next start
                now = action == "kill" or all(_verifies(c) for c in committed)
                done = run_cli(out, *RUN)
                kept = done.returncode == 0 and all(_verifies(c) for c in committed)
                kept = kept and f"resumed from {out / f'checkpoint-{STEPS}'} at step {STEPS}" in done.stdout
                ok = hit and now and kept and not [p for p in out.iterdir() if "replaced" in p.name]
                ok = ok and _same(adapter(out / f"checkpoint-{STEPS}"), self.reference)
                if not ok:
                    said = [x for x in (faulted.stdout + done.stdout).splitlines()
                            if any(w in x for w in ("ERROR", "WARNING", "resumed", "Traceback", "Error"))]
                    print(f"    window {action} trial {t} (checkpoint-{n}): hit {hit}, intact at once {now}, "
                          f"after the next start {kept}; " + " | ".join(said)[-2000:], file=sys.stderr)
                survived += ok
                lost += not (now and kept)
                shutil.rmtree(out, ignore_errors=True)
            self.record(f"{action} between moving the old checkpoint-N aside and renaming the new one in, "
                        "then --resume auto", trials, survived, lost)


def _verifies(folder: Path) -> bool:
    try:
        checkpoint.verify(folder)
        return True
    except checkpoint.CheckpointError:
        return False


def _wait_for_metrics(out: Path, lines: int, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{out}: no {lines} metric lines within {timeout} s")


def _child_ranks(pid: int) -> list[int]:
    """PIDs of torchrun's worker processes (its direct children running higgs_min.train)."""
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == pid and b"higgs_min.train" in cmd:
                kids.append(int(p.name))
    return sorted(kids)


def run_suite(work: Path, quick: bool, seed: int = 0) -> list[dict]:
    s = Suite(work, seed)
    s.kill9(3 if quick else 50)
    s.disk_full()
    s.read_only_and_vanishing()
    s.corruption(20 if quick else 100)
    s.bad_data(quick)
    s.distributed()
    s.preemption(2 if quick else 10)
    s.replace_window(1 if quick else 20)
    return s.rows


def table(rows) -> str:
    lines = [f"{'fault':<100} {'trials':>6} {'survived':>8} {'data lost':>9}"]
    for r in rows:
        lines.append(f"{(r['fault'] + ' ' + r['note']).strip():<100} {r['trials']:>6} {r['survived']:>8} {r['data_lost']:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small subset run by make test")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random fault schedule")
    args = ap.parse_args(argv)
    import logging
    logging.getLogger("higgs_min").setLevel(logging.ERROR)  # the expected warnings of 100s of trials
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="higgs-faults-") as d:
        rows = run_suite(Path(d), args.quick, args.seed)
    print(table(rows))
    print(f"\n{time.time() - t0:.0f} s on {os.cpu_count()} cores")
    return 0 if all(r["data_lost"] == 0 and r["survived"] == r["trials"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
