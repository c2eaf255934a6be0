"""Results one path away: OUT/best and OUT/latest wherever a checkpoint is accepted (generate, export,
load_trained, --resume), the held-out lines written with the run, `higgs-min eval` equal to the in-training eval."""
import argparse

import pytest

from higgs_min.export.merge import main as export_main
from higgs_min.generate.cli import main as generate_main
from higgs_min.train.runconfig import _resume_folder
from higgs_min.train.runs import RunError, load_trained, resolve_checkpoint
from tests.trainutil import run


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run(out, "--max-steps", "2", "--save-steps", "1", "--eval-split", "0.25", "--keep-last", "1") == 0
    return out


def test_pointers_resolve_to_the_folder_they_name(out):
    assert (out / "best").read_text().strip() in ("checkpoint-1", "checkpoint-2")
    for name in ("best", "latest"):
        target = out / (out / name).read_text().strip()
        assert resolve_checkpoint(out / name) == target and target.is_dir()
        assert load_trained(out / name).settings == load_trained(target).settings
    assert resolve_checkpoint(out / "checkpoint-2") == out / "checkpoint-2"  # anything else unchanged
    resume = argparse.Namespace(resume=str(out / "best"), output_dir=out)
    assert _resume_folder(resume) == out / (out / "best").read_text().strip()


def test_generate_and_export_take_run_best(out, tmp_path, capsys):
    assert generate_main(["--adapter", str(out / "best"), "--text", "hi", "--max-new-tokens", "3",
                          "--codes-out", str(tmp_path / "g.npy")]) == 0
    assert (tmp_path / "g.npy").exists()
    assert export_main([str(out / "best"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_a_pointer_to_a_deleted_checkpoint_is_one_line(out, tmp_path, capsys):
    (tmp_path / "best").write_text("checkpoint-9\n")
    with pytest.raises(RunError, match=r"best names 'checkpoint-9', which is not a folder"):
        resolve_checkpoint(tmp_path / "best")
    assert generate_main(["--adapter", str(tmp_path / "best"), "--text", "hi", "--codes-out",
                          str(tmp_path / "g.npy")]) == 1
    err = capsys.readouterr().err
    assert "checkpoint-9" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
