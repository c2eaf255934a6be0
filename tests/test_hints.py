"""The small things a new user meets: no argparse abbreviations, hints naming the released audio tokenizer
first, an LJSpeech folder given as --data told how to convert it, no progress bar drawn into a pipe."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_min.errors import Parser
from higgs_min.prepare.encode import main as prepare_main
from higgs_min.train.run import main as train_main
from tests.test_audio_check import wav_bytes
from tests.trainutil import ROOT, env


def test_no_parser_accepts_abbreviations(tmp_path, capsys):
    assert Parser().allow_abbrev is False
    for path in (ROOT / "higgs_min").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                kw = {k.arg: k.value for k in node.keywords}
                assert "allow_abbrev" in kw and kw["allow_abbrev"].value is False, f"{path}:{node.lineno}"
    with pytest.raises(SystemExit) as e:
        train_main(["--max-step", "10", "--output-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --max-step 10" in err and "did you mean --max-steps?" in err
    assert not any(tmp_path.iterdir())


def test_ljspeech_folder_as_data_gets_the_convert_command(tmp_path, capsys):
    (tmp_path / "lj" / "wavs").mkdir(parents=True)
    (tmp_path / "lj" / "metadata.csv").write_text("LJ001|Hi there.|Hi there.\n")
    assert train_main(["--data", str(tmp_path / "lj"), "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].endswith(f"this looks like an LJSpeech folder: python -m higgs_min.prepare convert --from ljspeech "
                           f"{tmp_path / 'lj'} --out OUT.jsonl")


def test_hints_name_the_released_audio_tokenizer_first(tmp_path, capsys):
    src = tmp_path / "LJ"
    (src / "wavs").mkdir(parents=True)
    (src / "wavs" / "LJ001.wav").write_bytes(wav_bytes(1.0))
    (src / "metadata.csv").write_text("LJ001|Printing, in the only sense.|\n")
    out = tmp_path / "train.jsonl"
    assert prepare_main(["convert", "--from", "ljspeech", str(src), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "--audio-tokenizer DIR" in said and said.index("--audio-tokenizer") < said.index("--codec-weights")
    # the raw (not yet encoded) audio line handed to the trainer
    assert train_main(["--data", str(out), "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "raw audio must be encoded first" in err and err.index("--audio-tokenizer") < err.index("--codec-weights")


def test_prepare_draws_no_progress_bar_into_a_pipe(tmp_path):
    (tmp_path / "a.wav").write_bytes(wav_bytes(0.5, rate=24000))
    (tmp_path / "in.jsonl").write_text(json.dumps({"messages": [
        {"role": "assistant", "content": [{"type": "audio", "audio": "a.wav"}]}]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "higgs_min.prepare", "--data", str(tmp_path / "in.jsonl"),
                        "--out", str(tmp_path / "o.jsonl"), "--random-codec-seed", "0"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "encoding audio" not in r.stderr and "\r" not in r.stderr  # tqdm's bar redraws with \r
    assert Path(tmp_path / "o.jsonl").exists()
