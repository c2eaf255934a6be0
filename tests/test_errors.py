"""User mistakes end in one or two lines naming the thing, exit 2 (usage) or 1 (runtime), no traceback."""
import json
import subprocess
import sys

import pytest

from higgs_min import checkpoint
from higgs_min.prepare import encode as prepare
from higgs_min.train.options import DATA
from higgs_min.train.run import main
from tests.trainutil import ROOT, env


def _usage_exit(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2, err
    return err


@pytest.mark.parametrize("argv, expect", [
    (["--preset", "small"], "invalid choice: 'small' (choose from 'higgs-v2-3b', 'tiny', 'v3-4b', 'v3-tiny')"),
    (["--device", "gpu"], "invalid choice: 'gpu'"),
    (["--lora-rnak", "8"], "did you mean --lora-rank?"),
    (["--max-stpes=3"], "did you mean --max-steps?"),
])
def test_bad_options_are_two_lines_and_exit_2(capsys, argv, expect):
    assert expect in _usage_exit(capsys, argv)


def _error(caplog, capsys) -> str:
    return capsys.readouterr().err + "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_bad_paths_name_the_path_and_exit_2(tmp_path, caplog, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--base-weights", str(empty)]) == 2
    assert f"--base-weights {empty}: expected a folder with config.json" in _error(caplog, capsys)
    (tmp_path / "file").write_text("x")
    assert main(["--output-dir", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in _error(caplog, capsys)
    assert main(["--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in _error(caplog, capsys)
    with pytest.raises(Exception, match="expected a folder with config.json"):  # --debug keeps the traceback
        main(["--base-weights", str(empty), "--debug"])


def test_a_base_folder_with_a_broken_config_is_one_line(tmp_path, caplog, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["x"]}))
    (base / "tokenizer.json").write_bytes((DATA / "tokenizer.json").read_bytes())
    assert main(["--base-weights", str(base), "--output-dir", str(tmp_path / "o")]) == 2
    assert "text_config" in _error(caplog, capsys)


def test_checkpoint_cli_on_a_missing_path_exits_1(tmp_path, capsys):
    assert checkpoint.main(["list", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert checkpoint.main(["verify", str(tmp_path / "nope")]) == 1


def test_prepare_mistakes_are_one_line(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": [
        {"type": "audio", "audio": {"path": "a.wav"}}]}]}) + "\n")
    assert prepare.main(["--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--random-codec-seed", "0"]) == 2
    assert "content[0].audio: expected a wav path string" in capsys.readouterr().err
    assert prepare.main(["--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                         "--codec-weights", str(tmp_path / "dac.pth")]) == 2
    assert "dac.pth: no such file" in capsys.readouterr().err


def test_as_a_user_sees_it_no_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "higgs_min.train", "--base-weights", str(empty)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2 and str(empty) in p.stderr, p.stderr


def test_cuda_without_a_device_is_one_line_exit_1(tmp_path, caplog, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    assert main(["--device", "cuda", "--output-dir", str(tmp_path / "o")]) == 1
    assert "no CUDA device is available" in _error(caplog, capsys)
