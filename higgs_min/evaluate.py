"""Held-out evaluation: exact loss and top-1 accuracy over every eval sample, summed across ranks.

    Evaluator(scorer, samples, ...).run(step) -> metrics row {"split": "eval", "step", ...}

Rank r of N scores samples r, r+N, r+2N, ... of the eval set, each exactly once (no sampler
padding: a duplicated sample would change the mean). Per rank, in float64:

    text:  Σ CE over scored text targets, their count, the top-1 hits           (3,)
    audio: per codebook Σ CE, count, top-1 hits                                 (3K,)

one all-reduce of that vector, then training's reduction (loss.loss_row / loss.weighted_loss):
    text_loss = Σ text CE / text count; audio_loss = loss.reduce_codebooks(sums, counts, --audio-reduction);
    loss = --text-weight · text_loss + --audio-weight · audio_loss, over the parts that have targets
    (a part without any is null in the row).
So 1 rank and N ranks give the same figures (up to float32 batch-composition noise; tested to 1e-6).
The model runs in eval mode (LoRA dropout off) under no_grad, then goes back to train mode.

    OverfitWatch(chance)   warnings from the history of eval rows and the training losses between them
"""

from __future__ import annotations

import contextlib
import logging
import torch

from higgs_min import distributed
from higgs_min.data import collate
from higgs_min.loss import loss_row

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, scorer, samples, batch_size: int, pad_id: int, dist_info, autocast, args):
        self.scorer, self.samples, self.batch_size, self.pad_id = scorer, samples, batch_size, pad_id
        self.dist_info, self.autocast, self.args = dist_info, autocast, args

    def due(self, step: int, saving: bool, last: bool) -> bool:
        every = self.args.eval_every
        return last or (step % every == 0 if every > 0 else saving)

    @torch.no_grad()
    def sums(self) -> torch.Tensor:
        """This rank's (3 + 3K,) float64 sums (see the module docstring)."""
        K = self.scorer.model.config.audio_num_codebooks
        mine = list(range(self.dist_info.rank, len(self.samples), self.dist_info.world_size))
        out = torch.zeros(3 + 3 * K, dtype=torch.float64)
        for i in range(0, len(mine), self.batch_size):
            batch = collate([self.samples[j] for j in mine[i:i + self.batch_size]], self.pad_id)
            batch = {k: v.to(self.dist_info.device) for k, v in batch.items()}
            with self.autocast or contextlib.nullcontext():
                text, audio = self.scorer(batch, predict=True)  # accuracy
            out[0] += float(text.loss_sum)
            out[1] += text.count
            out[2] += int((text.pred == text.target).sum())
            out[3:3 + K] += audio.loss_sums.detach().double().cpu()
            out[3 + K:3 + 2 * K] += audio.counts.double().cpu()
            out[3 + 2 * K:] += audio.correct.double().cpu()
        return out

    def run(self, step: int) -> dict:
        was_training = self.scorer.training
        self.scorer.eval()
        try:
            s = self.sums()
        finally:
            self.scorer.train(was_training)
        s = distributed.all_reduce_sum(s.to(self.dist_info.device)).cpu()
        return figures(s, self.scorer.model.config.audio_num_codebooks, self.args, step, len(self.samples))


def figures(s: torch.Tensor, K: int, args, step: int, n: int) -> dict:
    """The metrics row from the summed (3 + 3K,) vector: loss.loss_row, training's reduction; a part (or a
    codebook) without targets in the eval set is None, never NaN."""
    text_n, text_hits = s[1].item(), s[2].item()
    a_counts, a_hits = s[3 + K:3 + 2 * K], s[3 + 2 * K:]
    counts = torch.cat([s[1:2], a_counts])  # (1 + K,)
    return {"split": "eval", "step": step, **loss_row(s[0], s[3:3 + K], counts, args),
            "text_accuracy": text_hits / text_n if text_n > 0 else None,
            "audio_accuracy_per_codebook": [h / c if c > 0 else None
                                            for h, c in zip(a_hits.tolist(), a_counts.tolist())],
            "samples": n, "text_targets": int(text_n), "audio_targets": int(a_counts.sum())}


def _show(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(row: dict, tb=None) -> None:
    """One log line (and TensorBoard scalars under eval/) for an eval row; a part without targets shows as '-'."""
    acc = [a for a in row["audio_accuracy_per_codebook"] if a is not None]
    log.info("eval at step %d: loss %.4f (text %s, audio %s), text accuracy %s, audio accuracy %s "
             "(mean of %d codebooks), %d samples", row["step"], row["loss"], _show(row["text_loss"]),
             _show(row["audio_loss"]), _show(row["text_accuracy"], 3), _show(sum(acc) / len(acc) if acc else None, 3),
             len(acc), row["samples"])
    if tb is not None:
        for k in ("loss", "text_loss", "audio_loss", "text_accuracy"):
            if row[k] is not None:
                tb.add_scalar(f"eval/{k}", row[k], row["step"])


# --------------------------------------------------------------------------- overfitting watch

class OverfitWatch:
    """Warnings from the evaluation history, one line each (rank 0):

    rising: the eval loss rose at 2 evaluations in a row (e1 < e2 < e3) while the mean training loss
            of the steps before each of them fell (t1 > t2 > t3; the step-0 evaluation has no steps
            before it and does not take part in the training side): the adapter is fitting the training
            set at the expense of held-out data.
    chance: an eval loss part (text, audio) above chance (ln V, ln(C+2): a uniform guess) while the
            training loss of that part since the last evaluation is below it.
    Training losses are means over the steps since the previous evaluation, not the last step's (noisy).
    """

    KEYS = ("loss", "text_loss", "audio_loss")

    def __init__(self, chance: dict):
        self.chance = chance  # {"text": ln V, "audio": ln(C+2)} (loss.Diagnostics.chance)
        self.sums = {k: [0.0, 0] for k in self.KEYS}  # since the last eval: sum, count (a part may be null)
        self.history = []  # (step, eval loss, mean training loss since the previous eval or None)

    def train(self, row: dict) -> None:
        for k in self.KEYS:
            if row.get(k) is not None:
                self.sums[k][0] += row[k]
                self.sums[k][1] += 1

    def eval(self, row: dict) -> list[str]:
        """The warnings this evaluation raises (also logged)."""
        means = {k: total / n if n else None for k, (total, n) in self.sums.items()}
        self.sums = {k: [0.0, 0] for k in self.KEYS}
        self.history.append((row["step"], row["loss"], means["loss"]))
        out = []
        if len(self.history) >= 3:
            (s1, e1, t1), (s2, e2, t2), (s3, e3, t3) = self.history[-3:]
            train = [t for t in (t1, t2, t3) if t is not None]
            if e1 < e2 < e3 and len(train) >= 2 and all(a > b for a, b in zip(train, train[1:])):
                out.append(f"eval loss rose at 2 evaluations in a row ({e1:.4f} -> {e2:.4f} -> {e3:.4f} at steps "
                           f"{s1}, {s2}, {s3}) while the training loss fell ({' -> '.join(f'{t:.4f}' for t in train)}"
                           f"): overfitting; OUT/best keeps the checkpoint with the lowest eval loss")
        for part in ("text", "audio"):
            ev, tr, chance = row.get(f"{part}_loss"), means[f"{part}_loss"], self.chance[part]
            if ev is not None and tr is not None and ev > chance > tr:
                out.append(f"eval {part} loss {ev:.4f} at step {row['step']} is above chance ({chance:.4f}, a uniform "
                           f"guess) while the training {part} loss is {tr:.4f}: held-out data is predicted worse "
                           f"than by guessing (overfitting, or eval data unlike the training data)")
        for line in out:
            log.warning("%s", line)
        return out
