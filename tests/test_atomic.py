"""The one atomic writer (higgs_min/atomic.py) and the files the project writes through it.

- modes: under umask 022 every file a user gets is 0644 and every folder 0755 (checkpoint, export, corpus,
  converted JSONL and its wavs, generated wav and codes, run_config), so a colleague can read them;
- SIGKILL inside each writer (mid-write, and after the fsync before the rename) leaves no visible partial
  file or folder: the destination is absent, or whole with its old content.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from higgs_min import atomic, checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every visible path under root (and root itself) -> its permission bits, e.g. {'a/b.json': '0o644'}."""
    out = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        if not any(part.startswith(".") for part in p.relative_to(root).parts):
            out[str(p.relative_to(root))] = oct(stat.S_IMODE(p.stat().st_mode))
    return out


def assert_shared(root: Path) -> None:
    bad = {k: v for k, v in modes(root).items() if v != ("0o755" if (root / k).is_dir() else "0o644")}
    assert not bad, f"not 0644 files / 0755 folders under {root}: {bad}"


def test_writers_give_0644_files_and_0755_folders(tmp_path, umask022):
    tmp_path = tmp_path / "shared"  # pytest's own folder is 0700
    tmp_path.mkdir()
    atomic.write_text(tmp_path / "a.txt", "x")
    atomic.write_json(tmp_path / "b.json", {"a": 1})
    with atomic.replacing(tmp_path / "c.bin", "wb") as f:
        f.write(b"123")
    atomic.replace_file(tmp_path / "d.bin", [b"1", b"2"])
    with atomic.staged_folder(tmp_path / "folder") as d:
        (d / "inner.bin").write_bytes(b"z")
        atomic.write_file(d / "w.bin", b"w")
    assert_shared(tmp_path)
    (tmp_path / "out").mkdir()
    checkpoint.save(tmp_path / "out", 3, {"t.safetensors": {"w": torch.ones(2)}, "s.json": b"{}\n"})
    assert_shared(tmp_path / "out")
    assert checkpoint.read_pointer(tmp_path / "out") == "checkpoint-3"


def test_export_generate_convert_pack_outputs_are_shared(tmp_path, umask022):
    """The real commands, each writing through the atomic writer."""
    tmp_path = tmp_path / "shared"  # pytest's own folder is 0700
    tmp_path.mkdir()
    from higgs_min.export.merge import main as export_main
    from higgs_min.prepare.convert import main as convert_main
    from higgs_min.prepare.pack import pack
    from higgs_min.train.options import DATA
    from tests.trainutil import run

    assert run(tmp_path / "run", "--max-steps", 1) == 0
    assert_shared(tmp_path / "run" / "checkpoint-1")
    assert oct(stat.S_IMODE((tmp_path / "run" / "run_config.json").stat().st_mode)) == "0o644"
    assert export_main(["--adapter", str(tmp_path / "run" / "checkpoint-1"), "--out", str(tmp_path / "merged")]) == 0
    assert_shared(tmp_path / "merged")

    pack([DATA / "demo.jsonl"], DATA / "tokenizer.json", tmp_path / "corpus", 8, 1024)
    assert_shared(tmp_path / "corpus")

    import io
    import wave
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000), w.writeframes(b"\1\0" * 2400)
    rec = {"messages": [{"role": "user", "content": "Say hi."},
                        {"role": "assistant", "content": "Hi.",
                         "audio": {"data": base64.b64encode(buf.getvalue()).decode()}}]}
    (tmp_path / "src.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "conv").mkdir()
    assert convert_main(["--from", "openai", str(tmp_path / "src.jsonl"), "--out",
                         str(tmp_path / "conv" / "out.jsonl")]) == 0
    assert_shared(tmp_path / "conv")

    out = tmp_path / "gen"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "higgs_min.generate", "--adapter", str(tmp_path / "run" / "checkpoint-1"),
                        "--random-codec-seed", "0", "--text", "hi", "--force-audio", "--max-new-tokens", "12",
                        "--out", str(out / "o.wav"), "--codes-out", str(out / "o.npy")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"o.wav", "o.npy"} <= set(modes(out))
    assert_shared(out)


# ----------------------------------------------------------------------------- SIGKILL inside each writer

KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from higgs_min import atomic
    where, writer, dest = sys.argv[1], sys.argv[2], sys.argv[3]
    real_fsync, real_write = os.fsync, None
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "after-fsync":          # the data is on disk, the rename has not happened
        def fsync(fd):
            real_fsync(fd)
            die()
        os.fsync = fsync
    payload = [b"new-" * 1000] * 64
    def chunks():                       # mid-write: die after the first chunk went out
        yield payload[0]
        if where == "mid-write":
            die()
        yield from payload[1:]
    if writer == "replace_file":
        atomic.replace_file(dest, chunks())
    elif writer == "replacing":
        with atomic.replacing(dest, "wb") as f:
            for c in chunks():
                f.write(c)
    elif writer == "staged_folder":
        with atomic.staged_folder(dest, replace=True) as d:
            atomic.write_file(os.path.join(d, "part.bin"), chunks())
    elif writer == "wav":
        import torch
        from higgs_min.audio.codec import write_wav
        if where == "mid-write":
            import wave
            real = wave.Wave_write.writeframes
            def writeframes(self, data):
                real(self, data[: len(data) // 2])
                die()
            wave.Wave_write.writeframes = writeframes
        write_wav(dest, torch.zeros(48000), 24000)
    print("finished")
""")


@pytest.mark.parametrize("writer", ["replace_file", "replacing", "staged_folder", "wav"])
@pytest.mark.parametrize("where", ["mid-write", "after-fsync"])
def test_sigkill_inside_a_writer_leaves_no_visible_partial_file(tmp_path, writer, where):
    dest = tmp_path / ("d" if writer == "staged_folder" else "f.wav" if writer == "wav" else "f.bin")
    old = b"old content\n"
    if writer == "staged_folder":
        dest.mkdir()
        (dest / "part.bin").write_bytes(old)
    else:
        dest.write_bytes(old)
    r = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT)), where, writer, str(dest)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr[-2000:])
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == [dest.name]  # nothing else appeared under a visible name
    if writer == "staged_folder":
        assert (dest / "part.bin").read_bytes() == old and [p.name for p in dest.iterdir()] == ["part.bin"]
    else:
        assert dest.read_bytes() == old  # the old file, untouched: never a part of the new one


def test_safetensors_header_reader_names_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(3)}, str(tmp_path / "ok.safetensors"))
    header, start = atomic.read_safetensors_header(tmp_path / "ok.safetensors")
    assert header["a"]["shape"] == [3] and start + 24 == (tmp_path / "ok.safetensors").stat().st_size
    assert atomic.read_safetensors_header((tmp_path / "ok.safetensors").read_bytes()) == (header, start)
    (tmp_path / "short").write_bytes(b"\1\0")
    with pytest.raises(atomic.HeaderError, match="shorter than a safetensors header") as e:
        atomic.read_safetensors_header(tmp_path / "short")
    assert e.value.truncated
    (tmp_path / "long").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(atomic.HeaderError, match="header of 1000000 bytes in a file of 10"):
        atomic.read_safetensors_header(tmp_path / "long")
    (tmp_path / "list").write_bytes((2).to_bytes(8, "little") + b"[]")
    with pytest.raises(atomic.HeaderError, match="not an object"):
        atomic.read_safetensors_header(tmp_path / "list")
