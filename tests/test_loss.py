import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from types import SimpleNamespace

from higgs_min import runlog
from higgs_min.data import IGNORE_INDEX, next_token_targets, targets_of
from higgs_min.loss import (Diagnostics, audio_scores, loss_row, multi_codebook_cross_entropy, reduce_codebooks,
                            text_scores, weighted_loss)


def _labels(B, L, V, g, hole_p=0.4):
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < hole_p] = IGNORE_INDEX
    labels[1, L - 6:] = IGNORE_INDEX  # padding
    return labels


@pytest.mark.parametrize("chunk", [1000, 7])
def test_text_loss_matches_full_logits_reference(chunk):
    g = torch.Generator().manual_seed(0)
    B, L, H, V = 3, 20, 16, 50
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    labels = _labels(B, L, V, g)
    s = text_scores(hidden, next_token_targets(labels), head, chunk_rows=chunk)
    loss = s.loss_sum / s.count
    (grad,) = torch.autograd.grad(loss, hidden)
    # Reference: full (B, L, V) logits, shifted by hand.
    full = head(hidden)
    ref = F.cross_entropy(full[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    assert s.count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert s.logits_shape == (min(chunk, s.count), V)


def _audio_case(g, N=30, K=8, C=1026):
    logits = torch.randn(N, K, C, generator=g, requires_grad=True)
    targets = torch.randint(0, C, (N, K), generator=g)
    for k in range(K):  # uneven holes per codebook, one codebook empty
        targets[torch.rand(N, generator=g) < k / K, k] = IGNORE_INDEX
    targets[:, 5] = IGNORE_INDEX
    return logits, targets


def _loop_reference(logits, targets, reduction):
    per = []
    for k in range(logits.shape[1]):  # the per-codebook loop of common trainers
        valid = targets[:, k] != IGNORE_INDEX
        if valid.any():
            per.append((F.cross_entropy(logits[valid, k], targets[valid, k], reduction="sum"), int(valid.sum())))
    if reduction == "codebook_mean":
        return sum(s / n for s, n in per) / len(per)
    return sum(s for s, _ in per) / sum(n for _, n in per)


@pytest.mark.parametrize("reduction", ["codebook_mean", "token_mean"])
def test_multi_codebook_loss_matches_per_codebook_loop(reduction):
    logits, targets = _audio_case(torch.Generator().manual_seed(1))
    loss, per_cb = multi_codebook_cross_entropy(logits, targets, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _loop_reference(logits, targets, reduction)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert per_cb.shape == (8,) and per_cb[5] == 0
    k = 3
    valid = targets[:, k] != IGNORE_INDEX
    torch.testing.assert_close(per_cb[k], F.cross_entropy(logits[valid, k], targets[valid, k]), rtol=1e-6, atol=1e-6)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"\(4, 8, 10\) do not match targets \(4, 7\)"):
        multi_codebook_cross_entropy(torch.zeros(4, 8, 10), torch.zeros(4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown audio reduction"):
        reduce_codebooks(torch.ones(2), torch.ones(2), "median")


def _oracle_head(V, scale=50.0):
    head = nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V) * scale)
    return head


def test_oracle_next_token_rule_text():
    """Logits at i that put all mass on the label at i+1 score ~0; scored unshifted they sit far from 0."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 2, 40, 64
    labels = _labels(B, L, V, g, hole_p=0.2)
    nxt = torch.cat([labels[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1).clamp(min=0)
    hidden = F.one_hot(nxt, V).float()  # position i "predicts" the label at i + 1
    head = _oracle_head(V)
    right = text_scores(hidden, next_token_targets(labels), head)
    assert right.loss_sum / right.count < 1e-6
    # The bug: logits at i scored against the label at i (what an unshifted trainer does).
    wrong = text_scores(hidden, labels, head)  # targets = labels unshifted
    assert wrong.loss_sum / wrong.count > 10


def test_oracle_next_token_rule_audio():
    g = torch.Generator().manual_seed(0)
    B, L, K, C2 = 2, 30, 4, 18
    labels = torch.randint(0, C2, (B, L, K), generator=g)
    labels[:, :3] = IGNORE_INDEX
    nxt = torch.cat([labels[:, 1:], torch.zeros(B, 1, K, dtype=torch.long)], 1).clamp(min=0)
    hidden = F.one_hot(nxt, C2).float().view(B, L, K * C2)  # (B, L, K*C2)
    head = _oracle_head(K * C2)
    fn = lambda h: head(h).view(-1, K, C2)  # noqa: E731
    right = audio_scores(hidden, targets_of(labels[..., 0], labels)[1], fn)
    loss, _ = reduce_codebooks(right.loss_sums, right.counts)
    assert loss < 1e-6 and (right.correct == right.counts).all()
    wrong = audio_scores(hidden, labels, fn)  # targets = labels unshifted
    loss, _ = reduce_codebooks(wrong.loss_sums, wrong.counts)
    assert loss > 10


def _scores(V=1024, C2=1026, K=8, n_text=50, n_audio=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, H = 2, 60, 32
    hidden = torch.randn(B, L, H, generator=g)
    labels = torch.full((B, L), IGNORE_INDEX)
    labels[0, :n_text] = torch.randint(0, V, (n_text,), generator=g)
    alabels = torch.full((B, L, K), IGNORE_INDEX)
    alabels[1, :n_audio] = torch.randint(0, C2, (n_audio, K), generator=g)
    text_head = nn.Linear(H, V, bias=False)
    audio_head = nn.Linear(H, K * C2, bias=False)
    nn.init.normal_(text_head.weight, std=1e-3)
    nn.init.normal_(audio_head.weight, std=1e-3)
    tt, at = targets_of(labels, alabels)
    t = text_scores(hidden, tt, text_head)
    a = audio_scores(hidden, at, lambda h: audio_head(h).view(-1, K, C2))
    return t, a


def _row(step, t, a, lr=1e-3):
    counts = torch.cat([torch.tensor([float(t.count)]), a.counts.double()])
    row = loss_row(t.loss_sum.double(), a.loss_sums.double(), counts, ARGS)
    return {"step": step, **row, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 1.0}


ARGS = SimpleNamespace(text_weight=1.0, audio_weight=1.0, audio_reduction="codebook_mean")


def test_random_logits_trip_the_chance_warning(caplog):
    """Random logits score at chance; the run's one chance rule (runlog.StepReport) says so after its window."""
    t, a = _scores()
    report = runlog.StepReport(Diagnostics(1024, 1026), 0, 100)
    assert abs(t.loss_sum.item() / t.count / math.log(1024) - 1) < 0.03
    lines = []
    for step in range(1, runlog.WINDOW + 1):
        lines += report.lines(_row(step, t, a), t, a, next_save=100)
    warned = [r.message for r in caplog.records if "chance level" in r.message]
    assert len(warned) == 2 and warned[0].startswith("text") and warned[1].startswith("audio")
    assert "(1.00× chance)" in lines[0] and any("codebook 0 predicted" in line for line in lines)


def test_zero_targets_and_exact_zero_warn_and_absent_parts_do_not(caplog):
    t, a = _scores(n_text=0, n_audio=0)
    assert t.count == 0 and int(a.counts.sum()) == 0
    row = _row(1, t, a)
    assert row["text_loss"] is None and row["audio_loss"] is None and row["loss"] == 0.0
    report = runlog.StepReport(Diagnostics(1024, 1026), 0, 100)
    report.lines(row, t, a, next_save=100)
    msgs = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("zero targets" in m for m in msgs) and not any("exactly 0" in m for m in msgs)
    report.lines({**row, "text_loss": 0.0}, t, a, next_save=100)
    assert any("text loss is exactly 0" in r.message for r in caplog.records)


@pytest.mark.parametrize("n_text,n_audio", [(50, 40), (50, 0), (0, 40)])
def test_logged_loss_is_the_sum_of_the_micro_batch_objectives(n_text, n_audio):
    """The objective of each micro-batch (backward's loss) and the step's logged loss are one formula
    (weighted_loss): their sum equals the logged loss, and a part without targets is None, not NaN."""
    args = SimpleNamespace(text_weight=0.7, audio_weight=1.3, audio_reduction="codebook_mean")
    micro = [_scores(n_text=n_text, n_audio=n_audio, seed=s) for s in range(3)]
    counts = sum(torch.cat([torch.tensor([float(t.count)]), a.counts.double()]) for t, a in micro)
    objectives = sum(weighted_loss(t.loss_sum, a.loss_sums, counts.float(), args)[0].double() for t, a in micro)
    row = loss_row(sum(t.loss_sum.double() for t, _ in micro), sum(a.loss_sums.double() for _, a in micro),
                   counts, args)
    assert row["loss"] == pytest.approx(objectives.item(), rel=1e-6)
    assert (row["text_loss"] is None) == (n_text == 0) and (row["audio_loss"] is None) == (n_audio == 0)
    assert all(math.isfinite(v) for v in (row["loss"], row["text_loss"] or 0, row["audio_loss"] or 0))
    present = [w * row[k] for w, k in ((0.7, "text_loss"), (1.3, "audio_loss")) if row[k] is not None]
    assert row["loss"] == pytest.approx(sum(present), rel=1e-12)  # the total is the sum of the defined parts


def test_non_finite_loss_stops_with_step_and_samples():
    with pytest.raises(FloatingPointError, match=r"step 7; samples \(JSONL lines\) \[3, 9\]"):
        Diagnostics(10, 10).check_finite(torch.tensor(float("nan")), 7, torch.tensor([3, 9]))


@pytest.mark.parametrize("chunk", [1000, 7])
def test_scores_without_predictions_have_the_same_losses_and_gradients(chunk):
    """predict=False (a training step that logs nothing) skips only the argmax: losses and gradients bit for bit."""
    g = torch.Generator().manual_seed(3)
    B, L, H, V, K, C2 = 2, 20, 16, 50, 3, 11
    head, audio_head = nn.Linear(H, V, bias=False), nn.Linear(H, K * C2, bias=False)
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    alabels = torch.randint(0, C2, (B, L, K), generator=g)
    alabels[:, :8] = IGNORE_INDEX
    tt, at = targets_of(_labels(B, L, V, g), alabels)
    out = []
    for predict in (True, False):
        t = text_scores(hidden, tt, head, chunk_rows=chunk, predict=predict)
        a = audio_scores(hidden, at, lambda h: audio_head(h).view(-1, K, C2), predict=predict)
        out.append((t, a, *torch.autograd.grad(t.loss_sum + a.loss_sums.sum(), hidden)))
    (t1, a1, g1), (t0, a0, g0) = out
    assert t0.pred is None and a0.pred is None and a0.correct is None and t1.pred.shape == (t1.count,)
    assert torch.equal(t0.loss_sum, t1.loss_sum) and torch.equal(a0.loss_sums, a1.loss_sums) and torch.equal(g0, g1)
