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


# ----------------------------------------------------------------------------- the options table's resume classes

def _actions():
    from higgs_min.train.options import build_parser
    return [a for a in build_parser()._actions if a.dest != "help"]


def test_every_option_has_one_resume_class():
    from higgs_min.train.options import OPERATIONAL, RESUME_CLASS, SHAPE, TRAINED
    dests = [a.dest for a in _actions()]
    assert sorted(dests) == sorted(RESUME_CLASS), "the parser and the table disagree"
    assert set(RESUME_CLASS.values()) == {TRAINED, SHAPE, OPERATIONAL}
    assert {k for k, v in RESUME_CLASS.items() if v == SHAPE} == {"preset", "lora_rank", "lora_targets",
                                                                  "train_audio_embedding"}


def _other_value(action, tmp_path):
    """A valid command-line value different from the option's default (None for a switch)."""
    special = {"output_dir": None, "resume": None, "config": None, "backup_dir": str(tmp_path / "backup"),
               "eval_data": str(DATA / "demo.jsonl"), "device": "cpu", "epochs": None, "max_steps": "3",
               "audio_root": str(DATA), "eval_split": "0.25", "lora_targets": "q_proj,v_proj", "preset": "higgs-v2-3b",
               "tensorboard": None,
               # listening: one sample, codes only (no decoder or scorer folders needed here)
               "eval_samples": "1", "audio_tokenizer": None, "codec_weights": None, "random_codec_seed": None,
               "eval_asr": None, "eval_speaker": None, "best_by": None}
    if action.dest in special:
        return special[action.dest]
    if action.nargs == 0:  # store_true
        return ""
    if action.choices:
        return next(str(c) for c in action.choices if c != action.default)
    if action.type is int:
        return str((action.default or 0) + 1)
    if action.type is float:
        return str((action.default or 0.0) * 0.5 + 0.125)
    raise AssertionError(f"no test value for --{action.dest}: add one to _other_value")


def test_resume_continues_with_every_operational_option_changed(tmp_path, caplog, capsys):
    from higgs_min.train.options import OPERATIONAL, RESUME_CLASS
    out = tmp_path / "out"
    assert run(out, "--max-steps", 2) == 0
    argv, changed = [], []
    for a in _actions():
        if RESUME_CLASS[a.dest] != OPERATIONAL or a.dest in ("allow_changed_settings", "debug"):
            continue
        value = _other_value(a, tmp_path)
        if value is None:
            continue
        argv += [a.option_strings[0]] + ([value] if value else [])
        changed.append(a.dest)
    assert {"data_workers", "no_verify_data", "log_every", "eval_every", "dist_timeout"} <= set(changed)
    caplog.clear()
    assert run(out, *argv) == 0, capsys.readouterr().err
    logged = caplog.text.split("changed on resume (allowed): ")[1].splitlines()[0]
    missing = [d for d in changed if f"{d}: " not in logged]
    assert not missing, f"operational changes not logged: {missing}"
    assert (out / "checkpoint-3").is_dir()


def test_resume_refuses_each_trained_option_and_every_shape_option(tmp_path, capsys):
    from higgs_min.train.options import RESUME_CLASS, SHAPE, TRAINED
    out = tmp_path / "out"
    assert run(out, "--max-steps", 2) == 0
    capsys.readouterr()
    for a in _actions():
        cls = RESUME_CLASS[a.dest]
        if cls not in (TRAINED, SHAPE) or a.dest in ("data", "tokenizer", "base_weights"):  # by content: above
            continue
        value = _other_value(a, tmp_path)
        flag = [a.option_strings[0]] + ([value] if value else [])
        extra = ["--allow-changed-settings"] if cls == SHAPE else []
        assert run(out, "--max-steps", 2, *flag, *extra) == 2, a.dest
        err = capsys.readouterr().err
        assert f"{a.dest}: " in err, (a.dest, err)
        assert ("trained with other shapes" in err) == (cls == SHAPE), (a.dest, err)


def test_resume_none_is_refused_beside_checkpoints(tmp_path, capsys):
    """--resume none where checkpoints exist would interleave two runs in one folder (latest naming the new run's
    checkpoint-2 while --resume auto took the old run's checkpoint-3): refused, the folder untouched."""
    out = tmp_path / "out"
    assert run(out, "--max-steps", 3, "--save-steps", 3) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert run(out, "--max-steps", 2, "--resume", "none") == 2
    err = capsys.readouterr().err
    assert "--resume none" in err and "checkpoint-3" in err and "new --output-dir" in err, err
    assert sorted(p.name for p in out.iterdir()) == before
    assert run(out, "--max-steps", 3, "--lora-rank", 8, "--allow-changed-settings") == 2  # a shape change: the
    err = capsys.readouterr().err                                                       # hint is a new folder only
    assert "other shapes" in err and "--resume none" not in err, err
    assert run(out, "--max-steps", 3, "--resume", out / "checkpoint-999") == 2  # the path said once
    err = capsys.readouterr().err
    assert f"--resume {out / 'checkpoint-999'}" in err and err.count("checkpoint-999") == 1, err
    (out / "checkpoint-3" / "manifest.json").unlink()  # every checkpoint broken: auto does not start beside them
    assert run(out, "--max-steps", 2) == 2
    err = capsys.readouterr().err
    assert "--resume auto" in err and "checkpoint-3" in err and "no checkpoint there verifies" in err, err
    assert sorted(p.name for p in out.iterdir()) == before
    assert run(tmp_path / "fresh", "--max-steps", 1, "--resume", "none") == 0  # a fresh folder: none starts
