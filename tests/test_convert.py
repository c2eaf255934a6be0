"""`prepare convert`: other layouts -> the project's JSONL, on small generated inputs."""
import base64
import io
import json
import wave
from pathlib import Path

import pytest

from higgs_min.prepare.convert import detect_layout
from higgs_min.prepare.encode import main as prepare_main
from higgs_min.prepare.sanitize import line_to_plan, parse_line, check_conversation


def wav_bytes(n=160, value=0) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes([value % 256, 0]) * n)
    return buf.getvalue()


def convert(*args) -> int:
    return prepare_main(["convert", *map(str, args)])


def lines(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:  # every output line passes the loader's schema once prepare turns "audio" into "codes"
        encoded = json.dumps(r).replace('"audio": ', '"codes": ')
        check_conversation(parse_line(encoded.encode()), path)
    return rows


def audio_paths(row, out: Path) -> list[Path]:
    return [out.parent / i["audio"] for m in row["messages"] if isinstance(m["content"], list)
            for i in m["content"] if i["type"] == "audio"]


def test_ljspeech(tmp_path):
    src = tmp_path / "LJ"
    (src / "wavs").mkdir(parents=True)
    for i in (1, 2):
        (src / "wavs" / f"LJ00{i}.wav").write_bytes(wav_bytes(value=i))
    (src / "metadata.csv").write_text("LJ001|Printing, in 1st.|Printing, in first.\nLJ002|Raw only.|\n")
    out = tmp_path / "o" / "train.jsonl"
    assert convert("--from", "ljspeech", src, "--out", out, "--system", "Speak.", "--user-prefix", "Say: ") == 0
    a, b = lines(out)
    assert a["messages"][0] == {"role": "system", "content": "Speak."}
    assert a["messages"][1] == {"role": "user", "content": "Say: Printing, in first."}
    assert b["messages"][1]["content"] == "Say: Raw only."  # no normalized text: the raw one
    assert [p.resolve() for p in audio_paths(a, out)] == [(src / "wavs" / "LJ001.wav").resolve()]
    assert convert("--from", "ljspeech", src, "--out", out, "--raw-text") == 0
    # the official TTS layout by default: its system turn, then the text, then the audio
    assert lines(out)[0]["messages"][:2] == [{"role": "system", "content": "Generate audio following instruction."},
                                             {"role": "user", "content": "Printing, in 1st."}]
    assert convert("--from", "ljspeech", src, "--out", out, "--system", "") == 0
    assert [m["role"] for m in lines(out)[0]["messages"]] == ["user", "assistant"]  # --system "": none
    (src / "wavs" / "LJ002.wav").unlink()
    assert convert("--from", "ljspeech", src, "--out", tmp_path / "x.jsonl") == 1
    assert not (tmp_path / "x.jsonl").exists()  # nothing half-written


def test_folder_of_wavs_with_transcripts(tmp_path, capsys):
    src = tmp_path / "clips"
    (src / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        (src / f"{name}.wav").write_bytes(wav_bytes())
        (src / f"{name}.txt").write_text(f"text of {name}\n")
    out = tmp_path / "f.jsonl"
    assert convert("--from", "folder", src, "--out", out) == 0
    rows = lines(out)
    assert [r["messages"][1]["content"] for r in rows] == ["text of a", "text of sub/b"]
    assert [p.resolve() for p in audio_paths(rows[1], out)] == [(src / "sub/b.wav").resolve()]
    (src / "c.wav").write_bytes(wav_bytes())
    assert convert("--from", "folder", src, "--out", out) == 1
    assert "c.txt does not exist" in capsys.readouterr().err


def test_sharegpt_with_audio_paths_and_role_mapping(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(wav_bytes())
    recs = [{"system": "Be brief.", "audios": ["a.wav"],
             "conversations": [{"from": "human", "value": "<audio>What is said?"},
                               {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "narrator", "value": "Once."}, {"from": "gpt", "value": "Yes."}]}]
    src = tmp_path / "s.json"
    src.write_text(json.dumps(recs))
    out = tmp_path / "out" / "s.jsonl"
    assert convert("--from", "sharegpt", src, "--out", out) == 1
    assert "role 'narrator' is not mapped" in capsys.readouterr().err
    assert convert("--from", "sharegpt", src, "--out", out, "--role", "narrator=user") == 0
    a, b = lines(out)
    assert a["messages"][0] == {"role": "system", "content": "Be brief."}
    assert a["messages"][1]["content"][1] == {"type": "text", "text": "What is said?"}
    assert audio_paths(a, out)[0].resolve() == (tmp_path / "a.wav").resolve()
    assert [m["role"] for m in b["messages"]] == ["user", "assistant"]


def test_openai_input_audio_is_written_to_wav_files(tmp_path, capsys):
    data = wav_bytes(value=7)
    rec = {"messages": [
        {"role": "developer", "content": "Transcribe."},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(),
                                                                              "format": "wav"}},
                                     {"type": "text", "text": "Please."}]},
        {"role": "assistant", "content": "Okay.", "audio": {"data": base64.b64encode(wav_bytes(value=9)).decode()}}]}
    src = tmp_path / "o.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "out" / "o.jsonl"
    assert convert("--from", "openai", src, "--out", out) == 0
    (row,) = lines(out)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    user_wav, asst_wav = audio_paths(row, out)
    assert user_wav.read_bytes() == data and asst_wav.read_bytes() == wav_bytes(value=9)
    for bad, msg in ((dict(rec["messages"][1]["content"][0]["input_audio"], format="mp3"), "only wav is read"),
                     ({"data": "not base64!", "format": "wav"}, "expected base64"),
                     ({"data": base64.b64encode(b"ID3 mp3 bytes").decode()}, "not a WAV file")):
        rec2 = json.loads(json.dumps(rec))
        rec2["messages"][1]["content"][0]["input_audio"] = bad
        src.write_text(json.dumps(rec2) + "\n")
        assert convert("--from", "openai", src, "--out", out) == 1
        err = capsys.readouterr().err
        assert msg in err and "o.jsonl:1: messages[1].content[0].input_audio" in err, err


def test_unknown_layout_names_the_keys_and_the_layouts(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}) + "\n")
    assert convert("--from", "sharegpt", src, "--out", tmp_path / "y.jsonl") == 1
    err = capsys.readouterr().err
    assert "x.jsonl:1: not a sharegpt record (found keys ['messages'])" in err
    assert all(name in err for name in ("ljspeech", "folder", "sharegpt", "openai")) and "use --from openai" in err
    src.write_text(json.dumps({"audio_file": "a.wav", "transcript": "hi"}) + "\n")
    assert convert("--from", "openai", src, "--out", tmp_path / "y.jsonl") == 1
    assert "found keys ['audio_file', 'transcript']" in capsys.readouterr().err
    assert convert("--from", "ljspeech", tmp_path, "--out", tmp_path / "y.jsonl") == 1
    assert "no metadata.csv" in capsys.readouterr().err


def test_detect_layout():
    assert detect_layout({"conversations": [{"from": "human", "value": "a"}]}) == "sharegpt"
    assert detect_layout({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}) == "openai"
    assert detect_layout({"messages": [{"role": "user", "content": "a"}]}) is None
    assert detect_layout([1]) is None


def test_converted_line_reaches_the_prepare_step(tmp_path):
    """The output is the project's format: the loader's only complaint is that the audio is not encoded yet."""
    src = tmp_path / "clips"
    src.mkdir()
    (src / "a.wav").write_bytes(wav_bytes())
    (src / "a.txt").write_text("hello world")
    out = tmp_path / "f.jsonl"
    assert convert("--from", "folder", src, "--out", out) == 0
    from higgs_min.chat import ChatEncoder
    from tests.helpers import make_tokenizer
    enc = ChatEncoder(make_tokenizer(tmp_path / "tok.json"), 4, 16, 400)
    r = line_to_plan(out.read_bytes().splitlines()[0], 1, out, enc, 1000)
    assert r.reason == "raw audio not encoded" and "python -m higgs_min.prepare --data" in r.detail
    with pytest.raises(SystemExit):
        prepare_main(["convert", "--from", "nothing", str(src), "--out", str(out)])
