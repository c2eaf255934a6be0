"""A seeded generator of damaged data lines and codes files, with the outcome each must have.

    python -m tests.fuzzgen --lines 100000 --seed 1     (`make fuzz N=100000`): tried / rejected / crashed

Every line starts from a valid conversation and gets one mutation whose outcome is decided HERE, from what
the mutation did and the documented rules of a data line (higgs_min/prepare/sanitize.py and codes_file.py), never by
asking the loader: "valid" (must become a sample; `same_as` is a line the sample must equal), "reject"
(must be named, with its line number), or "either" (the rules leave it open). Codes files of every supported
format are written good and broken (empty, truncated, npz under .npy, huge headers, bf16/float/bool, wrong
shapes, out-of-range values, FIFOs, directories, missing, over-long names).

`make test` runs 1,200 lines with a fixed seed (tests/test_fuzz.py). Measured on the project's 2-core machine:
`make fuzz N=100000 SEED=2` tried 97,528 lines (the rest blank), rejected 73,463, crashed 0, unforeseen
exceptions 0, wrong outcomes 0, in 186 s (SEED=1: 97,473 / 73,375 / 0 / 0 / 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
K, C, V = 4, 16, 1024
MAX_LENGTH = 2048  # the base lines stay far below it (texts of <= 12 short words)
TOKENIZER = ROOT / "data" / "tokenizer.json"  # byte-level BPE, like the released one


@dataclass
class Case:
    raw: bytes  # the line, without its newline
    expect: str  # valid | reject | either | blank
    kind: str  # the mutation's name
    same_as: bytes | None = None  # valid lines: the undamaged line whose plan they must equal


def _npy_header(shape, descr="<i2", fortran=False) -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _st(dtype: str, shape, data: bytes, header_extra=None, n_override=None) -> bytes:
    h = {"codes": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(data)]}}
    h.update(header_extra or {})
    body = json.dumps(h).encode()
    return struct.pack("<Q", len(body) if n_override is None else n_override) + body + data


def write_codes_files(folder: Path, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Good and bad codes files under folder/codes/; returns their paths relative to folder."""
    d = folder / "codes"
    d.mkdir(parents=True, exist_ok=True)
    good, bad = [], []

    def put(name, data: bytes, ok: bool):
        (d / name).write_bytes(data)
        (good if ok else bad).append(f"codes/{name}")

    for i, dt in enumerate(["<i2", ">i2", "<i4", ">i8", "<u1", "<u2", ">u4", "<i8"]):
        T = int(rng.integers(1, 12))
        arr = rng.integers(0, C, (K, T)).astype(dt)
        put(f"g{i}.npy", _npy_header((K, T), arr.dtype.str) + arr.tobytes(), True)
    arr = rng.integers(0, C, (K, 7)).astype("<i4")
    put("gf.npy", _npy_header((K, 7), "<i4", True) + np.asfortranarray(arr).tobytes(order="F"), True)
    for i, (st, dt) in enumerate([("I16", "<i2"), ("I32", "<i4"), ("U8", "<u1"), ("I64", "<i8"), ("U64", "<u8")]):
        arr = rng.integers(0, C, (K, 5)).astype(dt)
        put(f"g{i}.safetensors", _st(st, (K, 5), arr.tobytes()), True)
    ok16 = rng.integers(0, C, (K, 6)).astype("<i2")
    hdr = _npy_header((K, 6))
    good_st = _st("I16", (K, 6), ok16.tobytes())
    np.savez(d / "z.npz", codes=ok16)
    broken = {
        "empty.npy": b"", "empty.safetensors": b"",
        "npz.npy": (d / "z.npz").read_bytes(),
        "trunc.npy": hdr + ok16.tobytes()[:-1], "trunc_hdr.npy": hdr[:20], "extra.npy": hdr + ok16.tobytes() + b"\0",
        "huge.npy": _npy_header((K, 10**12)) + ok16.tobytes(), "huge3.npy": _npy_header((K, 10**6, 10**6)) + b"\0" * 8,
        "float.npy": _npy_header((K, 6), "<f4") + b"\0" * (K * 6 * 4), "bool.npy": _npy_header((K, 6), "|b1") + b"\0" * 24,
        "obj.npy": _npy_header((K, 6), "|O") + b"\0" * 48, "k3.npy": _npy_header((3, 6)) + ok16[:3].tobytes(),
        "flat.npy": _npy_header((K * 6,)) + ok16.tobytes(), "t0.npy": _npy_header((K, 0)),
        "big.npy": _npy_header((K, 6)) + np.full((K, 6), C, "<i2").tobytes(),
        "neg.npy": _npy_header((K, 6)) + np.full((K, 6), -1, "<i2").tobytes(),
        "garbage.npy": b"not an array at all", "badhdr.npy": b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{",
        "evalhdr.npy": b"\x93NUMPY\x01\x00" + struct.pack("<H", 38) + b"{'descr': __import__('os'), 'x': 1}    \n",
        "trunc.safetensors": good_st[:-3], "trunc8.safetensors": good_st[:5], "hdronly.safetensors": good_st[:20],
        "extra.safetensors": good_st + b"\0",
        "bf16.safetensors": _st("BF16", (K, 6), b"\0" * 48), "f32.safetensors": _st("F32", (K, 6), b"\0" * 96),
        "bool.safetensors": _st("BOOL", (K, 6), b"\0" * 24),
        "two.safetensors": _st("I16", (K, 6), ok16.tobytes(), {"b": {"dtype": "I16", "shape": [K, 6],
                                                                     "data_offsets": [48, 96]}}) + ok16.tobytes(),
        "hugehdr.safetensors": _st("I16", (K, 6), ok16.tobytes(), n_override=2**63),
        "offs.safetensors": struct.pack("<Q", 60) + json.dumps({"c": {"dtype": "I16", "shape": [K, 6],
                                                                    "data_offsets": [0, 4]}}).encode()[:60] + b"\0" * 4,
        "notjson.safetensors": struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8,
        "st_big.safetensors": _st("I16", (K, 6), np.full((K, 6), 99, "<i2").tobytes()),
        "st_k3.safetensors": _st("I16", (3, 6), ok16[:3].tobytes()),
        "audio.wav": b"RIFF....WAVE", "noext": ok16.tobytes(),
    }
    for name, data in broken.items():
        put(name, data, False)
    (d / "dir.npy").mkdir(exist_ok=True)
    bad.append("codes/dir.npy")
    if not (d / "fifo.npy").exists():
        os.mkfifo(d / "fifo.npy")
    bad.append("codes/fifo.npy")
    if not (d / "dangling.npy").is_symlink():
        os.symlink(d / "nowhere.npy", d / "dangling.npy")
    bad += ["codes/dangling.npy", "codes/missing.npy", "codes/" + "x" * 300 + ".npy", "codes/" + "a/" * 2100 + "b.npy",
            "codes/nul\u0000.npy", ""]
    return good, bad


WORDS = ["hello", "world", "the", "cat", "Paris", "é", "日本語", "\U0001f600", "ß", "naïve", "x", "42", "?", "",
         "a\tb", "line\nbreak", "quote\"d", "back\\slash", "\u200b", "\u0301", "\x01"]


def _text(rng: random.Random, n=None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12) if n is None else n))


def base_conversation(rng: random.Random, good: list[str]) -> dict:
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": _text(rng)})
    for _ in range(rng.randint(1, 2)):
        user = _text(rng) if rng.random() < 0.6 else [{"type": "audio", "codes": rng.choice(good)},
                                                       {"type": "text", "text": _text(rng)}]
        asst = [{"type": "text", "text": _text(rng)}]
        if rng.random() < 0.7:
            asst.append({"type": "audio", "codes": rng.choice(good)})
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": asst}]
    return {"messages": msgs}


def _items(obj):
    """(message, item) for every content item of a conversation."""
    return [(m, i) for m in obj["messages"] if isinstance(m["content"], list) for i in m["content"]]


def dumps(obj, rng: random.Random | None = None) -> bytes:
    ascii_ = rng is not None and rng.random() < 0.3
    return json.dumps(obj, ensure_ascii=ascii_).encode()


def mutate(obj: dict, rng: random.Random, good: list[str], bad: list[str], line_no: int) -> Case:
    """One mutation of a valid conversation, with its outcome decided from the rules, not by the loader."""
    base = dumps(obj)
    o = json.loads(base)
    m = rng.choice(o["messages"])
    items = _items(o)
    r = rng.randrange(40)
    r = 12 if r >= 34 else r  # broken codes files get 7 shares of 40
    V_, R, E = "valid", "reject", "either"
    if r == 0:
        return Case(base, V_, "unchanged", base)
    if r == 1:  # unknown keys are ignored, whatever (valid JSON) they hold
        tgt = rng.choice([o, m] + [i for _, i in items])
        tgt[rng.choice(["id", "duration", "meta", "x-y", "\u00e9"])] = rng.choice(
            [1, -2.5e300, "s", None, True, [], {"a": [1, {"b": None}]}, 10**19, -(10**18), "\U0001f600"])
        return Case(dumps(o, rng), V_, "extra key", base)
    if r == 2:  # insignificant whitespace and \u escapes of every non-ASCII character
        s = json.dumps(o, ensure_ascii=True, indent=None, separators=(" , ", " :\t"))
        return Case((s + rng.choice([" ", "\r", "\t", ""])).encode(), V_, "whitespace and escapes", base)
    if r == 3:  # a text content given as a list of one text item: the same layout
        for mm in o["messages"]:
            if isinstance(mm["content"], str):
                mm["content"] = [{"type": "text", "text": mm["content"]}]
        return Case(dumps(o), V_, "string content as a text item", base)
    if r == 4:
        del o["messages"]
        o[rng.choice(["conversations", "message", "Messages", "turns"])] = obj["messages"]
        return Case(dumps(o), R, "messages renamed")
    if r == 5:
        o["messages"] = rng.choice([None, 1, "hi", {"role": "user"}, True, 1.5])
        return Case(dumps(o), R, "messages of wrong type")
    if r == 6:
        return Case(dumps({"messages": []}), R, "empty conversation")
    if r == 7:
        o["messages"][rng.randrange(len(o["messages"]))] = rng.choice(["hi", 1, None, [], ["role", "user"]])
        return Case(dumps(o), R, "message not an object")
    if r == 8:
        if rng.random() < 0.5:
            del m["role"]
        else:
            m["role"] = rng.choice(["Assistant", "robot", "", 3, None, ["user"], "user ", "tool", "developer"])
        return Case(dumps(o), R, "bad role")
    if r == 9:
        m["content"] = rng.choice([None, 5, True, {"type": "text", "text": "a"}, 1.0])
        return Case(dumps(o), R, "content of wrong type")
    if not items and r in range(10, 15):
        r = 15
    if r == 10:
        rng.choice(items)[1]["type"] = rng.choice(["image", "Audio", "", None, 1, "input_audio"])
        return Case(dumps(o), R, "unknown item type")
    if r == 11:
        i = rng.choice(items)[1]
        if i["type"] == "text":
            i["text"] = rng.choice([None, 1, ["a"], {"t": 1}])
        else:
            i["codes"] = rng.choice([None, 1, ["a.npy"], {"p": 1}, True])
        return Case(dumps(o), R, "text or codes of wrong type")
    if r == 12:
        aud = [i for _, i in items if i["type"] == "audio"]
        if not aud:
            return Case(base, V_, "unchanged", base)
        i = rng.choice(aud)
        choice = rng.random()
        if choice < 0.6:
            i["codes"] = rng.choice(bad)
            return Case(dumps(o), R, "broken codes file: " + i["codes"][:40])
        if choice < 0.8:
            del i["codes"]
            if rng.random() < 0.5:
                i["audio"] = "a.wav"
            return Case(dumps(o), R, "audio item without codes")
        i["codes"] = rng.choice(good)
        return Case(dumps(o), V_, "another good codes file", None)
    if r == 13:
        aud = [i for _, i in items if i["type"] == "audio"]
        if not aud:
            return Case(base, V_, "unchanged", base)
        rng.choice(aud)["codec"] = rng.choice([1, None, ["x"], {"a": 1}])
        return Case(dumps(o), R, "codec not a string")
    if r == 14:
        i = rng.choice(items)[1]
        if i["type"] == "audio":
            i["codec"] = "dac:0123456789abcdef"
            return Case(dumps(o), V_, "codec recorded", None)
        i["text"] = _text(rng)
        return Case(dumps(o), V_, "other text", None)
    if r == 15:  # no assistant turn: a counted skip, still named
        o["messages"] = [x for x in o["messages"] if x.get("role") != "assistant"] or [{"role": "user", "content": "a"}]
        return Case(dumps(o), R, "no supervised token")
    if r == 16:  # every " a" is at least one token of a byte-level BPE: more positions than MAX_LENGTH
        m["content"] = "a " * (MAX_LENGTH + rng.randint(0, 3 * MAX_LENGTH))
        return Case(dumps(o), R, "longer than max length")
    if r == 17:  # a proper prefix of a JSON object is never JSON
        cut = rng.randrange(1, len(base))
        return Case(base[:cut], R, "truncated line")
    if r == 18:  # bytes that are not UTF-8, inside a string
        at = base.index(b'"', rng.randrange(len(base) // 2)) + 1
        junk = rng.choice([b"\xff", b"\xfe\xff", b"\xc3", b"\xe6\x97", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"])
        return Case(base[:at] + junk + base[at:], R, "invalid UTF-8")
    if r == 19:  # an escaped lone (or reversed) surrogate inside some string
        esc = rng.choice([b"\\ud800", b"\\udc00\\ud800", b"\\uDFFF", b"\\ud83d x"])
        at = base.index(b'"', rng.randrange(len(base) // 2)) + 1
        return Case(base[:at] + esc + base[at:], R, "lone surrogate")
    if r == 20:
        o["x"] = float("nan")  # json.dumps writes NaN / Infinity literals
        o["x"] = rng.choice([float("nan"), float("inf"), -float("inf")])
        return Case(dumps(o), R, "NaN or Infinity")
    if r == 21:
        digits = rng.choice([b"", b"-"]) + b"9" * rng.randint(21, 6000)  # written raw: past Python's str->int limit
        return Case(base[:-1] + b', "id": ' + digits + b"}", R, "huge integer")
    if r == 22:
        depth = rng.randint(1200, 3000)
        return Case(base[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}", R, "nested too deeply")
    if r == 23:
        depth = rng.randint(2, 60)
        return Case(base[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}", V_, "nested a little", base)
    if r == 24:  # a byte-order mark: accepted at the very start of the file only
        return Case(b"\xef\xbb\xbf" + base, V_ if line_no == 1 else R, "byte-order mark", base)
    if r == 25:
        at = rng.randrange(len(base))
        return Case(base[:at] + rng.choice([b"\x00", b"\x1b", b"\x0b"]) + base[at:], E, "control byte")
    if r == 26:  # a control character as a raw byte inside a JSON string is not JSON
        at = base.index(b'"', rng.randrange(len(base) // 2)) + 1
        return Case(base[:at] + rng.choice([b"\x00", b"\x01", b"\x1f"]) + base[at:], R, "raw control char in string")
    if r == 27:
        junk = rng.choice([b"[]", b"null", b"1", b'"s"', b"{}", b"true", b"[{}]", b"{\"messages\": {}}"])
        return Case(junk, R, "not an object with messages")
    if r == 28:  # random byte flips anywhere: anything may happen, but no exception
        b = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return Case(bytes(b), E, "byte flips")
    if r == 29:
        return Case(base + b" " + base, R, "two objects on one line")
    if r == 30:  # the last of duplicate keys wins in JSON parsers; the rules do not say, so either
        return Case(base[:-1] + b', "messages": ' + rng.choice([b"[]", b"1", dumps(obj["messages"])]) + b"}", E,
                    "duplicate key")
    if r == 31:  # special-token text inside a text (tokenized as the special token): the rules do not say
        m["content"] = rng.choice(["<|eot_id|>", "<|AUDIO_OUT|> hi", "<|begin_of_text|>"])
        return Case(dumps(o), E, "special token in text")
    if r == 32:
        return Case(rng.choice([b"", b"   ", b"\t", b"\r"]), "blank", "blank line")
    b = bytearray(base)  # r == 33: delete a random span
    a = rng.randrange(len(b))
    del b[a:a + rng.randint(1, 8)]
    return Case(bytes(b), E, "span deleted")


def generate(folder: Path, n: int, seed: int) -> list[Case]:
    """Write folder/codes/* and return n cases (line i+1 is cases[i])."""
    rng = random.Random(seed)
    good, bad = write_codes_files(folder, np.random.default_rng(seed))
    return [mutate(base_conversation(rng, good), rng, good, bad, i + 1) for i in range(n)]


def write_lines(path: Path, cases: list[Case]) -> Path:
    path.write_bytes(b"".join(c.raw + b"\n" for c in cases))
    return path


def encoder():
    from higgs_min.chat import ChatEncoder
    return ChatEncoder(TOKENIZER, K, C, V)


def check(folder: Path, cases: list[Case], enc, strict_plans=True) -> dict:
    """Run every case through line_to_plan; count and collect what broke the rules (failures)."""
    from higgs_min.prepare.sanitize import Rejection, line_to_plan
    source = folder / "d.jsonl"
    stats = {"tried": 0, "rejected": 0, "crashed": 0, "unforeseen": 0, "wrong": 0}
    failures, reasons = [], {}
    for line_no, c in enumerate(cases, 1):
        if c.expect == "blank":
            continue
        stats["tried"] += 1
        raw = c.raw[3:] if line_no == 1 and c.raw.startswith(b"\xef\xbb\xbf") else c.raw  # the file's BOM rule
        try:
            out = line_to_plan(raw, line_no, source, enc, MAX_LENGTH, None)
        except BaseException as e:  # noqa: BLE001 -- counting escapes is the point; interrupts still stop below
            if isinstance(e, KeyboardInterrupt):
                raise
            stats["crashed"] += 1
            failures.append((line_no, c.kind, f"escaped {type(e).__name__}: {e}"))
            continue
        if isinstance(out, Rejection):
            stats["rejected"] += 1
            reasons[out.reason] = reasons.get(out.reason, 0) + 1
            if out.reason.startswith("unexpected "):
                stats["unforeseen"] += 1
                failures.append((line_no, c.kind, out.message()))
            if out.line != line_no or c.expect == "valid":
                stats["wrong"] += 1
                failures.append((line_no, c.kind, f"valid line rejected: {out.message()}"))
        elif c.expect == "reject":
            stats["wrong"] += 1
            failures.append((line_no, c.kind, "must-reject line accepted"))
        elif strict_plans and c.same_as is not None:
            ref = line_to_plan(c.same_as, line_no, source, enc, MAX_LENGTH, None)
            if not all(np.array_equal(getattr(out, f), getattr(ref, f)) for f in ("tokens", "flags", "codes", "segments")):
                stats["wrong"] += 1
                failures.append((line_no, c.kind, "plan differs from the undamaged line's"))
    stats["reasons"] = reasons
    stats["failures"] = failures
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzzgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=100_000, help="lines to try")
    ap.add_argument("--seed", type=int, default=int(time.time()), help="seed (printed, to replay a finding)")
    ap.add_argument("--chunk", type=int, default=5000, help="lines per generated file")
    args = ap.parse_args(argv)
    import logging
    logging.getLogger("higgs_min").setLevel(logging.ERROR)
    enc, total, t0 = encoder(), {"tried": 0, "rejected": 0, "crashed": 0, "unforeseen": 0, "wrong": 0}, time.time()
    reasons, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        for start in range(0, args.lines, args.chunk):
            folder = Path(tmp) / f"chunk{start}"
            cases = generate(folder, min(args.chunk, args.lines - start), args.seed + start)
            s = check(folder, cases, enc)
            for k in total:
                total[k] += s[k]
            for k, v in s["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
            failures += [(start, *f) for f in s["failures"]]
            print(f"  {start + len(cases):>8} lines  {time.time() - t0:7.1f} s  " +
                  "  ".join(f"{k} {v}" for k, v in total.items()), flush=True)
    print(f"fuzz seed {args.seed}: tried {total['tried']}, rejected {total['rejected']}, crashed {total['crashed']}, "
          f"unforeseen {total['unforeseen']}, wrong outcome {total['wrong']} in {time.time() - t0:.0f} s")
    print("rejections by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    for start, line, kind, what in failures[:30]:
        print(f"  FAIL chunk seed {args.seed + start} line {line} ({kind}): {what[:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
