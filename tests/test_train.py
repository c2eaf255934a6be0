import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from higgs_min import checkpoint
from higgs_min.train.options import DATA, parse_args
from higgs_min.loop import lr_at
from tests.trainutil import ROOT, adapter, env, free_port, metrics, run, run_cli, torchrun, train_args


def test_every_option_has_help_and_unknown_options_fail(capsys):
    from higgs_min.train.options import build_parser
    ap = build_parser()
    for action in ap._actions:
        if action.dest != "help":
            assert action.help, action.dest
    with pytest.raises(SystemExit):
        parse_args(["--no-such-option", "1"])


def test_config_file_sets_defaults_and_cli_wins(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"max_steps": 7, "lr": 0.5}))
    args = parse_args(["--config", str(tmp_path / "c.json"), "--lr", "0.25"])
    assert args.max_steps == 7 and args.lr == 0.25
    (tmp_path / "bad.json").write_text(json.dumps({"max_stepz": 7}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "bad.json")])


def test_lr_schedule_warmup_then_cosine():
    args = parse_args(["--lr", "1.0", "--warmup-steps", "10", "--max-steps", "110", "--min-lr-ratio", "0.1"])
    assert lr_at(5, args) == pytest.approx(0.5)
    assert lr_at(10, args) == pytest.approx(1.0)
    assert lr_at(60, args) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, args) == pytest.approx(0.1)


def test_max_steps_3_writes_a_checkpoint_at_step_3(tmp_path):
    out = tmp_path / "out"
    assert run(out, "--max-steps", 3, "--save-steps", 500, "--tensorboard") == 0
    ck = out / "checkpoint-3"
    checkpoint.verify(ck)
    assert sorted(p.name for p in ck.iterdir()) == sorted([
        "adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "optimizer.json",
        "trainer_state.json", "manifest.json"])
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["config"]["max_steps"] == 3
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "text_loss", "audio_loss", "audio_loss_per_codebook", "lr", "grad_norm",
                "tokens_per_s", "elapsed_s"):
        assert key in rows[-1]
    assert json.loads((out / "run_config.json").read_text())["train"]["max_steps"] == 3
    assert (out / "train.log").read_text().count("saved") == 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    from higgs_min.train.plot import main as plot_main
    assert plot_main([str(out)]) == 0 and (out / "loss.png").stat().st_size > 1000


def test_tiny_model_overfits_one_batch(tmp_path):
    lines = (DATA / "demo.jsonl").read_text().splitlines()[:2]
    data = tmp_path / "two.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "codes").symlink_to(DATA / "codes")
    out = tmp_path / "out"
    # The heads are LoRA targets too: a frozen *random* head caps how confident the
    # logits can get (|h| = sqrt(H) after the final norm), so the loss would floor near 0.6.
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,text_lm_head,audio_lm_head"
    rc = run(out, "--data", data, "--batch-size", 2, "--max-steps", 300, "--warmup-steps", 10,
             "--lora-rank", 16, "--lr", "3e-3", "--log-every", 25, "--save-steps", 1000, "--lora-targets", targets)
    assert rc == 0
    first, last = metrics(out)[0], metrics(out)[-1]
    assert first["text_loss"] > 5 and first["audio_loss"] > 5
    assert last["text_loss"] < 0.1 and last["audio_loss"] < 0.1, last


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full, "--max-steps", 6, "--lora-dropout", 0.1) == 0
    assert run(part, "--max-steps", 6, "--save-steps", 3, "--lora-dropout", 0.1) == 0
    # Drop the final checkpoint: resume from step 3 as if the run had died after it.
    import shutil
    shutil.rmtree(part / "checkpoint-6")
    assert run(part, "--max-steps", 6, "--lora-dropout", 0.1) == 0
    a, b = adapter(full / "checkpoint-6"), adapter(part / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file
    oa, ob = (load_file(str(p / "checkpoint-6" / "optimizer.safetensors")) for p in (full, part))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resume_auto_passes_over_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "out"
    assert run(out, "--max-steps", 4, "--save-steps", 2) == 0
    with open(out / "checkpoint-4" / "adapter_model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    assert checkpoint.latest_valid(out) == out / "checkpoint-2"
    assert run(out, "--max-steps", 4, "--save-steps", 2) == 0
    checkpoint.verify(out / "checkpoint-4")
    assert any(p.name.startswith("checkpoint-4.invalid-") for p in out.iterdir())  # kept, not deleted


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # A small lr: Adam divides by sqrt(v), which turns float noise in a near-zero
    # gradient into a full-size step; the test is about the gradients, not that.
    common = ["--max-steps", "3", "--device", "cpu", "--lora-rank", "4", "--log-every", "1",
              "--warmup-steps", "1", "--log-samples", "0", "--lr", "1e-4", "--grad-accum", "2"]
    p = torchrun(2, common + ["--batch-size", "2", "--output-dir", str(tmp_path / "ddp")])
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    assert run(tmp_path / "one", *common[:-2], "--batch-size", 4, "--grad-accum", 2) == 0
    a, b = adapter(tmp_path / "ddp" / "checkpoint-3"), adapter(tmp_path / "one" / "checkpoint-3")
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    for m_ddp, m_one in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), strict=True):
        for key in ("loss", "text_loss", "audio_loss", "grad_norm"):
            assert m_ddp[key] == pytest.approx(m_one[key], rel=1e-5), key


def test_two_nodes_on_localhost(tmp_path):
    port = free_port()
    args = ["--max-steps", "2", "--device", "cpu", "--lora-rank", "4", "--batch-size", "2",
            "--log-samples", "0", "--output-dir", str(tmp_path / "out")]
    nodes = [torchrun(1, args, nnodes=2, port=port) for _ in range(2)]
    logs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(l[-2000:] for l in logs)
    checkpoint.verify(tmp_path / "out" / "checkpoint-2")
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["world_size"] == 2


def test_resume_stops_every_rank_when_a_node_cannot_see_the_checkpoint(tmp_path):
    """Two "nodes" (gloo, one rank each) whose --output-dir differ, as node-local disks would: rank 0 finds
    checkpoint-2, rank 1 cannot read it. Both exit 1 with the same error naming node, rank, path and fix."""
    import socket
    shared, local = tmp_path / "shared", tmp_path / "local"
    common = ["--max-steps", "2", "--device", "cpu", "--lora-rank", "4", "--batch-size", "2", "--log-samples", "0"]
    assert run(shared, *common) == 0 and (shared / "checkpoint-2").is_dir()
    port = free_port()
    nodes = [torchrun(1, train_args(folder, *common), nnodes=2, port=port, node_rank=rank)
             for rank, folder in enumerate([shared, local])]
    logs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [1, 1], "\n".join(l[-2000:] for l in logs)
    for text in logs:
        line = next(line for line in text.splitlines() if "cannot resume" in line)
        assert f"rank 1 on node {socket.gethostname()}: cannot read {local / 'checkpoint-2'}" in line, line
        assert "rank 0 on" not in line and "shared file system" in line
        assert f"copy the checkpoint to {local / 'checkpoint-2'} on node {socket.gethostname()}" in line
        assert 'higgs_min/' not in "".join(x for x in text.splitlines() if x.lstrip().startswith("File "))


def test_sigterm_saves_and_exits_zero_then_resumes_to_the_same_weights(tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "-m", "higgs_min.train"] + train_args(out, "--max-steps", 40, "--save-steps", 1000)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log[-3000:]
    saved = checkpoint.latest_valid(out)
    assert saved is not None and 3 <= int(saved.name.split("-")[1]) < 40, log[-2000:]
    assert "rerun the same command to continue" in log
    # Same thread count as the interrupted run: float sums depend on it.
    for folder in (out, ref):
        done = run_cli(folder, "--max-steps", 40, "--save-steps", 1000)
        assert done.returncode == 0, done.stdout[-2000:]
    a, b = adapter(out / "checkpoint-40"), adapter(ref / "checkpoint-40")
    assert all(torch.equal(a[k], b[k]) for k in a)
