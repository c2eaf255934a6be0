"""`python -m higgs_min.train`: build the run, then hand it to the loop (higgs_min/loop.py).

    python -m higgs_min.train                      # tiny preset on the shipped demo set
    torchrun --nproc-per-node 2 -m higgs_min.train --device cpu

build_run does everything before step 1, in this order: the options checked (options.py), ranks joined,
the resume decided against the run's record (runconfig.py), the data opened and every line or shard
checked (datasets.py), the model built (runs.build_base + LoRA), the output folder proven writable, the
checkpoint restored (train_state.py). Then loop.train_loop trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import socket
from pathlib import Path

import numpy as np
import torch

from higgs_min import checkpoint, distributed, evaluate, loop, runlog, train_state
from higgs_min.batches import BatchStream, padding_fraction
from higgs_min.config import ModelConfig
from higgs_min.schema import DataError
from higgs_min.errors import RunError, UsageError, guard
from higgs_min.lora import apply_lora
from higgs_min.loop import Scorer
from higgs_min.loss import Diagnostics
from higgs_min.model import HiggsAudioModel
from higgs_min.train import runconfig
from higgs_min.train.datasets import Subset, open_data, open_eval, prompt_format, write_heldout
from higgs_min.train.options import check_inputs, parse_args
from higgs_min.train.runs import build_base
from higgs_min.v3.config import PRESETS as V3_PRESETS, V3Config, is_v3_config
from higgs_min.v3.finetune import train_audio_embedding

log = logging.getLogger("higgs_min.train")


def model_config(args):
    """The model's config (as runs.build_base reads it: a v2 ModelConfig or a V3Config), known before any weight is
    built: the data is checked against it first."""
    if not args.base_weights:
        return (V3Config if args.preset in V3_PRESETS else ModelConfig).from_preset(args.preset)
    try:
        if is_v3_config(args.base_weights):
            return V3Config.from_pretrained_config(args.base_weights)
        return ModelConfig.from_pretrained_config(args.base_weights)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UsageError(f"--base-weights {args.base_weights}: {e.args[0] if e.args else e}") from e


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
    if args.train_audio_embedding:
        if getattr(cfg, "family", "v2") != "v3":
            raise UsageError("--train-audio-embedding trains Higgs Audio v3's tied audio matrix; this base is v2")
        train_audio_embedding(model)  # after apply_lora, which froze everything: one fp32 tensor, tie kept
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
    """Restore adapter, optimizer, data position and RNG from a checkpoint; return its step (0: none).

    Every rank reads the checkpoint itself: the one rank 0 chose, looked up by name in this rank's own
    --output-dir under --resume auto (the same path on every node of a run), else the --resume path. The
    ranks then agree (one gather): when any rank could not read it, or read another copy (its manifest
    differs from rank 0's), every rank stops with the same error naming each such node, rank and path.
    """
    if folder is None:
        return 0
    if args.resume == "auto":
        folder = Path(args.output_dir) / Path(folder).name
    state, problem, manifest = None, None, None
    try:
        manifest = hashlib.sha256((Path(folder) / checkpoint.MANIFEST).read_bytes()).hexdigest()
        state = train_state.load_training_state(folder, model, optimizer)
    except OSError as e:  # this node does not see the folder (or its manifest)
        problem = f"cannot read {e.filename or folder} ({e.strerror or e})"
    except checkpoint.CheckpointError as e:
        problem = str(e)
    except (KeyError, ValueError) as e:  # tensor names or shapes that do not fit this model
        problem = f"cannot resume from {folder}: {e}"
    seen = distributed.gather_objects((socket.gethostname(), dist_info.rank, str(folder), problem, manifest))
    other_copy = "its manifest differs from rank 0's (another copy of the checkpoint)"
    bad = [(host, rank, path, why or other_copy) for host, rank, path, why, digest in seen
           if why or (seen[0][3] is None and digest != seen[0][4])]
    if bad:
        msg = "cannot resume: " + "; ".join(f"rank {rank} on node {host}: {why}" for host, rank, _, why in bad)
        if any(rank != 0 for _, rank, _, _ in bad):
            msg += (f". Every rank reads the checkpoint rank 0 chose ({Path(folder).name}) itself: put --output-dir"
                    " (and --resume) on storage that every node sees (a shared file system), or copy the checkpoint"
                    " to " + ", ".join(f"{path} on node {host}" for host, rank, path, _ in bad if rank != 0)
                    + " before resuming")
        raise RunError(msg)
    stream.epoch, stream.position = state["epoch"], state["batch_in_epoch"]
    if state["world_size"] != dist_info.world_size or state["batch_size"] != args.batch_size:
        log.warning("resuming with world_size %d / batch %d; the checkpoint had %d / %d: data order differs",
                    dist_info.world_size, args.batch_size, state["world_size"], state["batch_size"])
    rngs = state["rng"]
    train_state.set_rng_state(rngs[dist_info.rank] if dist_info.rank < len(rngs) else rngs[0])
    log.info("resumed from %s at step %d", folder, state["step"])
    return state["step"]


def build_run(args) -> loop.Run:
    """Everything before step 1, in order: inputs checked, ranks joined, the resume decided, data opened and
    checked, the model built, the output folder proven writable, the checkpoint restored."""
    check_inputs(args)
    try:
        dist_info = distributed.init(args.device, args.dist_timeout)
    except RuntimeError as e:  # no CUDA device, or the process group could not form
        raise RunError(str(e)) from e
    runlog.setup(dist_info.is_main)
    args.output_dir = Path(args.output_dir).resolve()
    record = runconfig.decide(args, dist_info.is_main)  # refuses a resume whose settings changed
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if dist_info.device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    encoder, dataset = open_data(args, dist_info, model_config(args))  # all validated before the model is built
    prompt = prompt_format(dataset, encoder)  # recorded in every checkpoint: generate's default prompt
    said = f"system turn {prompt['system']!r}" if prompt["system"] is not None else "no system turn"
    # several system turns: generate can default to one only (the most common); say so once, here
    if not prompt["samples"]:  # a v3 layout: a TTS prompt, never a chat system turn
        log.info("prompt: %s (the v3 TTS layout has none)", said)
    else:
        (log.warning if prompt["distinct"] > 1 else log.info)(
            "prompt: %s (%d of %d conversations read, %d distinct%s)", said, prompt["samples"], len(dataset),
            prompt["distinct"], "; generate defaults to the most common, --system picks another"
            if prompt["distinct"] > 1 else "")
    dataset, eval_samples = open_eval(args, encoder, dataset)
    model, cfg, base_name = build_model(args, dist_info.device)
    cuda = dist_info.device.type == "cuda"
    stream = BatchStream(dataset, args.batch_size, dist_info.world_size, dist_info.rank, args.seed,
                         encoder.pad_id, args.group_by_length,
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
                                  fused=True if cuda else None)

    prepare_output(args, dist_info, sum(p.numel() for p in params))
    if dist_info.is_main:
        runlog.attach_file(args.output_dir / "train.log")  # with every line logged so far
        if isinstance(eval_samples, Subset) and args.eval_split:
            log.info("held-out lines: %s", write_heldout(args.output_dir, eval_samples, args.eval_split, args.seed))
    resolved = runconfig.settings_of(args)
    if dist_info.is_main:
        log.info("resolved config: %s", json.dumps(resolved, sort_keys=True))
        record.record(args, cfg.to_dict(), dist_info.world_size)
    start_step = resume(record.resume_from, args, model, optimizer, stream, dist_info)

    scorer = Scorer(model, args.text_loss_chunk)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    evaluator = evaluate.Evaluator(scorer, eval_samples, args.batch_size, encoder.pad_id, dist_info,
                                   autocast, args) if eval_samples else None
    diag = Diagnostics(cfg.vocab_size, cfg.audio_num_classes, encoder.decode)
    return loop.Run(args=args, dist=dist_info, model=model, scorer=scorer, optimizer=optimizer, stream=stream,
                    evaluator=evaluator, diag=diag, start_step=start_step, base_name=base_name, resolved=resolved,
                    identity=record.identity, data_report=dataset.report, prompt=prompt,
                    listen=listener(args, cfg, model, encoder, eval_samples, dist_info))


def listener(args, cfg, model, encoder, eval_samples, dist_info):
    """The loop's Run.listen: rank 0 generates --eval-samples held-out prompts at each evaluation
    (train/samples.py; the model family's prompts and sampler: samples.V2, samples_v3.V3), or None."""
    if not (eval_samples and args.eval_samples and dist_info.is_main):
        return None
    from higgs_min.train import samples

    if getattr(cfg, "family", "v2") == "v3":
        from higgs_min.train.samples_v3 import V3 as family
    elif not cfg.use_delay_pattern:
        log.warning("--eval-samples %d: no samples, generation needs use_delay_pattern true", args.eval_samples)
        return None
    else:
        family = samples.V2
    return samples.Listener(args, model, encoder, eval_samples, dist_info.device, family)


def train(args) -> dict:
    """Build the run, run the loop (higgs_min/loop.py), then say where everything went."""
    run = build_run(args)
    step, last = loop.train_loop(run)
    if run.dist.is_main:
        if step == run.start_step:
            log.info("nothing to do: the checkpoint is already at step %d of --max-steps %d", step, args.max_steps)
        plot_losses(args.output_dir)
        latest = args.output_dir / "latest"
        log.info("done at step %d. checkpoints: %s (latest: %s); metrics: %s; log: %s", step, args.output_dir,
                 latest.read_text().strip() if latest.exists() else "none", args.output_dir / "metrics.jsonl",
                 args.output_dir / "train.log")
    distributed.barrier()
    return last


def plot_losses(output_dir: Path) -> None:
    """loss.png at the end of every run (train and eval curves); a plotting failure only warns."""
    from higgs_min.train import plot

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
