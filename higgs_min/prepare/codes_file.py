"""Codes files read header-first: (K, T) integer codes from .npy or .safetensors, refused before any allocation.

The header is read and checked against the file before the data: dtype (any integer type, either byte
order), shape (K, T) with T >= 1, and the byte size the header implies against the file's size, so a header
claiming 10^12 frames is a refusal, not a MemoryError. Non-regular files (a FIFO named x.npy) are refused
before opening; too-long paths before touching the file system. Every refusal is a `Refused(field, reason,
detail)`: `reason` is short and counted, `detail` names the file and what would work.

Accepted: `.npy` or `.safetensors` (one tensor), shape (K, T) with T >= 1, any integer dtype (int8..int64,
uint8..uint64, little or big endian, C or Fortran order) whose values lie in [0, codebook_size). Refused by
name: a header claiming more (or fewer) bytes than the file holds, a safetensors header over 1 MiB,
float/bf16/bool dtypes, an `.npz` saved as `.npy`, empty files, non-regular files (a FIFO or a folder named
x.npy; never opened for reading), names over 255 bytes, paths over 4,095 bytes, and more frames than
--max-length allows (from the header alone).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from higgs_min.atomic import HeaderError, read_safetensors_header
from higgs_min.schema import DataError

MAX_PATH_BYTES, MAX_NAME_BYTES = 4095, 255  # PATH_MAX - 1 and NAME_MAX on Linux: longer cannot be opened
MAX_NPY_HEADER = 10_000  # numpy's own default limit
MAX_ST_HEADER = 1 << 20  # a one-tensor safetensors header is ~100 bytes; 1 MiB leaves room for metadata
# safetensors dtypes that hold integers (always little endian, per the format).
ST_INT = {"I8": "<i1", "U8": "<u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8", "U64": "<u8"}


class Refused(Exception):
    """Input that is not used: the field it is in, a short reason (counted in reports) and the full detail."""

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(detail)
        self.field, self.reason, self.detail = field, reason, detail


@dataclass
class CodesHeader:
    path: Path
    dtype: np.dtype
    shape: tuple  # (K, T)
    offset: int  # where the data starts
    fortran: bool


def _stat_codes(path: Path, field: str) -> os.stat_result:
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise Refused(field, "codes path invalid", "the path holds a NUL character")
    if len(raw) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
        raise Refused(field, "codes path too long", f"path of {len(raw)} bytes: a name longer than "
                                                    f"{MAX_NAME_BYTES} bytes or a path longer than {MAX_PATH_BYTES}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Refused(field, "codes file missing", f"file {path} does not exist") from None
    except OSError as e:
        raise Refused(field, "codes file unreadable", f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(field, "codes not a regular file", f"{path} is not a regular file")
    if st.st_size == 0:
        raise Refused(field, "codes file empty", f"cannot read {path}: the file is empty")
    return st


def _open(path: Path, field: str):
    # O_NONBLOCK: should the path become a FIFO after the stat, open() must not wait for a writer.
    try:
        return os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    except OSError as e:
        raise Refused(field, "codes file unreadable", f"cannot read {path}: {e.strerror}") from None


def read_codes_header(path: Path, field: str, K: int) -> CodesHeader:
    """Read only the header of a .npy / .safetensors codes file and check it against the file's size."""
    if path.suffix not in (".npy", ".safetensors"):
        raise Refused(field, "codes format", f"{path} is neither .npy nor .safetensors")
    size = _stat_codes(path, field).st_size
    with _open(path, field) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Refused(field, "codes not a regular file", f"{path} is not a regular file")
        head = f.read(8)
        if path.suffix == ".npy":
            if not head.startswith(b"\x93NUMPY"):
                what = " (a zip archive: an .npz saved as .npy?)" if head.startswith(b"PK") else ""
                raise Refused(field, "codes header invalid", f"cannot read {path}: not an .npy file{what}")
            f.seek(0)
            try:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f, max_header_size=MAX_NPY_HEADER)
            except (ValueError, SyntaxError, TypeError) as e:
                raise Refused(field, "codes header invalid", f"cannot read {path}: bad .npy header ({e})") from None
            offset = f.tell()
        else:
            f.seek(0)
            try:
                header, start = read_safetensors_header(f, size, MAX_ST_HEADER)
            except HeaderError as e:
                raise Refused(field, "codes file truncated" if e.truncated else "codes header invalid",
                              f"cannot read {path}: {e}") from None
            shape, dtype, offset = _safetensors_entry(header, path, field, start)
            fortran = False
    if dtype.kind not in "iu":
        raise Refused(field, "codes dtype", f"{path} has dtype {dtype}, expected integers")
    if len(shape) != 2 or shape[0] != K:
        raise Refused(field, "codes shape", f"{path} has shape {list(shape)}, expected [{K}, T]")
    if shape[1] == 0:
        raise Refused(field, "codes empty", f"{path} has no frames")
    need = offset + shape[0] * shape[1] * dtype.itemsize
    if need != size:
        raise Refused(field, "codes size mismatch", f"{path}: its header says {need} bytes, the file has {size}"
                      + (" (truncated)" if size < need else ""))
    return CodesHeader(path, dtype, tuple(shape), offset, fortran)


def _safetensors_entry(header: dict, path: Path, field: str, start: int):
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise Refused(field, "codes header invalid", f"{path} holds {len(tensors)} tensors, expected 1")
    (entry,) = tensors.values()
    ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
          and all(type(d) is int and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(type(d) is int for d in entry["data_offsets"]))
    if not ok:
        raise Refused(field, "codes header invalid", f"cannot read {path}: safetensors entry without dtype, shape "
                                                     f"and data_offsets")
    if entry["dtype"] not in ST_INT:
        raise Refused(field, "codes dtype", f"{path} has dtype {entry['dtype']}, expected integers")
    begin, end = entry["data_offsets"]
    dtype = np.dtype(ST_INT[entry["dtype"]])
    shape = tuple(entry["shape"])
    if begin != 0 or end != math.prod(shape) * dtype.itemsize:
        raise Refused(field, "codes header invalid", f"cannot read {path}: data_offsets {[begin, end]} do not "
                                                     f"match shape {list(shape)} of {entry['dtype']}")
    return shape, dtype, start


def read_codes(h: CodesHeader, field: str, C: int) -> np.ndarray:
    """The data of a checked header -> (K, T) int16, every value in [0, C)."""
    nbytes = h.shape[0] * h.shape[1] * h.dtype.itemsize
    with _open(h.path, field) as f:
        f.seek(h.offset)
        buf = f.read(nbytes)
    if len(buf) != nbytes:  # the file changed since its header was read
        raise Refused(field, "codes size mismatch", f"{h.path}: {len(buf)} of {nbytes} data bytes could be read")
    arr = np.frombuffer(buf, dtype=h.dtype).reshape(h.shape, order="F" if h.fortran else "C")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= C:
        raise Refused(field, "codes out of range", f"{h.path} has values in [{lo}, {hi}], expected [0, {C})")
    return arr.astype(np.int16)


def load_codes(path: Path, field: str, K: int, C: int) -> torch.Tensor:
    """Read integer codes (K, T) from .npy or .safetensors, header first (above), checked; DataError naming
    `field` (e.g. "messages[1].content[0].codes", "--reference-codes") otherwise. (Data lines go through
    sanitize.line_to_plan; this serves single files, e.g. generate.)"""
    try:
        arr = read_codes(read_codes_header(Path(path), field, K), field, C)
    except Refused as r:
        raise DataError(f"{r.field}: {r.detail}") from None
    return torch.from_numpy(arr.astype(np.int64))
