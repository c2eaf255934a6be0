"""Launch the trainer with a save that fails, for fault tests (used under torchrun too).

    python tests/faultinject.py FAIL_SPEC -- <train options>

FAIL_SPEC is `rank:errno:after_bytes`: on that rank, checkpoint writes raise
OSError(errno) once `after_bytes` bytes were written by this process (a disk
that fills up mid-save, or an I/O error).

FAIL_SPEC `rank:raise:ValueError`: on that rank, gathering the checkpoint's contents raises ValueError (an
exception that is not a failed write: a bug), to check that the other ranks learn of it and stop.

FAIL_SPEC `replace-window:kill` or `replace-window:raise`: in a save into an existing checkpoint-N,
exactly between the old folder moved aside (a sibling named checkpoint-N....replaced-...) and the new one
renamed in, this process is killed (SIGKILL), or that rename raises OSError(EIO).
"""
import builtins
import errno
import os
import re
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from higgs_min import checkpoint  # noqa: E402
from higgs_min.train.run import main  # noqa: E402


def install(rank: int, code: int, after_bytes: int, only_under: str | None = None):
    real = checkpoint.write_file
    written = [0]

    def failing_write(path, chunks, **hashing):
        if int(os.environ.get("RANK", "0")) != rank or (only_under and not str(path).startswith(only_under)):
            return real(path, chunks, **hashing)
        data = b"".join(bytes(c) for c in ([chunks] if isinstance(chunks, (bytes, memoryview)) else chunks))
        if written[0] + len(data) > after_bytes:
            keep = max(0, after_bytes - written[0])
            with open(path, "wb") as f:  # a partial file, as a full disk leaves it
                f.write(data[:keep])
            written[0] = after_bytes
            raise OSError(code, os.strerror(code), str(path))
        written[0] += len(data)
        return real(path, data, **hashing)

    checkpoint.write_file = failing_write


def install_raise(rank: int, name: str):
    from higgs_min import train_state

    real = train_state.training_files

    def failing(*args, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank:
            raise getattr(builtins, name)("injected into training_files")
        return real(*args, **kwargs)

    train_state.training_files = failing


def install_replace_window(action: str):
    """Patch os.rename/os.replace: the rename of a new folder onto checkpoint-N while the old copy sits aside."""
    def in_window(src, dst) -> bool:
        src, dst = Path(src), Path(dst)
        if not re.fullmatch(r"checkpoint-\d+", dst.name) or dst.exists() or "replaced" in src.name:
            return False
        return any(dst.name in p.name and "replaced" in p.name for p in dst.parent.iterdir())

    def hooked(real):
        def rename(src, dst, *args, **kwargs):
            if in_window(src, dst):
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            return real(src, dst, *args, **kwargs)
        return rename

    os.rename, os.replace = hooked(os.rename), hooked(os.replace)


if __name__ == "__main__":
    spec, sep, *rest = sys.argv[1:]
    assert sep == "--"
    if spec.startswith("replace-window:"):
        install_replace_window(spec.split(":", 1)[1])
    elif spec.split(":")[1] == "raise":
        install_raise(int(spec.split(":")[0]), spec.split(":")[2])
    else:
        r, code, after = spec.split(":")
        install(int(r), getattr(errno, code), int(after))
    sys.exit(main(rest))
