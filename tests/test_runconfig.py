"""The resume guard: the first run's settings are kept, a changed trained setting refuses, schedule changes pass."""
import json
import shutil

from higgs_min.train import runconfig
from higgs_min.train.options import DATA, parse_args
from tests.trainutil import run


def _error_lines(capsys) -> str:
    return capsys.readouterr().err


def test_resume_refuses_changed_settings_and_allows_schedule_changes(tmp_path, caplog, capsys):
    out = tmp_path / "out"
    assert run(out, "--max-steps", 2) == 0
    record = (out / "run_config.json").read_bytes()

    caplog.clear()
    assert run(out, "--max-steps", 2, "--seed", 1) == 2
    err = _error_lines(capsys)
    assert "seed: 0 -> 1" in err and "--allow-changed-settings" in err

    data = tmp_path / "data.jsonl"  # same name, other content: refused by content hash
    data.write_text("\n".join((DATA / "demo.jsonl").read_text().splitlines()[:20]) + "\n")
    (tmp_path / "codes").symlink_to(DATA / "codes")
    caplog.clear()
    assert run(out, "--max-steps", 2, "--data", data) == 2
    err = _error_lines(capsys)
    assert "data: " in err and "sha256" in err

    caplog.clear()  # a shape change cannot be overridden at all
    assert run(out, "--max-steps", 2, "--lora-rank", 8, "--allow-changed-settings") == 2
    assert "lora_rank: 4 -> 8" in _error_lines(capsys)

    caplog.clear()  # extending the run continues and logs the change
    assert run(out, "--max-steps", 3) == 0
    assert "max_steps: 2 -> 3" in caplog.text
    assert (out / "checkpoint-3").is_dir()
    assert (out / "run_config.json").read_bytes() == record  # the first run's settings survive

    caplog.clear()  # the override lets a trained setting through and records it
    assert run(out, "--max-steps", 4, "--lr", "1e-3", "--allow-changed-settings") == 0
    changes = [json.loads(line) for line in (out / "settings_changes.jsonl").read_text().splitlines()]
    assert changes[0]["allowed"] == {"max_steps": "2 -> 3"}
    assert "lr" in changes[-1]["overridden"] and "0.003 -> 0.001" in changes[-1]["overridden"]["lr"]
    assert (out / "run_config.json").read_bytes() == record


def test_run_config_round_trips_through_config(tmp_path, caplog, capsys):
    out = tmp_path / "out"
    assert run(out, "--max-steps", 2, "--lora-alpha", 4, "--seed", 3, "--text-weight", 0.5) == 0
    rc = out / "run_config.json"
    recorded = json.loads(rc.read_text())["train"]
    again = runconfig.settings_of(parse_args(["--config", str(rc)]))
    for key in set(recorded) - set(runconfig.NOT_CONFIG):
        assert again[key] == recorded[key], key
    # and the run resumes from it without a refusal (a moved data file with the same content passes too)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(DATA / "demo.jsonl", moved)
    (tmp_path / "codes").symlink_to(DATA / "codes")
    from higgs_min.train.run import main
    caplog.clear()
    assert main(["--config", str(rc), "--max-steps", "3", "--data", str(moved)]) == 0, _error_lines(capsys)
    assert "(same content)" in caplog.text


def test_compare_classifies_each_setting():
    ident = {"data": {"path": "/a", "sha256": "x"}}
    refused, allowed = runconfig.compare(
        {"seed": 0, "save_steps": 10, "data": "/a", "brand_new_option": 1},
        ident, {"seed": 0, "save_steps": 20, "data": "/b", "brand_new_option": 2},
        {"data": {"path": "/b", "sha256": "x"}})
    assert set(allowed) == {"save_steps", "data"} and set(refused) == {"brand_new_option"}


def test_epochs_sets_max_steps(tmp_path):
    out = tmp_path / "out"  # (the test helper also passes --max-steps 4: --epochs wins)
    assert run(out, "--epochs", 1, "--batch-size", 16) == 0  # 32 demo conversations / 16 = 2 steps
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    recorded = json.loads((out / "run_config.json").read_text())["train"]
    assert recorded["epochs"] == 1 and recorded["max_steps"] == 2
    log = (out / "train.log").read_text()
    assert "loaded 32" in log.split("resolved config")[0]  # the data-loading lines reach train.log too
    steps = [line for line in log.splitlines() if " higgs_min.train: step " in line]
    assert len(steps) == 2  # one line per log step (--log-every 1)
