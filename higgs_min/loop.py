"""The training loop: one optimizer step at a time, on one process or many under torchrun.

One optimizer step (`train_step`, then `train_loop` logs, evaluates and saves):
    1. take grad_accum micro-batches of batch_size samples (per rank, batches.BatchStream order)
    2. count the text and per-codebook audio targets of all of them, summed over ranks
    3. each micro-batch: loss = Σ token losses / global count, backward
       (DDP averages gradients over ranks, so the loss is scaled by world_size;
        no_sync on all but the last micro-batch) -- N ranks × batch b == 1 rank × batch N·b
    4. clip, AdamW step (the learning rate of this step set first: warmup + cosine)
    5. log; evaluate when due; save at save_steps, at the last step, and on SIGTERM/SIGINT.

Saves: rank 0 writes (checkpoint.save); every rank learns the outcome, so a failed save raises the same error
everywhere (or warns, with --on-save-error continue) and nothing hangs, even when rank 0 raises something
else. A failed save logs the path and errno, removes its temporary folder and retries once into --backup-dir
when given. SIGTERM/SIGINT: all ranks agree (all-reduce) to stop at the next step boundary, save, and exit 0.
--keep-last N deletes older whole checkpoints only after a new one is committed, never `best` nor the newest
that verifies, and hashes nothing to choose (checkpoint.rotate). Before step 1, checkpoint.preflight writes,
fsyncs and removes a probe file, compares free space with the estimated checkpoint size (--strict-space: an
error), and logs the absolute path and the steps at which saves happen (save_steps > max_steps is a warning;
the final save still happens).

Rank 0 writes metrics.jsonl, one JSON row per log step: split "train", step, loss, text_loss, audio_loss,
per-codebook losses (null for a part without targets), lr, grad_norm, tokens_per_s, elapsed_s (evaluate.py
writes split "eval" rows).

Everything the loop touches is built before it starts (higgs_min/train/run.py:build_run) and handed over
as one `Run`; the loop itself opens no file but metrics.jsonl, TensorBoard and the checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from higgs_min import checkpoint, distributed, evaluate, runlog, train_state
from higgs_min.lora import adapter_config
from higgs_min.loss import Diagnostics, audio_scores, loss_row, target_counts, text_scores, weighted_loss

log = logging.getLogger("higgs_min.train")


# ----------------------------------------------------------------------------- the pieces of a step

def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr * min_lr_ratio at max_steps."""
    if step <= args.warmup_steps:
        return args.lr * step / max(1, args.warmup_steps)
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Scorer(nn.Module):
    """Model + heads at the scored rows, as one module so DDP sees every trainable use."""

    def __init__(self, model: nn.Module, text_chunk: int):
        super().__init__()
        self.model, self.text_chunk = model, text_chunk
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def forward(self, batch, predict: bool = False):
        """-> (loss.TextScores, loss.AudioScores). predict: with the argmax predictions and accuracy, for an
        evaluation or a training step that logs them (the argmax reads every logit: ~0.5% of a mid-shape step)."""
        audio_mask = batch["audio_in_mask"] | batch["audio_out_mask"]
        hidden = self.model(batch["input_ids"], batch["attention_mask"], batch["audio_codes"], audio_mask)
        # A batch without audio rows leaves audio_mlp's LoRA out of the graph. A zero-weighted term keeps
        # every trainable parameter in every step's graph (its gradient gains exactly 0), so DDP runs
        # with find_unused_parameters=False: no extra graph walk, no warning.
        hidden = hidden + 0.0 * sum(p.sum() for p in self.trainable).to(hidden.dtype)
        # the heads through methods both model families have (v3's are tied to its embeddings)
        text = text_scores(hidden, batch["text_targets"], self.model.text_logits, self.text_chunk, predict)
        audio = audio_scores(hidden, batch["audio_targets"], self.model.audio_logits, predict)
        return text, audio


def objective(text, audio, counts, args):
    """This micro-batch's share of the step loss, normalized by the step's global counts (loss.weighted_loss)."""
    return weighted_loss(text.loss_sum, audio.loss_sums, counts, args)[0]


def step_losses(sums, counts, K, args) -> dict:
    """The step's logged losses: loss.weighted_loss of the summed per-token losses (1 + K,) and the same
    global counts (1 + K,) -- the sum of the micro-batch objectives, by linearity. A part without targets
    in the step is None (JSON null)."""
    return loss_row(sums[0], sums[1:1 + K], counts, args)


class StopFlag:
    """Set by SIGTERM/SIGINT; acted on at the next step boundary, agreed by all ranks."""

    def __init__(self):
        self.raised = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def append_metrics(path: Path, row: dict) -> None:
    """One JSON line. Strict JSON: json.dumps would write NaN/Infinity, which no JSON parser must accept; a part
    without targets is null (loss.loss_row), and a non-finite figure stops the run here, naming it."""
    try:
        line = json.dumps(row, allow_nan=False)
    except ValueError as e:
        bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
        raise FloatingPointError(f"{row.get('split')} metrics at step {row.get('step')}: non-finite {bad}") from e
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot write {path}: [{errno.errorcode.get(e.errno, e.errno)}] "
                                         f"{e.strerror} (was the output folder removed?)") from e


# --best-by -> (the key of the checkpoint's "eval" record, whether higher is better)
BEST_BY = {"eval_loss": ("loss", False), "wer": ("wer", False), "speaker_similarity": ("speaker_similarity", True)}


def save_everywhere(step, model, optimizer, args, trainer_state, dist_info, base_name):
    """Rank 0 writes; all ranks get the same outcome; no rank hangs on a failed save.

    The other ranks wait for rank 0's outcome in a collective, so rank 0 must reach it whatever happens: an
    exception other than a failed write (a bug, a KeyboardInterrupt) is caught, sent to every rank as a
    "crashed" outcome, and re-raised on rank 0 after the collective; the other ranks stop with it named
    (otherwise they would wait out --dist-timeout, or forever where rank 0's exit hangs on shutdown).
    """
    outcome, crash = ("ok", ""), None
    if dist_info.is_main:
        try:
            outcome = _save_on_main(step, model, optimizer, args, trainer_state, base_name)
        except BaseException as e:  # passed on to every rank, then re-raised below
            crash, outcome = e, ("crashed", f"rank 0 stopped while saving: {type(e).__name__}: {e}")
    kind, message = distributed.broadcast_from_main(outcome)
    if crash is not None:
        raise crash
    if kind == "crashed":
        raise checkpoint.CheckpointError(f"step {step}: {message}")
    if kind == "failed":
        if args.on_save_error == "raise":
            raise checkpoint.CheckpointError(f"step {step}: {message}")
        log.warning("step %d: continuing without a checkpoint (--on-save-error continue)", step)


def _save_on_main(step, model, optimizer, args, trainer_state, base_name) -> tuple[str, str]:
    """Rank 0's save into --output-dir, else --backup-dir: ("ok", "") or ("failed", what each target said)."""
    files = train_state.training_files(model, optimizer, adapter_config(
        model, args.lora_targets.split(","), args.lora_dropout, base_name), trainer_state)
    targets = [args.output_dir] + ([args.backup_dir] if args.backup_dir else [])
    errors = []
    for target in targets:
        try:
            Path(target).mkdir(parents=True, exist_ok=True)
            path = checkpoint.save(target, step, files)
        except (checkpoint.CheckpointError, OSError) as e:
            log.error("checkpoint at step %d into %s failed: %s", step, target, e)
            errors.append(str(e))
            continue
        # what save checked: names and sizes against the manifest (the hashes are checked when read)
        log.info("saved %s (%.2f MB; names and sizes checked against the manifest)", path.resolve(),
                 sum(f.stat().st_size for f in path.iterdir()) / 1e6)
        _after_save(target, path, trainer_state.get("eval"), args)
        return "ok", ""
    return "failed", "; then ".join(errors)


def _after_save(target, path: Path, ev, args) -> None:
    """`best` (by --best-by) and --keep-last after a committed save. A failure here is not a failed save (the
    checkpoint is whole and named): it is logged, and the next save tries again, rather than retried into
    --backup-dir."""
    try:
        key, higher = BEST_BY[getattr(args, "best_by", "eval_loss")]
        value = (ev or {}).get(key)
        if value is not None and math.isfinite(value) and checkpoint.update_best(target, path.name, value, key,
                                                                                 higher):
            log.info("best: %s (%s %.4f)", path.name, key, value)
        if args.keep_last:
            checkpoint.rotate(target, args.keep_last, saved=path.name)
    except (checkpoint.CheckpointError, OSError) as e:
        log.error("saved %s, but updating best / --keep-last in %s failed: %s (the next save tries again)",
                  path.name, target, e)


# ----------------------------------------------------------------------------- the loop

@dataclass
class Run:
    """Everything the loop needs, built before step 1 by higgs_min/train/run.py:build_run."""
    args: object                 # the resolved options (higgs_min/train/options.py)
    dist: distributed.DistInfo
    model: nn.Module             # base (frozen) + LoRA (trainable), on dist.device
    scorer: Scorer               # the model and its heads at the scored rows
    optimizer: torch.optim.Optimizer
    stream: object               # batches.BatchStream: this rank's micro-batches, resumable
    evaluator: evaluate.Evaluator | None
    diag: Diagnostics
    start_step: int              # 0, or the step of the checkpoint resumed from
    base_name: str               # what the adapter is an adapter of (adapter_config.json)
    resolved: dict               # the settings recorded in every checkpoint
    identity: dict               # content hashes of data, tokenizer and base (run_config.json)
    data_report: str
    prompt: dict | None = None   # the system turn the data trains on (train/datasets.py prompt_format)
    # Called on rank 0 after each evaluation row is logged, as listen(row, tensorboard writer or None) -> figures
    # added to the row that the checkpoint records (train/samples.py: generated held-out samples, report.html).
    # A plain callable, so the core never imports the folder that builds it.
    listen: Callable[[dict, object], dict] | None = None


def train_step(run: Run, step: int, ddp, autocast, predict: bool = False) -> tuple[dict, object, object, int]:
    """Steps 1-4 of one optimizer step. Returns (losses row, last micro-batch's text and audio scores, tokens).
    predict: the scores carry argmax predictions (Scorer.forward), for a step whose log shows them."""
    args, dist, K = run.args, run.dist, run.model.config.audio_num_codebooks
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(step, args)
    # 1-2: this step's micro-batches and their target counts over all ranks
    cpu_batches = [run.stream.next() for _ in range(args.grad_accum)]
    tokens = sum(int(b["attention_mask"].sum()) for b in cpu_batches) * dist.world_size
    micro = [{k: v.to(dist.device, non_blocking=True) for k, v in b.items()} for b in cpu_batches]
    counts = distributed.all_reduce_sum(sum(
        target_counts(b["text_targets"], b["audio_targets"]) for b in micro))
    sums = torch.zeros(1 + K, dtype=torch.float64, device=dist.device)  # text sum, audio sums
    # 3: forward/backward; gradients are all-reduced on the last micro-batch only
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or not dist.enabled
        with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
            text, audio = ddp(batch, predict=predict)
            loss = objective(text, audio, counts, args)
        run.diag.check_finite(loss, step, batch["sample_index"])
        (loss * dist.world_size).backward()
        sums += torch.cat([text.loss_sum.detach().view(1), audio.loss_sums.detach()]).double()
    # 4: clip, step
    params = run.scorer.trainable
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf)
    if not torch.isfinite(grad_norm):  # before the update: the weights (and the next checkpoint) stay finite
        raise FloatingPointError(f"non-finite gradient norm {float(grad_norm)} at step {step} (finite loss)")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    row = {"split": "train", "step": step, **step_losses(distributed.all_reduce_sum(sums), counts, K, args),
           "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm)}
    return row, text, audio, tokens


def trainer_state(run: Run, step: int, evaluated) -> dict:
    """What a checkpoint records besides the tensors: the data position, the schedule, every rank's RNG."""
    args, stream = run.args, run.stream
    return {
        "step": step, "epoch": stream.epoch, "batch_in_epoch": stream.position,
        "samples_seen": step * args.grad_accum * args.batch_size * run.dist.world_size,
        "world_size": run.dist.world_size, "batch_size": args.batch_size,
        "scheduler": {"type": "linear_warmup_cosine", "warmup_steps": args.warmup_steps,
                      "max_steps": args.max_steps, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
                      "last_lr": run.optimizer.param_groups[0]["lr"]},
        "config": run.resolved, "identity": run.identity, "data": run.data_report, "eval": evaluated,
        "prompt": run.prompt,
        "rng": distributed.gather_objects(train_state.rng_state()),  # every rank's, in rank order
    }


class Outputs:
    """Rank 0's live outputs: metrics.jsonl, the progress bar, TensorBoard, the per-step log lines."""

    def __init__(self, run: Run):
        args, self.run = run.args, run
        self.metrics = args.output_dir / "metrics.jsonl"
        self.bar = self.tb = None
        self.report = runlog.StepReport(run.diag, run.start_step, args.max_steps)
        self.watch = evaluate.OverfitWatch(run.diag.chance)
        if not run.dist.is_main:
            return
        from tqdm import tqdm
        # disable=None: a bar (with ETA) on a terminal, none in a piped log (the log lines carry the ETA);
        # log records go through the bar's write() while it is shown
        self.bar = tqdm(total=args.max_steps, initial=run.start_step, desc="train", unit="step", mininterval=2.0,
                        disable=None, dynamic_ncols=True)
        runlog.set_bar(self.bar)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(args.output_dir / "tensorboard"))

    def step(self, row: dict, text, audio) -> None:
        args, step = self.run.args, row["step"]
        self.watch.train(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if self.logs(step):
            append_metrics(self.metrics, row)
            if self.tb is not None:
                for k in ("loss", "text_loss", "audio_loss", "lr", "grad_norm"):
                    if row[k] is not None:  # a part without targets this step has no point
                        self.tb.add_scalar(k, row[k], step)
            next_save = min(args.max_steps, (step // args.save_steps + 1) * args.save_steps
                            if args.save_steps > 0 else args.max_steps)
            for line in self.report.lines(row, text, audio, next_save):
                log.info("%s", line)

    def logs(self, step: int) -> bool:
        """Whether this rank logs `step` (a metrics row, log lines with predictions)."""
        args = self.run.args
        return self.run.dist.is_main and (step % args.log_every == 0 or step in (self.run.start_step + 1,
                                                                                 args.max_steps))

    def evaluation(self, row: dict) -> None:
        if self.run.dist.is_main:
            append_metrics(self.metrics, row)
            evaluate.report(row, self.tb)
            self.watch.eval(row)
            if self.run.listen is not None:
                row.update(self.run.listen(row, self.tb))  # recorded with the checkpoint: what --best-by reads

    def close(self) -> None:
        runlog.set_bar(None)
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def train_loop(run: Run) -> tuple[int, dict]:
    """Steps start_step+1 .. max_steps (or until a signal). Returns (the last step, its metrics row)."""
    args, dist = run.args, run.dist
    ddp = torch.nn.parallel.DistributedDataParallel(run.scorer) if dist.enabled else run.scorer
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else contextlib.nullcontext()
    out, stop = Outputs(run), StopFlag()
    step, t0, tokens_seen, last = run.start_step, time.time(), 0, {}
    try:
        if run.evaluator is not None and step == 0:  # the untrained adapter's figures: the curve's first point
            out.evaluation(run.evaluator.run(0))
        while step < args.max_steps:
            step += 1
            last, text, audio, tokens = train_step(run, step, ddp, autocast, out.logs(step))  # steps 1-4
            tokens_seen += tokens
            elapsed = time.time() - t0
            last.update(tokens_per_s=tokens_seen / max(elapsed, 1e-9), elapsed_s=elapsed)
            out.step(last, text, audio)                                                # step 5: log
            stopping = distributed.any_rank(stop.raised is not None, dist.device)
            saving = (args.save_steps > 0 and step % args.save_steps == 0) or step == args.max_steps or stopping
            evaluated = None
            if run.evaluator is not None and not stopping and run.evaluator.due(step, saving, step == args.max_steps):
                evaluated = run.evaluator.run(step)                                    # evaluate
                out.evaluation(evaluated)
            if saving:                                                                 # save
                save_everywhere(step, run.model, run.optimizer, args, trainer_state(run, step, evaluated), dist,
                                run.base_name)
            if stopping:
                log.warning("stopped at step %d by %s: saved checkpoint-%d; rerun the same command to continue",
                            step, stop.raised or "a signal on another rank", step)
                break
    finally:
        stop.restore()
        run.stream.close()
        out.close()
    return step, last
