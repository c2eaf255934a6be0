import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from higgs_min.data import IGNORE_INDEX
from higgs_min.loss import (Diagnostics, audio_scores, multi_codebook_cross_entropy, reduce_codebooks,
                            text_scores)


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
    s = text_scores(hidden, labels, head, chunk_rows=chunk)
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


def _shift_right(labels):
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, 1:] = labels[:, :-1]
    return out


def test_oracle_next_token_rule_text():
    """Logits at i that put all mass on the label at i+1 score ~0; scored unshifted they sit far from 0."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 2, 40, 64
    labels = _labels(B, L, V, g, hole_p=0.2)
    nxt = torch.cat([labels[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1).clamp(min=0)
    hidden = F.one_hot(nxt, V).float()  # position i "predicts" the label at i + 1
    head = _oracle_head(V)
    right = text_scores(hidden, labels, head)
    assert right.loss_sum / right.count < 1e-6
    # The bug: logits at i scored against the label at i (what an unshifted trainer does).
    wrong = text_scores(hidden, _shift_right(labels), head)
    assert wrong.loss_sum / wrong.count > 10


def test_oracle_next_token_rule_audio():
    g = torch.Generator().manual_seed(0)
    B, L, K, C2 = 2, 30, 4, 18
    labels = torch.randint(0, C2, (B, L, K), generator=g)
    labels[:, :3] = IGNORE_INDEX
    out_mask = torch.ones(B, L, dtype=torch.bool)
    nxt = torch.cat([labels[:, 1:], torch.zeros(B, 1, K, dtype=torch.long)], 1).clamp(min=0)
    hidden = F.one_hot(nxt, C2).float().view(B, L, K * C2)  # (B, L, K*C2)
    head = _oracle_head(K * C2)
    fn = lambda h: head(h).view(-1, K, C2)  # noqa: E731
    right = audio_scores(hidden, labels, out_mask, fn)
    loss, _ = reduce_codebooks(right.loss_sums, right.counts)
    assert loss < 1e-6 and (right.correct == right.counts).all()
    wrong = audio_scores(hidden, torch.cat([torch.full((B, 1, K), IGNORE_INDEX), labels[:, :-1]], 1), out_mask, fn)
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
    t = text_scores(hidden, labels, text_head)
    a = audio_scores(hidden, alabels, torch.ones(B, L, dtype=torch.bool), lambda h: audio_head(h).view(-1, K, C2))
    return t, a


def test_random_logits_trip_the_chance_warning(caplog):
    t, a = _scores()
    d = Diagnostics(1024, 1026, warmup_steps=5)
    text_loss = (t.loss_sum / t.count).item()
    audio_loss = reduce_codebooks(a.loss_sums, a.counts)[0].item()
    assert abs(text_loss / math.log(1024) - 1) < 0.03
    lines = d.report(3, {"text": text_loss, "audio": audio_loss}, t, a)
    assert not any("chance level" in r.message for r in caplog.records)  # still in warmup
    d.report(10, {"text": text_loss, "audio": audio_loss}, t, a)
    warned = [r.message for r in caplog.records if "chance level" in r.message]
    assert len(warned) == 2 and "text" in warned[0] and "audio" in warned[1]
    assert any("ratio 1.0" in line for line in lines)
    assert any("codebook 0 predicted" in line for line in lines)


def test_zero_targets_and_exact_zero_warn(caplog):
    t, a = _scores(n_text=0, n_audio=0)
    assert t.count == 0 and int(a.counts.sum()) == 0
    Diagnostics(1024, 1026, 0).report(1, {"text": 0.0}, t, a)
    msgs = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("zero targets" in m for m in msgs) and any("exactly 0" in m for m in msgs)


def test_non_finite_loss_stops_with_step_and_samples():
    with pytest.raises(FloatingPointError, match=r"step 7; samples \(JSONL lines\) \[3, 9\]"):
        Diagnostics(10, 10, 0).check_finite(torch.tensor(float("nan")), 7, torch.tensor([3, 9]))
