"""Broken audio is named before anything is encoded: `python -m higgs_min.prepare` and `prepare convert` as a
user runs them (exit code, the lines said, no traceback), every bad clip of a run in one report."""
import io
import json
import logging
import math
import struct
import wave

import numpy as np

from higgs_min.prepare.encode import main as prepare_main


def wav_bytes(seconds=1.0, rate=16000, amplitude=0.3, channels=1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (amplitude * 32767 * np.sin(2 * math.pi * 220 * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())
    return buf.getvalue()


def tts_line(wav: str, text: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": text},
                                    {"role": "assistant", "content": [{"type": "audio", "audio": wav}]}]}) + "\n"


def prepare(tmp_path, lines, capsys):
    (tmp_path / "in.jsonl").write_text("".join(lines))
    code = prepare_main(["--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                         "--random-codec-seed", "0"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists()
    return code, [line for line in err.strip().splitlines() if "RANDOMLY" not in line]


SENTENCE = "Printing, in the only sense with which we are at present concerned."  # 67 characters


def test_truncated_wav_is_named_with_both_durations(tmp_path, capsys):
    full = wav_bytes(4.75)
    (tmp_path / "a.wav").write_bytes(full[:44 + 2 * int(0.45 * 16000)])  # header says 4.75 s, data holds 0.45 s
    code, err = prepare(tmp_path, [tts_line("a.wav", SENTENCE)], capsys)
    assert code == 1 and len(err) == 1
    assert "in.jsonl:1: messages[1].content[0].audio: " in err[0]
    assert "a.wav: the header declares 152000 data bytes (4.75 s), the file holds 14400 (0.45 s)" in err[0]


def test_zero_byte_wav_says_so(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(b"")
    code, err = prepare(tmp_path, [tts_line("a.wav", SENTENCE)], capsys)
    assert code == 1 and len(err) == 1 and err[0].endswith("a.wav: 0 bytes (nothing was encoded)")


def test_empty_transcript_is_an_error_naming_the_line(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(wav_bytes(1.0))
    code, err = prepare(tmp_path, [tts_line("a.wav", SENTENCE), tts_line("a.wav", "  ")], capsys)
    assert code == 1 and len(err) == 1 and "in.jsonl:2: messages[1].content[0].audio: the text this clip speaks " \
                                               "is empty" in err[0]


def test_three_bad_clips_in_one_report_and_warnings_counted(tmp_path, capsys, caplog):
    good = wav_bytes(4.0)
    (tmp_path / "ok.wav").write_bytes(good)
    (tmp_path / "cut.wav").write_bytes(good[:2000])
    (tmp_path / "empty.wav").write_bytes(b"")
    odd = bytearray(good[:44 + 101])
    struct.pack_into("<I", odd, 40, 101)  # a data chunk of 101 bytes: not whole 2-byte frames
    (tmp_path / "odd.wav").write_bytes(bytes(odd))
    (tmp_path / "quiet.wav").write_bytes(wav_bytes(4.0, amplitude=1e-4))
    (tmp_path / "short.wav").write_bytes(wav_bytes(0.5))
    (tmp_path / "junk.wav").write_bytes(good + bytes(37))  # 37 bytes after the last chunk
    lines = [tts_line("ok.wav", SENTENCE), tts_line("cut.wav", SENTENCE), tts_line("empty.wav", SENTENCE),
             tts_line("odd.wav", SENTENCE), tts_line("quiet.wav", SENTENCE), tts_line("short.wav", SENTENCE),
             tts_line("junk.wav", SENTENCE)]
    with caplog.at_level(logging.WARNING):
        code, err = prepare(tmp_path, lines, capsys)
    assert code == 1
    assert err[0].endswith("in.jsonl: 3 bad clip(s) of 7 (empty file: 1, odd byte count: 1, truncated: 1); nothing "
                           f"was encoded (all of them in {tmp_path / 'out.rejected.jsonl'}):")
    assert [e.split(": ")[0].rsplit("/", 1)[1] for e in err[1:]] == ["in.jsonl:2", "in.jsonl:3", "in.jsonl:4"]
    assert "101 data bytes is not a whole number of 2-byte frames" in err[3]
    rows = [json.loads(x) for x in (tmp_path / "out.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [(2, "truncated"), (3, "empty file"), (4, "odd byte count")]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("in.jsonl:5" in m and "peak 9.16e-05" in m for m in said)  # silent: a counted warning
    assert any("in.jsonl:6" in m and "67 characters in 0.50 s = 134.0 characters/s" in m for m in said)  # pace
    assert any("in.jsonl:7" in m and "37 bytes after the last chunk (ignored)" in m for m in said)  # padded
    assert any("3 clip warning(s) (pace: 1, padded: 1, silent: 1); encoded anyway" in m for m in said)


def _ljspeech(tmp_path, metadata: str):
    src = tmp_path / "LJ"
    (src / "wavs").mkdir(parents=True)
    for i in (1, 2):
        (src / "wavs" / f"LJ00{i}.wav").write_bytes(wav_bytes(0.2))
    (src / "metadata.csv").write_text(metadata)
    return src


def convert(tmp_path, src, capsys):
    code = prepare_main(["convert", "--from", "ljspeech", str(src), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()
    return code, err.strip().splitlines()


def test_convert_names_an_empty_transcript_and_a_header_row(tmp_path, capsys):
    src = _ljspeech(tmp_path, "LJ001|Printing.|Printing.\nLJ002||\n")
    code, err = convert(tmp_path, src, capsys)
    assert code == 1 and len(err) == 1 and "metadata.csv:2: empty transcript for LJ002.wav" in err[0]
    src = _ljspeech(tmp_path / "h", "id|text|normalized_text\nLJ001|Printing.|Printing.\nLJ002|Two.|Two.\n")
    code, err = convert(tmp_path, src, capsys)
    assert code == 1 and len(err) == 1
    assert "metadata.csv:1:" in err[0] and "wavs/id.wav does not exist; line 1 looks like a header row " \
                                            "('id|text|normalized_text')" in err[0] and "remove it" in err[0]
