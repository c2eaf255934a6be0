"""Fine-tuning Higgs Audio v3 (`--preset v3-tiny` on the demo): it trains, resumes bitwise, keeps the tied audio
matrix one tensor (in memory and in the files), keeps every trained tensor and optimizer state in fp32, and a
checkpoint rebuilds the trained model (runs.load_trained) for generation."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from higgs_min.lora import TRAINED_TENSORS, apply_lora
from higgs_min.train.runs import build_base, load_trained
from higgs_min.v3.finetune import check_tie, train_audio_embedding
from tests.trainutil import metrics, run, torchrun

W = "tied.embedding.modality_embeddings.0.embedding.weight"  # the released name of the fused audio matrix
V3 = ["--preset", "v3-tiny", "--train-audio-embedding", "--max-steps", 6]


def files(ck):
    return {p.name: load_file(str(ck / p.name)) for p in ck.glob("*.safetensors")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step v3-tiny run with --train-audio-embedding, and the same run interrupted after step 3 and resumed."""
    tmp = tmp_path_factory.mktemp("v3train")
    full, part = tmp / "full", tmp / "part"
    assert run(full, *V3) == 0
    assert run(part, *V3, "--save-steps", 3) == 0
    shutil.rmtree(part / "checkpoint-6")  # as if the run had died after step 3
    assert run(part, *V3, "--save-steps", 3) == 0
    return full, part


def test_v3_tiny_trains_on_the_demo(runs):
    rows = metrics(runs[0])
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["text_loss"] is None for r in rows)  # v3 scores no text: no text loss (not a 0)
    assert rows[-1]["audio_loss"] == rows[-1]["loss"] < rows[0]["audio_loss"] - 0.1, [r["loss"] for r in rows]
    log = (runs[0] / "train.log").read_text()  # what it prints says so too
    assert "no text targets, " in log and "scored 0 text" not in log and "the v3 TTS layout has none" in log


def test_v3_resume_is_bitwise_equal_to_an_uninterrupted_run(runs):
    a, b = (files(r / "checkpoint-6") for r in runs)
    assert sorted(a) == sorted(b) == ["adapter_model.safetensors", "optimizer.safetensors", TRAINED_TENSORS]
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_the_tie_survives_training_in_the_files_and_in_memory(runs):
    ck = runs[0] / "checkpoint-6"
    f = files(ck)
    # on disk: the audio matrix once, fp32, under its released name; no copy in the adapter; fp32 moments
    assert list(f[TRAINED_TENSORS]) == [W] and f[TRAINED_TENSORS][W].dtype == torch.float32
    assert not any("embedding" in k for k in f["adapter_model.safetensors"])
    assert {k for k in f["optimizer.safetensors"] if k.startswith(W)} == {f"{W}.exp_avg", f"{W}.exp_avg_sq"}
    assert all(t.dtype == torch.float32 for t in f["optimizer.safetensors"].values())
    base, _, _ = build_base("v3-tiny", None, 0)
    trained = f[TRAINED_TENSORS][W]
    assert not torch.equal(trained, base.audio_embedding.weight)  # it did train
    # in memory, rebuilt from the checkpoint: one Parameter serves the embedding and the head
    model = load_trained(ck).model
    w = model.audio_embedding.weight
    assert torch.equal(w, trained)
    check_tie(model, "test")
    h = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.audio_logits(h), F.linear(h, w).view(3, 8, 1026))
    codes = torch.tensor([[[5, 1024, 1025, 7, 8, 9, 10, 11]]])
    x = model.embed(torch.zeros(1, 1, dtype=torch.long), codes, torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(x[0, 0], w[codes[0, 0] + torch.arange(8) * 1026].sum(0))


def test_a_copied_head_is_refused():
    model, _, _ = build_base("v3-tiny", None, 0)
    model.stray_head = torch.nn.Parameter(model.audio_embedding.weight.detach().clone())  # PEFT modules_to_save's bug
    with pytest.raises(ValueError, match=r"ckpt: the audio head must be the audio embedding.*stray_head"):
        check_tie(model, "ckpt")


def test_bf16_base_trains_fp32_tensors_and_optimizer_state():
    model, _, _ = build_base("v3-tiny", None, 0, dtype=torch.bfloat16)
    apply_lora(model, r=4)
    train_audio_embedding(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert model.audio_embedding.weight in params and all(p.dtype == torch.float32 for p in params)
    assert model.body.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the frozen base stays bf16
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.tensor([[3, 4, 5, 0, 0]])
    codes = torch.randint(0, 1024, (1, 5, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[False, False, False, True, True]])
    h = model(ids, None, codes, mask)
    model.audio_logits(h[0]).float().logsumexp(-1).mean().backward()
    opt.step()
    assert all(p.grad.dtype == torch.float32 for p in params)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.dim())


def test_train_audio_embedding_refuses_a_v2_base(tmp_path):
    from higgs_min.errors import UsageError
    from higgs_min.train.run import build_model
    from higgs_min.train.options import parse_args

    args = parse_args(["--train-audio-embedding", "--output-dir", str(tmp_path)])
    with pytest.raises(UsageError, match="--train-audio-embedding trains Higgs Audio v3's tied audio matrix"):
        build_model(args, torch.device("cpu"))


def test_the_trained_run_generates(runs, tmp_path):
    """`generate --adapter RUN/checkpoint-6`: the base rebuilt from the record, the adapter and the trained audio
    matrix applied (runs.load_trained); the CLI's greedy codes equal the loaded model's own rollout."""
    import numpy as np

    from higgs_min.generate.cli import main
    from higgs_min.v3.layout import V3Encoder
    from higgs_min.v3.sampler import generate_v3

    ck = runs[0] / "checkpoint-6"
    out = tmp_path / "codes.npy"
    assert main(["--adapter", str(ck), "--text", "The sky is blue.", "--temperature", "0", "--max-new-tokens", "24",
                 "--no-merge", "--codes-out", str(out)]) == 0
    t = load_trained(ck)
    s = V3Encoder(t.tokenizer, 8, 1024, t.cfg.vocab_size).prompt("The sky is blue.")
    s.audio_mask = s.audio_in_mask
    want = generate_v3(t.model, s, max_new_tokens=24, temperature=0.0)
    assert np.array_equal(np.load(out), want.codes.numpy())


def test_v3_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """v3-tiny with --train-audio-embedding on 2 gloo ranks (batch 2 each) against 1 process (batch 4), both with
    --grad-accum 2: DDP averages the gradients (the tied audio matrix is one parameter, used twice), so the losses,
    gradient norms, LoRA tensors and the trained audio matrix agree to fp32 noise. The v2 twin is in test_train.py."""
    # A small lr, as in the v2 test: Adam turns float noise in a near-zero gradient into a full-size step.
    common = ["--preset", "v3-tiny", "--train-audio-embedding", "--max-steps", "3", "--device", "cpu",
              "--lora-rank", "4", "--log-every", "1", "--warmup-steps", "1", "--log-samples", "0", "--lr", "1e-4",
              "--grad-accum", "2"]
    p = torchrun(2, common + ["--batch-size", "2", "--output-dir", str(tmp_path / "ddp")])
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    assert run(tmp_path / "one", *common, "--batch-size", 4) == 0
    a, b = (files(tmp_path / d / "checkpoint-3") for d in ("ddp", "one"))
    assert sorted(a) == sorted(b) and TRAINED_TENSORS in a
    for name in (TRAINED_TENSORS, "adapter_model.safetensors"):
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
    base, _, _ = build_base("v3-tiny", None, 0)
    assert not torch.equal(a[TRAINED_TENSORS][W], base.audio_embedding.weight)  # it trained (not two copies of init)
    assert any(a["adapter_model.safetensors"][k].abs().sum() > 0 for k in a["adapter_model.safetensors"] if "lora_B" in k)
    rows = list(zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), strict=True))
    assert [r["step"] for r, _ in rows] == [1, 2, 3]
    for m_ddp, m_one in rows:
        assert m_ddp["text_loss"] is None and m_one["text_loss"] is None
        for key in ("loss", "audio_loss", "grad_norm"):
            assert m_ddp[key] == pytest.approx(m_one[key], rel=1e-5), key
