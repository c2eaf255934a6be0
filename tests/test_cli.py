"""The `higgs-min` command: a table of subcommands, and `torchrun --no-python higgs-min train` on 2 gloo ranks,
whose held-out figures equal one process's."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_min import cli
from tests.trainutil import ROOT, env, free_port, metrics, run, train_args


def test_every_command_resolves_and_a_typo_is_suggested(capsys):
    for name, (target, help_) in cli.COMMANDS.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)) and help_, name
    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "checkpoint" in capsys.readouterr().out
    assert cli.main(["checkpoint", "list", "/nonexistent/x"]) == 1


def _script() -> Path:
    script = Path(sys.executable).parent / "higgs-min"
    if not script.exists():
        pytest.skip(f"{script} is missing: the venv predates [project.scripts]; `make test` reinstalls the project")
    return script


def test_torchrun_no_python_higgs_min_train_two_ranks_eval_equals_one_rank(tmp_path):
    script = _script()
    # lr 0: the weights stay at their init, so the two runs evaluate the same model.
    common = ["--max-steps", "1", "--lr", "0", "--eval-split", "0.25", "--device", "cpu", "--batch-size", "2"]
    e = dict(env(), PATH=f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "--no-python", "higgs-min", "train",
           *train_args(tmp_path / "two", *common)]
    p = subprocess.run(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:]
    assert run(tmp_path / "one", *common) == 0
    two = [r for r in metrics(tmp_path / "two") if r.get("split") == "eval"]
    one = [r for r in metrics(tmp_path / "one") if r.get("split") == "eval"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1] and two[0]["samples"] == 8
    for a, b in zip(two, one):
        for key in ("loss", "text_loss", "audio_loss", "text_accuracy", "text_targets", "audio_targets"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert (tmp_path / "two" / "best").read_text().strip() == "checkpoint-1"
    assert "find_unused_parameters" not in p.stdout
