"""Results one path away: OUT/best and OUT/latest wherever a checkpoint is accepted (generate, export,
load_trained, --resume), the held-out lines written with the run, `higgs-min eval` equal to the in-training eval."""
import argparse
import json

import pytest

from higgs_min.checkpoint import main as checkpoint_main
from higgs_min.export.merge import main as export_main
from higgs_min.generate.cli import main as generate_main
from higgs_min.evaluate import OverfitWatch
from higgs_min.train.eval_cli import main as eval_main
from higgs_min.train.runconfig import _resume_folder
from higgs_min.train.runs import RunError, load_trained, resolve_checkpoint
from tests.trainutil import ROOT, metrics, run

KEYS = ("loss", "text_loss", "audio_loss", "text_accuracy", "audio_loss_per_codebook", "audio_accuracy_per_codebook",
        "samples", "text_targets", "audio_targets")


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


def test_checkpoint_verify_follows_pointers(out, tmp_path, capsys):
    for name in ("best", "latest"):  # `higgs-min checkpoint verify OUT/best` verifies the folder it names
        assert checkpoint_main(["verify", str(out / name)]) == 0
        assert f"OK {out / (out / name).read_text().strip()}: step" in capsys.readouterr().out
    (tmp_path / "latest").write_text("checkpoint-9\n")
    assert checkpoint_main(["verify", str(tmp_path / "latest")]) == 1
    assert "latest names 'checkpoint-9', which is not a folder" in capsys.readouterr().out


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


def test_eval_split_lines_step0_eval_and_higgs_min_eval_equal_the_run(out, tmp_path, capsys):
    evals = {r["step"]: r for r in metrics(out) if r.get("split") == "eval"}
    assert sorted(evals) == [0, 1, 2]  # an evaluation before the first step, then at each save
    # eval_split.txt names the held-out lines; those lines, copied to a file, are the same eval set
    listed = [w for w in (out / "eval_split.txt").read_text().splitlines() if not w.startswith("#")]
    source = ROOT / "data" / "demo.jsonl"
    assert len(listed) == 8 and all(w.startswith(f"{source}:") for w in listed)
    lines = source.read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("".join(lines[int(w.rsplit(":", 1)[1]) - 1] + "\n" for w in listed))
    (tmp_path / "codes").symlink_to(ROOT / "data" / "codes")  # the lines' relative codes paths
    best = (out / "best").read_text().strip()
    want = evals[int(best.split("-")[1])]
    for extra in (["--data", str(held)], []):  # --data X, and the run's own held-out set rebuilt
        assert eval_main([str(out / "best"), "--json", *extra]) == 0
        o = capsys.readouterr()
        row = json.loads(o.out.strip().splitlines()[-1])
        assert "Traceback" not in o.err and row["step"] == want["step"]
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], rel=0, abs=1e-6), key


def test_eval_without_held_out_data_is_one_line(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert run(plain, "--max-steps", "1") == 0
    capsys.readouterr()
    assert eval_main([str(plain / "latest")]) == 2
    err = capsys.readouterr().err
    assert "no held-out set" in err and "--data" in err and len(err.strip().splitlines()) == 1
    assert eval_main([str(tmp_path / "nope")]) == 2  # a mistyped checkpoint is named as such
    err = capsys.readouterr().err
    assert "nope: no such checkpoint folder" in err and len(err.strip().splitlines()) == 1


def _rows(step, loss, text, audio):
    return {"step": step, "loss": loss, "text_loss": text, "audio_loss": audio}


def test_overfitting_warnings_on_a_scripted_history(caplog):
    chance = {"text": 7.0, "audio": 6.93}
    w = OverfitWatch(chance)
    script = [  # (train rows before this eval: (text, audio) each), eval (text, audio)
        ([], (7.2, 7.5)),                          # step 0: no training yet, never warns
        ([(6.0, 6.0), (5.8, 5.9)], (6.0, 6.5)),    # eval falls
        ([(5.0, 5.0), (4.8, 4.9)], (6.1, 6.6)),    # eval rises once
        ([(4.0, 4.0), (3.9, 3.98)], (6.2, 7.59)),  # rises again while training fell; audio above chance
    ]
    said, step = [], 0
    for train, (et, ea) in script:
        for t, a in train:
            step += 1
            w.train(_rows(step, t + a, t, a))
        said.append(w.eval(_rows(step, et + ea, et, ea)))
    assert said[:3] == [[], [], []]
    rising, above = said[3]
    assert rising.startswith("eval loss rose at 2 evaluations in a row (12.5000 -> 12.7000 -> 13.7900 at steps 2, 4, 6)")
    assert "while the training loss fell (11.8500 -> 9.8500 -> 7.9400)" in rising
    assert above.startswith("eval audio loss 7.5900 at step 6 is above chance (6.9300") and "3.9900" in above
    assert [r.levelname for r in caplog.records].count("WARNING") == 2
    # the same eval rise with the training loss rising too is not overfitting: no warning
    w2 = OverfitWatch(chance)
    for i, (tr, ev) in enumerate([(9.0, 8.0), (9.5, 8.1), (9.9, 8.2)]):
        w2.train(_rows(i, tr, tr / 2, tr / 2))
        assert w2.eval(_rows(i, ev, 6.0, 6.0)) == []


# --------------------------------------------------------------------------- one prompt from data to generation

@pytest.fixture(scope="module")
def no_system(tmp_path_factory):
    """A run trained on the demo conversations with their system turn removed."""
    d = tmp_path_factory.mktemp("nosys")
    rows = [json.loads(line) for line in (ROOT / "data" / "demo.jsonl").read_text().splitlines()]
    (d / "data.jsonl").write_text("".join(json.dumps({"messages": r["messages"][1:]}) + "\n" for r in rows))
    (d / "codes").symlink_to(ROOT / "data" / "codes")
    assert run(d / "out", "--data", d / "data.jsonl", "--max-steps", "1") == 0
    return d / "out"


def _generate(monkeypatch, caplog, adapter, tmp_path, *extra):
    import higgs_min.generate.cli as gen_cli

    seen, real = [], gen_cli.build_messages
    monkeypatch.setattr(gen_cli, "build_messages", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    caplog.clear()
    assert generate_main(["--adapter", str(adapter), "--text", "hi", "--max-new-tokens", "2",
                          "--codes-out", str(tmp_path / "g.npy"), *extra]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "prompt" in r.getMessage()]
    return seen[-1], warned


def test_generate_uses_the_prompt_the_run_trained_on(out, no_system, tmp_path, monkeypatch, caplog):
    ckpt = no_system / (no_system / "latest").read_text().strip()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["prompt"]["system"] is None and state["prompt"]["distinct"] == 1
    messages, warned = _generate(monkeypatch, caplog, no_system / "latest", tmp_path)
    assert [m["role"] for m in messages] == ["user"] and warned == []  # trained without a system turn: none
    demo_system = json.loads((ROOT / "data" / "demo.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    messages, warned = _generate(monkeypatch, caplog, out / "best", tmp_path)
    assert messages[0] == {"role": "system", "content": demo_system} and warned == []  # the demo's system turn
    messages, warned = _generate(monkeypatch, caplog, no_system / "latest", tmp_path, "--system", "Speak.")
    assert messages[0] == {"role": "system", "content": "Speak."}
    assert warned == ["prompt differs from training: system turn 'Speak.', the run trained on no system turn "
                      "(drop --system/--scene to use the run's)"]


def test_exported_folders_carry_the_prompt(no_system, tmp_path, monkeypatch, caplog):
    ckpt = no_system / "latest"
    assert export_main([str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    assert export_main(["--format", "transformers", str(ckpt), "--adapter-only", "--out", str(tmp_path / "hf")]) == 0
    for folder in (tmp_path / "merged", tmp_path / "hf"):
        assert json.loads((folder / "prompt.json").read_text())["system"] is None, folder
    import higgs_min.generate.cli as gen_cli

    seen, real = [], gen_cli.build_messages
    monkeypatch.setattr(gen_cli, "build_messages", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    assert generate_main(["--base-weights", str(tmp_path / "merged"), "--text", "hi", "--max-new-tokens", "2",
                          "--codes-out", str(tmp_path / "g.npy")]) == 0
    assert [m["role"] for m in seen[-1]] == ["user"]  # the merged model is generated from as it was trained


def test_prompt_format_reads_the_system_turn_back_from_the_tokens(tmp_path):
    from higgs_min.config import ModelConfig
    from higgs_min.chat import ChatEncoder
    from higgs_min.prepare.corpus import open_dataset
    from higgs_min.train.datasets import prompt_format

    cfg = ModelConfig.from_preset("tiny")
    enc = ChatEncoder(ROOT / "data" / "tokenizer.json", cfg.audio_num_codebooks, cfg.audio_codebook_size,
                      cfg.vocab_size)
    rows = [json.loads(line) for line in (ROOT / "data" / "demo.jsonl").read_text().splitlines()]
    (tmp_path / "codes").symlink_to(ROOT / "data" / "codes")
    for name, keep in (("some", lambda i: i % 3), ("none", lambda i: False)):  # 21 of 32 keep theirs; none do
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps(r if keep(i) else {"messages": r["messages"][1:]}) + "\n" for i, r in enumerate(rows)))
    some = prompt_format(open_dataset(tmp_path / "some.jsonl", enc, 2048), enc)
    assert some == {"system": rows[1]["messages"][0]["content"], "samples": 32, "distinct": 2}
    assert prompt_format(open_dataset(tmp_path / "none.jsonl", enc, 2048), enc) == {
        "system": None, "samples": 32, "distinct": 1}
