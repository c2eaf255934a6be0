import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from higgs_min import checkpoint
from higgs_min.checkpoint import CheckpointError, verify
from tests.faultinject import install
from tests.trainutil import ROOT, env, run, torchrun


@pytest.fixture
def restore_write_file():
    real = checkpoint.write_file
    yield
    checkpoint.write_file = real


def _files(n=3, size=1000):
    return {f"f{i}.bin": os.urandom(size) for i in range(n)} | {"meta.json": b'{"a": 1}\n'}


def test_layout_and_manifest(tmp_path):
    files = _files()
    path = checkpoint.save(tmp_path, 7, files)
    assert path == tmp_path / "checkpoint-7"
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == 2 and m["step"] == 7 and set(m["files"]) == set(files)
    import hashlib
    for name, data in files.items():  # each file smaller than one block: one sha256, that of the whole file
        assert m["files"][name] == {"sha256": [hashlib.sha256(data).hexdigest()], "bytes": len(data)}
    assert (tmp_path / "latest").read_text() == "checkpoint-7\n"
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".latest*"))


def _corrupt(kind, folder):
    target = folder / "f1.bin"
    if kind == "truncated":
        target.write_bytes(target.read_bytes()[:-10])
    elif kind == "bit-flipped":
        data = bytearray(target.read_bytes())
        data[123] ^= 0x10
        target.write_bytes(bytes(data))
    elif kind == "file deleted":
        target.unlink()
    elif kind == "manifest deleted":
        (folder / "manifest.json").unlink()
    elif kind == "manifest edited":
        m = json.loads((folder / "manifest.json").read_text())
        m["files"]["f0.bin"]["sha256"] = ["0" * 64]
        (folder / "manifest.json").write_text(json.dumps(m))
    elif kind == "manifest garbage":
        (folder / "manifest.json").write_text("{not json")
    elif kind == "extra file":
        (folder / "stray.txt").write_text("x")


KINDS = ["truncated", "bit-flipped", "file deleted", "manifest deleted", "manifest edited", "manifest garbage",
         "extra file"]


@pytest.mark.parametrize("kind", KINDS)
def test_verify_catches_damage(tmp_path, kind):
    path = checkpoint.save(tmp_path, 1, _files())
    verify(path)
    _corrupt(kind, path)
    with pytest.raises(CheckpointError):
        verify(path)
    assert checkpoint.latest_valid(tmp_path) is None


def test_cli_verify_and_list(tmp_path):
    good = checkpoint.save(tmp_path, 1, _files())
    bad = checkpoint.save(tmp_path, 2, _files())
    _corrupt("bit-flipped", bad)
    cli = lambda *a: subprocess.run([sys.executable, "-m", "higgs_min.checkpoint", *map(str, a)], cwd=ROOT,  # noqa: E731
                                    env=env(), capture_output=True, text=True)
    r = cli("verify", good)
    assert r.returncode == 0 and r.stdout.startswith("OK") and "step 1" in r.stdout
    r = cli("verify", bad)
    assert r.returncode == 1 and "sha256" in r.stdout
    r = cli("list", tmp_path)
    assert r.returncode == 1 and "checkpoint-2  INVALID" in r.stdout and "checkpoint-1  valid" in r.stdout


def test_failed_save_leaves_previous_checkpoints_and_no_partial_folder(tmp_path, restore_write_file):
    checkpoint.save(tmp_path, 1, _files())
    install(rank=0, code=errno.ENOSPC, after_bytes=1500)
    with pytest.raises(CheckpointError, match=r"checkpoint-2 failed: \[ENOSPC\] No space left on device"):
        checkpoint.save(tmp_path, 2, _files())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]
    verify(tmp_path / "checkpoint-1")
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"


def test_trainer_save_failure_uses_backup_dir_then_raises(tmp_path, restore_write_file):
    out, backup = tmp_path / "out", tmp_path / "backup"
    real_write = checkpoint.write_file
    install(rank=0, code=errno.EIO, after_bytes=10_000, only_under=str(out / ".tmp"))
    assert run(out, "--max-steps", 2, "--backup-dir", backup) == 0
    verify(backup / "checkpoint-2")
    assert not [p for p in out.iterdir() if "checkpoint-" in p.name]
    checkpoint.write_file = real_write
    install(rank=0, code=errno.EIO, after_bytes=10_000, only_under=str(tmp_path / "out2" / ".tmp"))
    rc = run(tmp_path / "out2", "--max-steps", 2)  # no backup: the run fails, loudly
    assert rc == 1
    assert not [p for p in (tmp_path / "out2").iterdir() if "checkpoint" in p.name]
    assert "EIO" in (tmp_path / "out2" / "train.log").read_text()


def test_on_save_error_continue_keeps_training(tmp_path, restore_write_file):
    out = tmp_path / "out"
    install(rank=0, code=errno.ENOSPC, after_bytes=10_000, only_under=str(out / ".tmp-checkpoint-2"))
    assert run(out, "--max-steps", 3, "--save-steps", 1, "--on-save-error", "continue") == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-3"]


def test_keep_last_failure_after_a_save_is_not_a_failed_save(tmp_path, monkeypatch, caplog):
    """A committed checkpoint whose --keep-last rotation fails: logged, the run goes on, nothing is written
    into --backup-dir (the save did not fail)."""
    def broken_rotate(output_dir, keep_last, saved=None):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(output_dir))

    monkeypatch.setattr(checkpoint, "rotate", broken_rotate)
    out, backup = tmp_path / "out", tmp_path / "backup"
    assert run(out, "--max-steps", 2, "--save-steps", 1, "--keep-last", 1, "--backup-dir", backup) == 0
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    assert not backup.exists() or not list(backup.glob("checkpoint-*"))
    assert "saved checkpoint-1, but updating best / --keep-last in" in caplog.text


def test_final_save_when_save_steps_exceed_max_steps(tmp_path, caplog):
    assert run(tmp_path, "--max-steps", 2, "--save-steps", 50) == 0
    verify(tmp_path / "checkpoint-2")
    assert any("only the final checkpoint (step 2)" in r.message for r in caplog.records)
    assert any("saves at steps [2]" in r.message for r in caplog.records)


def test_keep_last_rotation(tmp_path):
    assert run(tmp_path, "--max-steps", 4, "--save-steps", 1, "--keep-last", 2) == 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_rotation_never_counts_broken_folders_as_kept(tmp_path):
    for s in (1, 2, 3):
        checkpoint.save(tmp_path, s, _files())
    _corrupt("truncated", tmp_path / "checkpoint-3")
    checkpoint.rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def _count_reads(monkeypatch) -> list:
    from higgs_min import manifest

    reads, real = [], manifest._read_hashed
    monkeypatch.setattr(manifest, "_read_hashed", lambda path, *a: reads.append(path.parent.name) or real(path, *a))
    return reads


def test_rotation_after_a_save_hashes_nothing(tmp_path, monkeypatch):
    """--keep-last chooses by names and sizes; the checkpoint just saved stands for "a kept one verifies"."""
    for s in (1, 2, 3, 4):
        checkpoint.save(tmp_path, s, _files())
    reads = _count_reads(monkeypatch)
    assert [p.name for p in checkpoint.rotate(tmp_path, 2, saved="checkpoint-4")] == ["checkpoint-2", "checkpoint-1"]
    assert reads == []
    # without `saved`, one kept checkpoint is hashed (the newest, which verifies): its files only
    checkpoint.save(tmp_path, 5, _files())
    reads.clear()
    assert [p.name for p in checkpoint.rotate(tmp_path, 2)] == ["checkpoint-3"]
    assert set(reads) == {"checkpoint-5"}


def test_rotation_spares_the_newest_checkpoint_that_verifies(tmp_path, monkeypatch):
    """Damage that keeps every size (a flipped bit) passes the cheap check, so the damaged folder counts as
    kept; the newest checkpoint that verifies is spared all the same, and older ones go."""
    for s in (1, 2, 3):
        checkpoint.save(tmp_path, s, _files())
    _corrupt("bit-flipped", tmp_path / "checkpoint-3")
    assert [p.name for p in checkpoint.rotate(tmp_path, 1)] == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    verify(tmp_path / "checkpoint-2")


def test_stale_temp_folders_are_reported_and_removed(tmp_path, caplog):
    stale = tmp_path / ".tmp-checkpoint-5-deadbeef"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    assert run(tmp_path, "--max-steps", 1) == 0
    assert not stale.exists()
    assert any("stale temporary checkpoint folder" in r.message for r in caplog.records)


def test_save_over_a_checkpoint_that_fails_between_the_renames_puts_the_old_one_back(tmp_path, monkeypatch):
    """atomic.swap_in: the old checkpoint-N is aside, the rename of the new one in fails: the old one is back
    under its name (and verifies), no temporary or aside folder is left, and the error names the path."""
    old = checkpoint.save(tmp_path, 4, _files())
    before = (old / "manifest.json").read_bytes()
    real = os.rename

    def failing(src, dst):
        if os.path.basename(src).startswith(".tmp-checkpoint-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(CheckpointError, match=r"saving .*checkpoint-4 failed: \[EIO\]"):
        checkpoint.save(tmp_path, 4, _files())
    monkeypatch.setattr(os, "rename", real)
    verify(old)
    assert (old / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "latest"]


def test_restore_replaced_after_a_crash_between_the_renames(tmp_path, caplog):
    """What a crash inside swap_in leaves, and what the next start makes of it."""
    a = checkpoint.save(tmp_path, 4, _files())
    aside = tmp_path / "checkpoint-4.replaced-0123abcd"
    os.rename(a, aside)  # killed after the first rename: no checkpoint-4
    assert checkpoint.latest_valid(tmp_path) is None
    assert checkpoint.restore_replaced(tmp_path) == [a] and checkpoint.latest_valid(tmp_path) == a
    assert not aside.exists() and "restored" in caplog.text
    shutil.copytree(a, aside)  # killed after the second rename: the old copy is superseded
    assert checkpoint.restore_replaced(tmp_path) == [] and not aside.exists()
    verify(a)
    shutil.copytree(a, aside)  # a checkpoint-4 that does not verify loses to a whole old copy, and is kept
    _corrupt("bit-flipped", a)
    assert checkpoint.restore_replaced(tmp_path) == [a]
    verify(a)
    assert len(list(tmp_path.glob("checkpoint-4.invalid-*"))) == 1
    broken = tmp_path / "checkpoint-5.replaced-0123abcd"  # an aside that does not verify is left alone
    shutil.copytree(a, broken)
    (broken / "manifest.json").unlink()
    assert checkpoint.restore_replaced(tmp_path) == [] and broken.exists()
    assert not (tmp_path / "checkpoint-5").exists()


def readonly_dir(path):
    """A folder no one can write: chmod for ordinary users, a read-only bind mount for root."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    ok = ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(path)], capture_output=True)
        pytest.skip("running as root and cannot make a read-only bind mount here")
    return lambda: subprocess.run(["umount", str(path)], check=True)


def test_read_only_output_fails_in_preflight_before_any_step(tmp_path, caplog):
    ro = tmp_path / "ro"
    undo = readonly_dir(ro)
    try:
        assert run(ro / "out") == 1
    finally:
        undo()
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert any("not writable" in m and str(ro / "out") in m for m in errors), errors
    assert not any("step 1" in r.message for r in caplog.records)


def test_two_rank_save_failure_same_error_on_both_ranks_no_hang(tmp_path):
    args = ["--max-steps", "2", "--device", "cpu", "--lora-rank", "4", "--batch-size", "2", "--log-samples", "0",
            "--output-dir", str(tmp_path / "out")]
    t0 = time.time()
    p = torchrun(2, ["0:ENOSPC:5000", "--"] + args, script=str(ROOT / "tests" / "faultinject.py"))
    log, _ = p.communicate(timeout=120)
    assert time.time() - t0 < 90
    assert p.returncode != 0
    lines = [l for l in log.splitlines() if "ERROR" in l and "step 2" in l and "ENOSPC" in l]
    assert len(lines) >= 2, log[-3000:]  # rank 0 and rank 1 report the same failure
    assert not [q for q in (tmp_path / "out").iterdir() if "checkpoint" in q.name]


def test_two_rank_save_crash_on_rank_0_stops_both_ranks_with_the_error(tmp_path):
    """Rank 0 raises something other than a failed write while saving (a bug): rank 1, waiting for the outcome
    in a collective, learns of it and stops naming it, rather than waiting out --dist-timeout."""
    args = ["--max-steps", "2", "--device", "cpu", "--lora-rank", "4", "--batch-size", "2", "--log-samples", "0",
            "--output-dir", str(tmp_path / "out"), "--dist-timeout", "300"]
    t0 = time.time()
    p = torchrun(2, ["0:raise:ValueError", "--"] + args, script=str(ROOT / "tests" / "faultinject.py"))
    log, _ = p.communicate(timeout=200)
    assert time.time() - t0 < 150 and p.returncode != 0
    assert "ValueError: injected into training_files" in log, log[-3000:]  # rank 0: the bug, with its traceback
    told = [l for l in log.splitlines() if "step 2: rank 0 stopped while saving: ValueError: injected" in l]
    assert told, log[-3000:]  # rank 1 stops with the error named
    assert not [q for q in (tmp_path / "out").iterdir() if "checkpoint" in q.name]
