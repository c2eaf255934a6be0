"""Losses: labelled-rows-only text cross-entropy and a vectorized multi-codebook one.

Both take the batch's targets, already shifted by `data.targets_of` (logits at i vs the label at i+1): the
next-token rule is applied once, where the batch is built, and never here.

Text: only the rows with a target go through the text head: (N, H) -> (N, V),
never (B, L, V). Above `chunk_rows` rows the head + cross-entropy run chunk by
chunk under activation checkpointing, so the extra memory is one chunk's logits
whatever the batch.

Audio: logits (N, K, C+2) against targets (N, K) in one cross_entropy call over
N*K rows; per-codebook sums, counts and accuracy fall out of the same tensor.

Losses are returned as *sums with counts* so the trainer can normalize by the
number of targets over all micro-batches and ranks: `weighted_loss` is that one
reduction, for the objective (loop.py) and the logged figures (loop.py, evaluate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from higgs_min.data import IGNORE_INDEX


def _text_chunk(head, h, t, predict=True):
    logits = head(h).float()  # (n, V)
    loss_sum = F.cross_entropy(logits, t, reduction="sum")
    return loss_sum, logits.detach().argmax(-1) if predict else None


@dataclass
class TextScores:
    loss_sum: torch.Tensor  # () sum of per-token losses
    count: int  # N, tokens scored
    pred: torch.Tensor | None  # (N,) argmax ids; None unless asked for (predict=True)
    target: torch.Tensor  # (N,)
    row: torch.Tensor  # (N,) batch index of each scored token
    logits_shape: tuple  # (N, V): what was materialized


def text_scores(hidden, text_targets, head, chunk_rows: int = 128, predict: bool = True) -> TextScores:
    """hidden (B, L, H), text_targets (B, L) (data.targets_of), head: rows (N, H) -> logits (N, V) (a module, or a
    model's text_logits: v3's text head is tied to its text embedding). predict=False: no argmax (pred None), for
    a training step that logs nothing: the argmax reads every (N, V) logit, ~0.5% of a mid-shape step."""
    targets = text_targets
    sel = targets != IGNORE_INDEX
    h, t = hidden[sel], targets[sel]  # (N, H), (N,)
    row = sel.nonzero()[:, 0]
    N = t.numel()
    with torch.no_grad():
        V = head(h[:0]).shape[-1]  # the head's width, from zero rows
    if N == 0:  # (v3 scores no text)
        return TextScores(hidden.sum() * 0.0, 0, t, t, row, (0, V))
    if N <= chunk_rows:
        loss_sum, pred = _text_chunk(head, h, t, predict)
    else:
        sums, preds = [], []
        for i in range(0, N, chunk_rows):
            s, p = checkpoint(_text_chunk, head, h[i:i + chunk_rows], t[i:i + chunk_rows], predict,
                              use_reentrant=False)
            sums.append(s)
            preds.append(p)
        loss_sum, pred = torch.stack(sums).sum(), torch.cat(preds) if predict else None
    return TextScores(loss_sum, N, pred, t, row, (min(N, chunk_rows), V))


def multi_codebook_sums(logits, targets, ignore_index: int = IGNORE_INDEX, pred=None):
    """logits (N, K, C), targets (N, K) -> per-codebook (loss sums, counts, correct or None), each (K,).
    pred (N, K): logits' argmax ids, given to count the correct ones (the caller keeps them: one argmax)."""
    N, K, C = logits.shape
    if targets.shape != (N, K):
        raise ValueError(f"audio logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    ce = F.cross_entropy(logits.reshape(N * K, C).float(), targets.reshape(N * K),
                         ignore_index=ignore_index, reduction="none").view(N, K)  # 0 where ignored
    valid = targets != ignore_index
    correct = ((pred == targets) & valid).sum(0) if pred is not None else None
    return ce.sum(0), valid.sum(0), correct


def reduce_codebooks(sums, counts, reduction: str = "codebook_mean"):
    """Per-codebook sums (K,) and counts (K,) -> (loss, per-codebook means (K,)).

    codebook_mean: mean over codebooks (that have targets) of each codebook's mean;
    token_mean: total sum / total count.
    """
    per_cb = sums / counts.clamp(min=1)
    has = counts > 0
    if reduction == "codebook_mean":
        loss = (per_cb * has).sum() / has.sum().clamp(min=1)
    elif reduction == "token_mean":
        loss = sums.sum() / counts.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown audio reduction {reduction!r} (codebook_mean or token_mean)")
    return loss, per_cb


def multi_codebook_cross_entropy(logits, targets, ignore_index: int = IGNORE_INDEX,
                                 reduction: str = "codebook_mean"):
    """Cross-entropy over K codebooks at once. logits (N, K, C), targets (N, K).

    Returns (loss, per-codebook losses (K,)).
    """
    sums, counts, _ = multi_codebook_sums(logits, targets, ignore_index)
    return reduce_codebooks(sums, counts, reduction)


@dataclass
class AudioScores:
    loss_sums: torch.Tensor  # (K,)
    counts: torch.Tensor  # (K,)
    correct: torch.Tensor | None  # (K,); None unless asked for (predict=True)
    pred: torch.Tensor | None  # (N, K) argmax ids; None unless asked for
    target: torch.Tensor  # (N, K)
    row: torch.Tensor  # (N,) batch index
    logits_shape: tuple  # (N, K, C + 2)


def target_counts(text_targets, audio_targets) -> torch.Tensor:
    """(1 + K,) float64: the text targets, then the audio targets per codebook, that will be scored."""
    text = (text_targets != IGNORE_INDEX).sum()
    audio = (audio_targets != IGNORE_INDEX).sum((0, 1))  # (K,)
    return torch.cat([text.view(1), audio]).double()


def audio_scores(hidden, audio_targets, audio_logits_fn, predict: bool = True) -> AudioScores:
    """hidden (B, L, H), audio_targets (B, L, K) (data.targets_of). predict=False: no argmax (pred and correct
    None), as text_scores."""
    sel = (audio_targets != IGNORE_INDEX).any(-1)  # (B, L): rows with at least one codebook target
    logits = audio_logits_fn(hidden[sel])  # (N, K, C + 2)
    t = audio_targets[sel]  # (N, K)
    pred = logits.detach().argmax(-1) if predict else None  # (N, K)
    sums, counts, correct = multi_codebook_sums(logits, t, pred=pred)
    if t.numel() == 0:
        sums = sums + hidden.sum() * 0.0  # keep the graph connected for DDP
    return AudioScores(sums, counts, correct, pred, t, sel.nonzero()[:, 0], tuple(logits.shape))


# --------------------------------------------------------------------------- the objective

def weighted_loss(text_sum, audio_sums, counts, args):
    """The one reduction of token losses to the step loss, for the objective and the logged figures alike.

    text_sum (), audio_sums (K,): summed token losses (of one micro-batch, or of the whole step);
    counts (1 + K,): the step's text targets, then audio targets per codebook, over all micro-batches
    and ranks. Returns (loss, text part, audio part, per-codebook means (K,)), each a tensor:

        loss = text_weight · Σ text CE / text count + audio_weight · reduce_codebooks(audio sums, counts)

    For fixed counts this is linear in the sums, so the micro-batch objectives of one step add up to the
    loss of the step's summed sums: what backward() saw and what is logged are the same formula. A part
    with no targets is exactly 0 here (its sum is a zero that keeps the graph connected, see text_scores
    and audio_scores), so the loss is the sum of the parts that have targets; `loss_row` reports the
    absent part as None.
    """
    counts = counts.to(audio_sums.dtype)
    text = text_sum / counts[0].clamp(min=1)
    audio, per_cb = reduce_codebooks(audio_sums, counts[1:], args.audio_reduction)
    return args.text_weight * text + args.audio_weight * audio, text, audio, per_cb


def loss_row(text_sum, audio_sums, counts, args) -> dict:
    """The metrics-row figures of `weighted_loss`: floats, and None (JSON null) for a part with no targets
    (text_loss, audio_loss, a codebook's entry of audio_loss_per_codebook) -- never NaN."""
    loss, text, audio, per_cb = weighted_loss(text_sum, audio_sums, counts, args)
    n = counts.tolist()
    return {"loss": loss.item(), "text_loss": text.item() if n[0] > 0 else None,
            "audio_loss": audio.item() if any(n[1:]) else None,
            "audio_loss_per_codebook": [v if c > 0 else None for v, c in zip(per_cb.tolist(), n[1:])]}


# --------------------------------------------------------------------------- diagnostics

class Diagnostics:
    """What the run's log shows beside the losses: chance levels, predictions, the non-finite stop.
    The per-step warnings (zero targets, exact 0, at chance) are runlog.StepReport's."""

    def __init__(self, vocab_size: int, audio_classes: int, decode=None):
        self.chance = {"text": math.log(vocab_size), "audio": math.log(audio_classes)}
        self.decode = decode

    def check_finite(self, loss: torch.Tensor, step: int, sample_index) -> None:
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {step}; samples (JSONL lines) {list(map(int, sample_index))}")

    def predictions(self, text: TextScores, audio: AudioScores) -> list[str]:
        out = []
        if text.count:
            mine = text.row == text.row[0]
            pred, tgt = text.pred[mine][:40].tolist(), text.target[mine][:40].tolist()
            if self.decode:
                out.append(f"  predicted text: {self.decode(pred)!r}")
                out.append(f"  target text:    {self.decode(tgt)!r}")
            acc = (text.pred == text.target).float().mean().item()
            out.append(f"  text accuracy {acc:.3f}")
        if audio.target.numel():
            mine = audio.row == audio.row[0]
            p0, t0 = audio.pred[mine][:, 0], audio.target[mine][:, 0]
            keep = t0 != IGNORE_INDEX
            out.append(f"  codebook 0 predicted {p0[keep][:10].tolist()}")
            out.append(f"  codebook 0 target    {t0[keep][:10].tolist()}")
            acc = (audio.correct.float() / audio.counts.clamp(min=1)).tolist()
            out.append("  audio accuracy per codebook " + " ".join(f"{a:.3f}" for a in acc))
        return out
