"""LoRA fine-tuning of a Higgs Audio v2 model: one process, or many under torchrun.

    python -m higgs_min.train                      # tiny preset on the shipped demo set
    torchrun --nproc-per-node 2 -m higgs_min.train --device cpu

One optimizer step:
    1. take grad_accum micro-batches of batch_size samples (per rank, DistributedSampler order)
    2. count the text and per-codebook audio targets of all of them, summed over ranks
    3. each micro-batch: loss = Σ token losses / global count, backward
       (DDP averages gradients over ranks, so the loss is scaled by world_size;
        no_sync on all but the last micro-batch) -- N ranks × batch b == 1 rank × batch N·b
    4. clip, AdamW step, learning rate from warmup + cosine
    5. log, then save at save_steps, at the last step, and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from higgs_min import checkpoint, distributed, evaluate, runconfig, runlog, train_state
from higgs_min.batches import BatchStream, padding_fraction
from higgs_min.config import PRESETS, ModelConfig
from higgs_min.corpus import open_dataset, verify as verify_corpus
from higgs_min.data import ChatEncoder, DataError
from higgs_min.errors import Parser, RunError, UsageError, guard
from higgs_min.lora import DEFAULT_TARGETS, adapter_config, apply_lora
from higgs_min.loss import Diagnostics, audio_scores, reduce_codebooks, target_counts, text_scores
from higgs_min.model import HiggsAudioModel
from higgs_min.runs import build_base

log = logging.getLogger("higgs_min.train")
DATA = Path(__file__).resolve().parent.parent / "data"


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m higgs_min.train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--config", type=Path, help="JSON file of option values (keys as option names with _); "
                                  "command-line options override it")
    a("--data", type=Path, default=DATA / "demo.jsonl",
      help="training conversations: a JSONL file, or a corpus folder made by `prepare pack`")
    a("--tokenizer", type=Path, help="tokenizers tokenizer.json (default: the one in --base-weights, "
                                     "else the demo's data/tokenizer.json)")
    a("--preset", default="tiny", choices=sorted(PRESETS), help="model preset when no --base-weights")
    a("--base-weights", type=Path, help="released-format weights (folder with config.json and shards)")
    a("--output-dir", type=Path, default=Path("output"), help="where checkpoints and logs go")
    a("--max-steps", type=int, default=300, help="optimizer steps to train")
    a("--epochs", type=int, help="train N passes over the data instead (sets --max-steps)")
    a("--save-steps", type=int, default=100, help="save every N steps (and always at the last step)")
    a("--batch-size", type=int, default=8, help="samples per micro-batch per rank")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    a("--warmup-steps", type=int, default=20, help="linear warmup steps, then cosine decay")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    a("--seed", type=int, default=0, help="seed for model init, LoRA init and data order")
    a("--resume", default="auto", help="auto (newest valid checkpoint in --output-dir), none, or a checkpoint folder")
    a("--lora-rank", type=int, default=16, help="LoRA rank r")
    a("--lora-alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / r)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    a("--lora-targets", default=",".join(DEFAULT_TARGETS),
      help="comma-separated module-name patterns (PEFT suffix rule)")
    a("--rslora", action="store_true", help="scale = alpha / sqrt(r)")
    a("--text-weight", type=float, default=1.0, help="weight of the text loss")
    a("--audio-weight", type=float, default=1.0, help="weight of the audio loss")
    a("--audio-reduction", default="codebook_mean", choices=["codebook_mean", "token_mean"],
      help="mean of per-codebook means, or mean over all audio tokens")
    a("--text-loss-chunk", type=int, default=128, help="text rows per head+CE chunk (bounds memory)")
    a("--max-length", type=int, default=2048, help="longer samples are skipped (counted)")
    a("--group-by-length", action="store_true", help="batch samples of similar length (less padding)")
    a("--skip-bad-samples", action="store_true", help="leave bad JSONL lines out (listed in OUTPUT/rejected.jsonl) "
                                                      "instead of failing")
    a("--max-bad-fraction", type=float, default=0.01, help="with --skip-bad-samples: fail when more than this "
                                                           "share of the lines is bad")
    a("--audio-root", type=Path, help="folder the codes paths are relative to (default: the JSONL's folder)")
    a("--data-workers", type=int, help="DataLoader worker processes building batches (default: 0 on CPU, 2 on CUDA)")
    a("--no-verify-data", action="store_true", help="skip the sha256 check of a packed corpus's shards at start")
    a("--eval-data", type=Path, help="held-out conversations (JSONL), scored at --eval-every and at the end")
    a("--eval-split", type=float, default=0.0,
      help="without --eval-data: hold out this share of --data for evaluation (e.g. 0.1; 0: no eval)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: at every save) and at the end")
    a("--log-every", type=int, default=25, help="log metrics every N steps")
    a("--log-samples", type=int, default=3, help="log the label statistics of the first N samples")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    a("--dist-timeout", type=float, default=600.0, help="seconds a collective may wait before failing")
    a("--keep-last", type=int, default=0, help="keep only the newest N valid checkpoints (0: all)")
    a("--backup-dir", type=Path, help="second output folder to try when a save fails")
    a("--on-save-error", default="raise", choices=["raise", "continue"], help="what a failed save does")
    a("--strict-space", action="store_true", help="fail in preflight when free space looks too small")
    a("--tensorboard", action="store_true", help="also write TensorBoard event files")
    a("--allow-changed-settings", action="store_true",
      help="resume even though settings that change what is trained differ from the run's record (recorded)")
    a("--debug", action="store_true", help="show the traceback of a reported error")
    a("--activation-checkpointing", action="store_true",
      help="recompute each decoder layer in backward: less activation memory, about one more forward of time")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.config:
        try:
            values = runconfig.as_config(json.loads(args.config.read_text()))
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            ap.error(f"--config {args.config}: not a JSON object of option values ({e})")
        known = {a.dest for a in ap._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            ap.error(f"--config {args.config}: unknown option(s) {unknown}")
        ap.set_defaults(**values)
        args = ap.parse_args(argv)  # the command line still wins over the file
    return args


def check_inputs(args) -> None:
    """Refuse, before anything is built, paths that cannot work; default the tokenizer."""
    if args.base_weights is not None:
        base = args.base_weights
        if not base.is_dir() or not (base / "config.json").is_file():
            found = (sorted(p.name for p in base.iterdir())[:6] if base.is_dir() else
                     "a file" if base.exists() else "nothing")
            raise UsageError(f"--base-weights {base}: expected a folder with config.json and *.safetensors "
                             f"(as `export` writes); found {found or 'an empty folder'}")
        if args.tokenizer is None:
            args.tokenizer = base / "tokenizer.json"
            if not args.tokenizer.is_file():
                raise UsageError(f"--base-weights {base} holds no tokenizer.json; pass --tokenizer PATH")
    elif args.tokenizer is None:
        args.tokenizer = DATA / "tokenizer.json"
    if not args.data.exists():
        raise UsageError(f"--data {args.data}: no such file or folder (a JSONL file or a corpus from `prepare pack`)")
    if not args.tokenizer.is_file():
        raise UsageError(f"--tokenizer {args.tokenizer}: " + ("is a folder, expected a file"
                                                              if args.tokenizer.is_dir() else "no such file"))
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir {args.output_dir} is a file; give a folder (it is created if missing)")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    for name in ("max_steps", "batch_size", "grad_accum", "lora_rank", "max_length", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr * min_lr_ratio at max_steps."""
    if step <= args.warmup_steps:
        return args.lr * step / max(1, args.warmup_steps)
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Scorer(nn.Module):
    """Model + heads at the scored rows, as one module so DDP sees every trainable use."""

    def __init__(self, model: HiggsAudioModel, text_chunk: int):
        super().__init__()
        self.model, self.text_chunk = model, text_chunk
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def forward(self, batch):
        audio_mask = batch["audio_in_mask"] | batch["audio_out_mask"]
        hidden = self.model(batch["input_ids"], batch["attention_mask"], batch["audio_codes"], audio_mask)
        # A batch without audio rows leaves audio_mlp's LoRA out of the graph. A zero-weighted term keeps
        # every trainable parameter in every step's graph (its gradient gains exactly 0), so DDP runs
        # with find_unused_parameters=False: no extra graph walk, no warning.
        hidden = hidden + 0.0 * sum(p.sum() for p in self.trainable).to(hidden.dtype)
        text = text_scores(hidden, batch["text_labels"], self.model.audio_decoder_proj.text_lm_head, self.text_chunk)
        audio = audio_scores(hidden, batch["audio_labels"], batch["audio_out_mask"], self.model.audio_logits)
        return text, audio


def objective(text, audio, counts, args):
    """This micro-batch's share of the step loss, normalized by the step's global counts."""
    counts = counts.float()
    text_term = text.loss_sum / counts[0].clamp(min=1)
    audio_term, _ = reduce_codebooks(audio.loss_sums, counts[1:], args.audio_reduction)
    return args.text_weight * text_term + args.audio_weight * audio_term


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


def save_everywhere(step, model, optimizer, args, trainer_state, dist_info, base_name):
    """Rank 0 writes; all ranks get the same outcome; no rank hangs on a failed save."""
    outcome = "ok"
    if dist_info.is_main:
        files = train_state.training_files(model, optimizer, adapter_config(
            model, args.lora_targets.split(","), args.lora_dropout, base_name), trainer_state)
        targets = [args.output_dir] + ([args.backup_dir] if args.backup_dir else [])
        errors = []
        for target in targets:
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
                path = checkpoint.save(target, step, files)
                log.info("saved %s (%.2f MB, manifest verified)", path.resolve(),
                         sum(f.stat().st_size for f in path.iterdir()) / 1e6)
                ev = trainer_state.get("eval")
                if ev and math.isfinite(ev["loss"]) and checkpoint.update_best(target, path.name, ev["loss"]):
                    log.info("best: %s (eval loss %.4f)", path.name, ev["loss"])
                if args.keep_last:
                    checkpoint.rotate(target, args.keep_last)
                break
            except (checkpoint.CheckpointError, OSError) as e:
                log.error("checkpoint at step %d into %s failed: %s", step, target, e)
                errors.append(str(e))
        else:
            outcome = "; then ".join(errors)
    outcome = distributed.broadcast_from_main(outcome)
    if outcome != "ok":
        if args.on_save_error == "raise":
            raise checkpoint.CheckpointError(f"step {step}: {outcome}")
        log.warning("step %d: continuing without a checkpoint (--on-save-error continue)", step)


def model_config(args) -> ModelConfig:
    """The model's config (as runs.build_base reads it), known before any weight is built: the data is
    checked against it first."""
    if not args.base_weights:
        return ModelConfig.from_preset(args.preset)
    try:
        return ModelConfig.from_pretrained_config(args.base_weights)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UsageError(f"--base-weights {args.base_weights}: {e.args[0] if e.args else e}") from e


def open_data(args, dist_info, cfg: ModelConfig):
    """Tokenizer + training data, every line or shard checked before the model is built. A packed corpus
    is hashed against its manifest on each node's local rank 0 (unless --no-verify-data); all ranks agree."""
    encoder = ChatEncoder(args.tokenizer, cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size,
                          delay=cfg.use_delay_pattern)
    problem = ""
    if Path(args.data).is_dir() and not args.no_verify_data and dist_info.local_rank == 0:
        t = time.time()
        try:
            r = verify_corpus(args.data, check_sources=False)
            log.info("%s: %d shards, %.1f MB verified (sha256) in %.1f s", args.data, r["shards"], r["bytes"] / 1e6,
                     time.time() - t)
        except DataError as e:
            problem = str(e)
    if distributed.any_rank(bool(problem), dist_info.device):
        raise DataError(problem or "the data check failed on another node (see its log)")
    dataset = open_dataset(args.data, encoder, args.max_length, args.skip_bad_samples, audio_root=args.audio_root,
                           max_bad_fraction=args.max_bad_fraction,
                           report_path=Path(args.output_dir) / "rejected.jsonl" if dist_info.is_main else None)
    log.info("data: %s", dataset.report)
    if dist_info.is_main:
        for i in range(min(args.log_samples, len(dataset))):
            log.info("%s", dataset[i].stats())
    return encoder, dataset


def build_model(args, device) -> tuple[HiggsAudioModel, ModelConfig, str]:
    """Base weights (frozen; released ones, or a seeded random preset) + LoRA (trainable)."""
    try:
        model, cfg, base_name = build_base(args.preset, args.base_weights, args.seed,
                                           torch.bfloat16 if device.type == "cuda" else torch.float32)
    except (KeyError, ValueError, FileNotFoundError) as e:  # config fields, tensor names, shapes, shards
        if not args.base_weights:
            raise
        raise UsageError(f"--base-weights {args.base_weights}: {e.args[0] if e.args else e}") from e
    apply_lora(model, args.lora_targets.split(","), args.lora_rank, args.lora_alpha, args.lora_dropout, args.rslora)
    model.activation_checkpointing = args.activation_checkpointing
    return model.to(device), cfg, base_name


def prepare_output(args, dist_info, n_trainable: int) -> None:
    """Rank 0 proves the output folder writable before any step; every rank learns the outcome."""
    outcome = "ok"
    if dist_info.is_main:
        try:
            checkpoint.preflight(args.output_dir, n_trainable * 4 * 3 + (1 << 20), args.save_steps,
                                 args.max_steps, args.strict_space)
            checkpoint.remove_stale_tmp(args.output_dir)
        except checkpoint.CheckpointError as e:
            outcome = str(e)
    outcome = distributed.broadcast_from_main(outcome)
    if outcome != "ok":
        raise checkpoint.CheckpointError(outcome)


def resume(folder, args, model, optimizer, stream, dist_info) -> int:
    """Restore adapter, optimizer, data position and RNG from a checkpoint; return its step (0: none)."""
    if folder is None:
        return 0
    try:
        state = train_state.load_training_state(folder, model, optimizer)
    except (KeyError, ValueError) as e:  # tensor names or shapes that do not fit this model
        raise RunError(f"cannot resume from {folder}: {e}") from e
    stream.epoch, stream.position = state["epoch"], state["batch_in_epoch"]
    if state["world_size"] != dist_info.world_size or state["batch_size"] != args.batch_size:
        log.warning("resuming with world_size %d / batch %d; the checkpoint had %d / %d: data order differs",
                    dist_info.world_size, args.batch_size, state["world_size"], state["batch_size"])
    rngs = state["rng"]
    train_state.set_rng_state(rngs[dist_info.rank] if dist_info.rank < len(rngs) else rngs[0])
    log.info("resumed from %s at step %d", folder, state["step"])
    return state["step"]


def step_losses(sums, counts, K, args) -> dict:
    """Step-level losses from the summed per-token losses (1 + K,) and global counts (1 + K,)."""
    text = (sums[0] / counts[0].clamp(min=1)).item()
    audio, per_cb = reduce_codebooks(sums[1:1 + K], counts[1:], args.audio_reduction)
    audio = audio.item() if counts[1:].any() else float("nan")
    return {"loss": args.text_weight * text + args.audio_weight * audio, "text_loss": text, "audio_loss": audio,
            "audio_loss_per_codebook": per_cb.tolist()}


def append_metrics(path: Path, row: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot write {path}: [{errno.errorcode.get(e.errno, e.errno)}] "
                                         f"{e.strerror} (was the output folder removed?)") from e


def train(args) -> dict:
    check_inputs(args)
    try:
        dist_info = distributed.init(args.device, args.dist_timeout)
    except RuntimeError as e:  # no CUDA device, or the process group could not form
        raise RunError(str(e)) from e
    runlog.setup(dist_info.is_main)
    args.output_dir = Path(args.output_dir).resolve()
    run = runconfig.decide(args, dist_info.is_main)  # refuses a resume whose settings changed
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if dist_info.device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    encoder, dataset = open_data(args, dist_info, model_config(args))  # all validated before the model is built
    dataset, eval_samples = evaluate.open_eval(args, encoder, dataset)
    model, cfg, base_name = build_model(args, dist_info.device)
    cuda = dist_info.device.type == "cuda"
    stream = BatchStream(dataset, args.batch_size, dist_info.world_size, dist_info.rank, args.seed,
                         encoder.ids["end_of_text"], args.group_by_length,
                         workers=args.data_workers if args.data_workers is not None else (2 if cuda else 0),
                         pin_memory=cuda)
    if args.epochs:
        args.max_steps = math.ceil(args.epochs * stream.batches_per_epoch() / args.grad_accum)
        log.info("--epochs %d: %d steps of %d micro-batches (%d batches per epoch per rank)",
                 args.epochs, args.max_steps, args.grad_accum, stream.batches_per_epoch())
    log.info("padding: %.1f%% of positions in the first epoch's batches%s",
             100 * padding_fraction(stream.lengths, stream.epoch_order(0), args.batch_size),
             "" if args.group_by_length else " (--group-by-length lowers it)")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all LoRA tensors on CUDA; the CPU keeps the default (bitwise resume tests run there)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
                                  fused=True if dist_info.device.type == "cuda" else None)

    prepare_output(args, dist_info, sum(p.numel() for p in params))
    if dist_info.is_main:
        runlog.attach_file(args.output_dir / "train.log")  # with every line logged so far
    resolved = runconfig.settings_of(args)
    if dist_info.is_main:
        log.info("resolved config: %s", json.dumps(resolved, sort_keys=True))
        run.record(args, cfg.to_dict(), dist_info.world_size)
    start_step = step = resume(run.resume_from, args, model, optimizer, stream, dist_info)

    scorer = Scorer(model, args.text_loss_chunk)
    ddp = DDP(scorer) if dist_info.enabled else scorer
    diag = Diagnostics(cfg.vocab_size, cfg.audio_num_classes, args.warmup_steps, encoder.decode)
    K = cfg.audio_num_codebooks
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dist_info.device.type == "cuda"
                else contextlib.nullcontext())
    evaluator = evaluate.Evaluator(scorer, eval_samples, args.batch_size, encoder.ids["end_of_text"], dist_info,
                                   autocast, args) if eval_samples else None
    metrics_path = args.output_dir / "metrics.jsonl"
    tb = bar = None
    if dist_info.is_main:
        from tqdm import tqdm
        # disable=None: a bar (with ETA) on a terminal, none in a piped log (the log lines carry the ETA);
        # log records go through the bar's write() while it is shown
        bar = tqdm(total=args.max_steps, initial=start_step, desc="train", unit="step", mininterval=2.0,
                   disable=None, dynamic_ncols=True)
        runlog.set_bar(bar)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(args.output_dir / "tensorboard"))
    steps_log = runlog.StepReport(diag, start_step, args.max_steps)
    stop = StopFlag()
    t0, tokens_seen, last = time.time(), 0, {}
    try:
        while step < args.max_steps:
            step += 1
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, args)
            # 1-2: this step's micro-batches and their target counts over all ranks
            cpu_batches = [stream.next() for _ in range(args.grad_accum)]
            tokens_seen += sum(int(b["attention_mask"].sum()) for b in cpu_batches) * dist_info.world_size
            micro = [{k: v.to(dist_info.device, non_blocking=True) for k, v in b.items()} for b in cpu_batches]
            counts = distributed.all_reduce_sum(sum(
                target_counts(b["text_labels"], b["audio_labels"], b["audio_out_mask"]) for b in micro))
            sums = torch.zeros(1 + K, dtype=torch.float64, device=dist_info.device)  # text sum, audio sums
            # 3: forward/backward; gradients are all-reduced on the last micro-batch only
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1 or not dist_info.enabled
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                    text, audio = ddp(batch)
                    loss = objective(text, audio, counts, args)
                diag.check_finite(loss, step, batch["sample_index"])
                (loss * dist_info.world_size).backward()
                sums += torch.cat([text.loss_sum.detach().view(1), audio.loss_sums.detach()]).double()
            # 4: clip, step
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # 5: log, save
            elapsed = time.time() - t0
            last = {"split": "train", "step": step, **step_losses(distributed.all_reduce_sum(sums), counts, K, args),
                    "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "elapsed_s": elapsed}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
            if dist_info.is_main and (step % args.log_every == 0 or step in (start_step + 1, args.max_steps)):
                append_metrics(metrics_path, last)
                if tb is not None:
                    for k in ("loss", "text_loss", "audio_loss", "lr", "grad_norm"):
                        tb.add_scalar(k, last[k], step)
                next_save = min(args.max_steps, (step // args.save_steps + 1) * args.save_steps
                                if args.save_steps > 0 else args.max_steps)
                for line in steps_log.lines(last, text, audio, next_save):
                    log.info("%s", line)
            stopping = distributed.any_rank(stop.raised is not None, dist_info.device)
            saving = (args.save_steps > 0 and step % args.save_steps == 0) or step == args.max_steps or stopping
            evaluated = None
            if evaluator is not None and not stopping and evaluator.due(step, saving, step == args.max_steps):
                evaluated = evaluator.run(step)
                if dist_info.is_main:
                    append_metrics(metrics_path, evaluated)
                    evaluate.report(evaluated, tb)
            if saving:
                trainer_state = {
                    "step": step, "epoch": stream.epoch, "batch_in_epoch": stream.position,
                    "samples_seen": step * args.grad_accum * args.batch_size * dist_info.world_size,
                    "world_size": dist_info.world_size, "batch_size": args.batch_size,
                    "scheduler": {"type": "linear_warmup_cosine", "warmup_steps": args.warmup_steps,
                                  "max_steps": args.max_steps, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
                                  "last_lr": optimizer.param_groups[0]["lr"]},
                    "config": resolved, "identity": run.identity, "data": dataset.report, "eval": evaluated,
                    "rng": distributed.gather_objects(train_state.rng_state()),  # every rank's, in rank order
                }
                save_everywhere(step, model, optimizer, args, trainer_state, dist_info, base_name)
            if stopping:
                log.warning("stopped at step %d by %s: saved checkpoint-%d; rerun the same command to continue",
                            step, stop.raised or "a signal on another rank", step)
                break
    finally:
        stop.restore()
        stream.close()
        runlog.set_bar(None)
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
    if dist_info.is_main:
        if step == start_step:
            log.info("nothing to do: the checkpoint is already at step %d of --max-steps %d", step, args.max_steps)
        plot_losses(args.output_dir)
        latest = args.output_dir / "latest"
        log.info("done at step %d. checkpoints: %s (latest: %s); metrics: %s; log: %s", step, args.output_dir,
                 latest.read_text().strip() if latest.exists() else "none", metrics_path,
                 args.output_dir / "train.log")
    distributed.barrier()
    return last


def plot_losses(output_dir: Path) -> None:
    """loss.png at the end of every run (train and eval curves); a plotting failure only warns."""
    from higgs_min import plot

    if not (output_dir / "metrics.jsonl").exists():
        return
    try:
        log.info("loss curves: %s", plot.plot(output_dir))
    except (ImportError, OSError, ValueError, KeyError, SystemExit) as e:
        log.warning("could not draw loss.png: %s", e)


def _main(argv) -> int:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        distributed.shutdown()
    runlog.detach()
    return 0


def main(argv=None) -> int:
    return guard(_main, argv, "python -m higgs_min.train",
                 runtime=(DataError, checkpoint.CheckpointError, FloatingPointError))


if __name__ == "__main__":
    sys.exit(main())
