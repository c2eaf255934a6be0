"""The per-line exception boundary: each example of issue #19 is its own regression test."""
import json
import logging
import os
import struct

import numpy as np
import pytest

from higgs_min.chat import ChatEncoder
from higgs_min.data import Plan
from higgs_min.schema import DataError
from higgs_min.prepare.sanitize import RejectReport, Rejection, line_to_plan, load_jsonl
from tests.helpers import conversation, make_tokenizer, write_codes, write_jsonl
from tests.trainutil import ROOT, run

K, C, V = 4, 16, 400


@pytest.fixture
def encoder(tmp_path):
    return ChatEncoder(make_tokenizer(tmp_path / "tok.json"), K, C, V)


@pytest.fixture
def bpe_encoder():
    """The demo's byte-level BPE tokenizer (every character costs something: the raw-length bound applies)."""
    return ChatEncoder(ROOT / "data" / "tokenizer.json", K, C, 1024)


def one(tmp_path, encoder, row, max_length=1000, audio_root=None):
    """line_to_plan on one line written as line 7 of d.jsonl (the line number must come through)."""
    raw = row if isinstance(row, bytes) else json.dumps(row).encode()  # escaped: "\\udc00" stays 6 characters
    return line_to_plan(raw, 7, tmp_path / "d.jsonl", encoder, max_length, audio_root)


def rejected(out, reason, field=None, detail=None):
    assert isinstance(out, Rejection), out
    assert out.line == 7 and out.reason == reason, out
    if field is not None:
        assert out.field == field, out
    if detail is not None:
        assert detail in out.detail, out
    return out


def test_a_valid_line_is_a_plan(tmp_path, encoder):
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    plan = one(tmp_path, encoder, conversation())
    assert isinstance(plan, Plan) and plan.index == 7 and plan.codes.shape == (5, K)


def test_integer_of_5000_digits(tmp_path, encoder):
    rejected(one(tmp_path, encoder, b'{"messages": [{"role": "user", "content": ' + b"9" * 5000 + b"}]}"),
             "integer out of range", detail="5000 characters")


def test_reversed_surrogate_pair_in_a_text(tmp_path, encoder):
    row = conversation()
    row["messages"][2]["content"][0]["text"] = "ab\udc00\ud800"
    rejected(one(tmp_path, encoder, row), "lone surrogate", field="messages[2].content[0].text")
    # a valid pair (an emoji) is a character: accepted
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    assert isinstance(one(tmp_path, encoder, b'{"messages": [{"role": "assistant", "content": "\\ud83d\\ude00"}]}'),
                      Plan)


def test_value_nested_1500_deep(tmp_path, encoder):
    rejected(one(tmp_path, encoder, b'{"messages": ' + b"[" * 1500 + b"]" * 1500 + b"}"), "nested too deeply")


@pytest.mark.parametrize("text", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_nan_and_infinity_are_refused(tmp_path, encoder, text):
    out = one(tmp_path, encoder, b'{"x": ' + text + b', "messages": [{"role": "assistant", "content": "a"}]}')
    assert isinstance(out, Rejection) and out.reason in ("NaN or Infinity", "number out of range"), out


def _codes_case(tmp_path, encoder, name, data: bytes | None = None, max_length=1000):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    return one(tmp_path, encoder, conversation(name), max_length)


def test_empty_codes_file(tmp_path, encoder):
    rejected(_codes_case(tmp_path, encoder, "e.npy", b""), "codes file empty", field="messages[2].content[1].codes")


def test_npz_saved_as_npy(tmp_path, encoder):
    np.savez(tmp_path / "z.npz", codes=np.zeros((K, 5), np.int16))
    rejected(_codes_case(tmp_path, encoder, "z.npy", (tmp_path / "z.npz").read_bytes()), "codes header invalid",
             detail=".npz saved as .npy")


def test_empty_and_truncated_safetensors(tmp_path, encoder):
    from safetensors.numpy import save_file
    save_file({"codes": np.zeros((K, 50), np.int16)}, str(tmp_path / "full.safetensors"))
    full = (tmp_path / "full.safetensors").read_bytes()
    assert isinstance(_codes_case(tmp_path, encoder, "full.safetensors"), Plan)
    rejected(_codes_case(tmp_path, encoder, "e.safetensors", b""), "codes file empty")
    for cut in (4, 20, len(full) - 1):
        out = _codes_case(tmp_path, encoder, f"t{cut}.safetensors", full[:cut])
        assert isinstance(out, Rejection) and out.reason.startswith("codes "), (cut, out)


def test_bf16_safetensors(tmp_path, encoder):
    import torch
    from safetensors.torch import save_file
    save_file({"codes": torch.zeros(K, 5, dtype=torch.bfloat16)}, str(tmp_path / "bf.safetensors"))
    rejected(_codes_case(tmp_path, encoder, "bf.safetensors"), "codes dtype", detail="BF16")


def test_path_longer_than_255_bytes(tmp_path, encoder):
    rejected(_codes_case(tmp_path, encoder, "x" * 300 + ".npy"), "codes path too long")
    rejected(_codes_case(tmp_path, encoder, "a/" * 2100 + "x.npy"), "codes path too long")


def _npy_header(shape, descr="<i2") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def test_npy_header_claiming_10_to_the_12_frames(tmp_path, encoder):
    # no allocation: the header is checked against the file's size first
    rejected(_codes_case(tmp_path, encoder, "huge.npy", _npy_header((K, 10**12)) + b"\0" * 64), "codes size mismatch",
             detail="truncated")
    # a true file longer than --max-length: refused from its header, before its data is read
    write_codes(tmp_path / "long.npy", K, 3000, C)
    rejected(_codes_case(tmp_path, encoder, "long.npy", max_length=1000), "longer than max length",
             detail="at least")


def test_fifo_named_npy_does_not_block(tmp_path, encoder):
    os.mkfifo(tmp_path / "f.npy")
    rejected(_codes_case(tmp_path, encoder, "f.npy"), "codes not a regular file")


def test_every_integer_dtype_that_fits_either_endianness(tmp_path, encoder):
    from safetensors.numpy import save_file
    ref = np.random.default_rng(0).integers(0, C, (K, 6))
    for dt in ("<i2", ">i2", ">i4", "<u1", "<i8", ">u8", "<u4"):
        np.save(tmp_path / "c.npy", ref.astype(dt))
        plan = one(tmp_path, encoder, conversation("c.npy"))
        assert isinstance(plan, Plan) and np.array_equal(plan.codes.T, ref), dt
    np.save(tmp_path / "c.npy", np.asfortranarray(ref.astype(np.int32)))
    assert np.array_equal(one(tmp_path, encoder, conversation("c.npy")).codes.T, ref)
    for dt in (np.uint8, np.int32, np.uint64):
        save_file({"c": ref.astype(dt)}, str(tmp_path / "c.safetensors"))
        assert np.array_equal(one(tmp_path, encoder, conversation("c.safetensors")).codes.T, ref), dt
    np.save(tmp_path / "c.npy", ref.astype(bool))
    rejected(one(tmp_path, encoder, conversation("c.npy")), "codes dtype")


def test_codes_relative_to_audio_root(tmp_path, encoder):
    write_codes(tmp_path / "elsewhere/codes/a.npy", K, 5, C)
    rejected(one(tmp_path, encoder, conversation()), "codes file missing")
    assert isinstance(one(tmp_path, encoder, conversation(), audio_root=tmp_path / "elsewhere"), Plan)


def test_300000_characters_are_refused_without_tokenizing(tmp_path, bpe_encoder, monkeypatch):
    row = {"messages": [{"role": "assistant", "content": "word " * 60_000}]}
    monkeypatch.setattr(bpe_encoder, "text", lambda s: pytest.fail("tokenized a line the bound refuses"))
    rejected(one(tmp_path, bpe_encoder, row, max_length=2048), "longer than max length", detail="at least")


def test_the_bound_never_refuses_what_fits(tmp_path, bpe_encoder):
    """Against the tokenizer itself: lines whose exact length fits are never refused by the bound."""
    rng = np.random.default_rng(0)
    alphabet = list("abc xyz,.!?-0123456789") + ["é", "ß", "日本", "\U0001f600", "<|eot_id|>", "    ", "\n"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 400))))
        row = {"messages": [{"role": "assistant", "content": text}]}
        n = len(bpe_encoder.plan(row["messages"], None, "x", 1).tokens)
        assert isinstance(one(tmp_path, bpe_encoder, row, max_length=n), Plan)
        assert one(tmp_path, bpe_encoder, row, max_length=n - 1).reason == "longer than max length"


def test_unforeseen_errors_name_their_type_and_interrupts_pass(tmp_path, encoder, monkeypatch):
    row = {"messages": [{"role": "assistant", "content": "hello"}]}

    def boom(*a, **k):
        raise ZeroDivisionError("x")
    monkeypatch.setattr(encoder, "plan", boom)
    rejected(one(tmp_path, encoder, row), "unexpected ZeroDivisionError")

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(encoder, "plan", interrupt)
    with pytest.raises(KeyboardInterrupt):
        one(tmp_path, encoder, row)


def test_byte_order_mark_is_accepted(tmp_path, encoder):
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(conversation()).encode() + b"\n")
    samples, report = load_jsonl(tmp_path / "d.jsonl", encoder, 1000)
    assert [s.index for s in samples] == [1] and report.skipped == {}


def _mixed(tmp_path, n_good, n_bad):
    write_codes(tmp_path / "codes/a.npy", K, 5, C)
    rows = [conversation()] * n_good + [{"messages": [{"role": "robot", "content": "a"}]}] * n_bad
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_strict_lists_every_bad_line_in_one_pass(tmp_path, encoder):
    path = _mixed(tmp_path, 3, 25)
    with pytest.raises(DataError) as e:
        load_jsonl(path, encoder, 1000, report_path=tmp_path / "run/rejected.jsonl")
    msg = str(e.value)
    assert "25 bad line(s) of 28" in msg and "d.jsonl:4: messages[0].role" in msg and "d.jsonl:23:" in msg
    assert "d.jsonl:24:" not in msg and "and 5 more" in msg  # 20 on the console, all in the report
    rows = [json.loads(x) for x in (tmp_path / "run/rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(4, 29))
    assert set(rows[0]) == {"file", "line", "field", "reason", "detail"} and rows[0]["reason"] == "unknown role"


def test_skip_mode_reports_instead_of_flooding_and_has_a_limit(tmp_path, encoder, caplog):
    path = _mixed(tmp_path, 97, 3)
    caplog.clear()
    with pytest.raises(DataError, match=r"3 of 100 lines rejected \(3.00%\) is more than --max-bad-fraction 0.01"):
        load_jsonl(path, encoder, 1000, skip_bad=True, report_path=tmp_path / "rejected.jsonl")
    samples, report = load_jsonl(path, encoder, 1000, skip_bad=True, max_bad_fraction=0.05,
                                 report_path=tmp_path / "rejected.jsonl")
    assert len(samples) == 97 and report.skipped == {"unknown role": 3}
    assert len((tmp_path / "rejected.jsonl").read_text().splitlines()) == 3
    path = _mixed(tmp_path, 10, 40)
    caplog.clear()
    load_jsonl(path, encoder, 1000, skip_bad=True, max_bad_fraction=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 20 + 2  # the first 20, "... and 20 more", the counts


def test_reject_report_api(tmp_path):
    rep = RejectReport()
    for i, reason in enumerate(["a", "b", "a", "longer than max length"]):
        rep.add(Rejection("f", i + 1, "x", reason, "d"))
    assert rep.counts() == {"a": 2, "b": 1, "longer than max length": 1}
    assert rep.check_fraction(300, 0.01) is None and "3 of 100" in rep.check_fraction(100, 0.01)
    rep.write(tmp_path / "r.jsonl")
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4 and os.listdir(tmp_path) == ["r.jsonl"]


def test_foreign_layout_gets_a_convert_hint(tmp_path, encoder):
    out = one(tmp_path, encoder, {"conversations": [{"from": "human", "value": "hi"}]})
    rejected(out, "not a conversation", detail="prepare convert --from sharegpt")
    assert "['conversations']" in out.detail
    row = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]}
    rejected(one(tmp_path, encoder, row), "unknown item type", detail="--from openai")


def test_trainer_skip_mode_writes_run_rejected_jsonl(tmp_path):  # conftest drops the run's log handlers
    """Through the trainer: RUN/rejected.jsonl holds the bad line, the run trains on the others."""
    good = (ROOT / "data" / "demo.jsonl").read_text().splitlines()
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(good[:3] + ['{"messages": 5}'] + good[3:]) + "\n")
    out = tmp_path / "run"
    assert run(out, "--data", data, "--skip-bad-samples", "--max-bad-fraction", "0.5", "--audio-root",
               ROOT / "data", "--max-steps", "1") == 0
    (row,) = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert row["line"] == 4 and row["reason"] == "not a conversation"
    assert run(tmp_path / "run2", "--data", data, "--audio-root", ROOT / "data", "--max-steps", "1") == 1


def test_data_not_in_the_project_format_gets_a_convert_hint(tmp_path, encoder):
    (tmp_path / "metadata.csv").write_text("LJ001|Hello.|Hello.\nLJ002|Hi.|Hi.\n")
    with pytest.raises(DataError, match=r"(?s)2 bad line\(s\) of 2.*LJSpeech metadata.csv: python -m higgs_min.prepare "
                                        r"convert --from ljspeech"):
        load_jsonl(tmp_path / "metadata.csv", encoder, 1000)
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}], indent=1))
    with pytest.raises(DataError, match=r"--from sharegpt"):
        load_jsonl(tmp_path / "s.json", encoder, 1000)
    (tmp_path / "wavs").mkdir()
    (tmp_path / "wavs" / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(DataError, match=r"cannot read data file.*--from folder"):
        load_jsonl(tmp_path / "wavs", encoder, 1000)
