"""`higgs-min eval CKPT [--data X]`: score a checkpoint later, with the figures the in-training eval prints.

    higgs-min eval runs/x/best --data held_out.jsonl
    higgs-min eval runs/x/checkpoint-300              (the run's own held-out set: its --eval-data, or the
                                                       --eval-split share of its --data, rebuilt from the seed)

The same code as the evaluation during training (train/run.py build_run): runs.load_trained (the base as
the trainer built it, the adapter strictly), the run's tokenizer through ChatEncoder, corpus.open_dataset
with the run's --max-length, and evaluate.Evaluator with the run's batch size, loss weights, codebook
reduction and text chunk (all read from CKPT/trainer_state.json). Same samples in the same order and
batches give the same figures as the run's metrics.jsonl eval row at that step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from higgs_min import evaluate
from higgs_min.schema import DataError
from higgs_min.distributed import DistInfo
from higgs_min.errors import Parser, UsageError, guard
from higgs_min.loop import Scorer
from higgs_min.prepare.corpus import open_dataset
from higgs_min.train import runs
from higgs_min.train.datasets import Subset, encoder_for, holdout
from higgs_min.train.options import build_parser as train_parser

PROG = "higgs-min eval"
log = logging.getLogger("higgs_min.eval")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, or RUN/best, RUN/latest")
    p.add_argument("--data", type=Path, help="held-out conversations (JSONL or packed corpus folder); default: the "
                                             "run's own held-out set (--eval-data, or --eval-split of --data)")
    p.add_argument("--base-weights", type=Path, help="released-format base folder (default: the run's record)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the run's)")
    p.add_argument("--batch-size", type=int, help="default: the run's (the same batches give the same sums)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the metrics row as one JSON line")
    return p


def held_out(args, settings: dict, encoder):
    """The samples to score: --data in full, else the run's eval set rebuilt as build_run built it."""
    max_length = int(settings["max_length"])
    if args.data is not None:
        return open_dataset(args.data, encoder, max_length)
    if settings.get("eval_data"):
        return open_dataset(settings["eval_data"], encoder, max_length)
    if settings.get("eval_split"):
        data = open_dataset(settings["data"], encoder, max_length, settings.get("skip_bad_samples", False),
                            audio_root=settings.get("audio_root"), max_bad_fraction=settings["max_bad_fraction"])
        _, held = holdout(len(data), float(settings["eval_split"]), int(settings["seed"]))
        return Subset(data, held, "held out for eval")
    raise AssertionError("check_source lets no such case through")


def check_source(args, folder: Path) -> None:
    """Before the model is built: is there something to score?"""
    if not folder.is_dir():
        raise UsageError(f"{args.checkpoint}: no such checkpoint folder (checkpoint-N, OUT/best or OUT/latest)")
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data {args.data}: no such file or folder")
    recorded = runs.read_settings(folder)
    if args.data is None and not recorded.get("eval_data") and not recorded.get("eval_split"):
        raise UsageError(f"{args.checkpoint}: the run had no held-out set (no --eval-data, no --eval-split); "
                         f"pass --data FILE")


def score(args) -> dict:
    folder = runs.resolve_checkpoint(args.checkpoint)
    check_source(args, folder)
    trained = runs.load_trained(folder, args.base_weights, args.device)
    # a bare adapter records no options: the trainer's defaults stand in for them
    settings = {**vars(train_parser().parse_args([])), **trained.settings}
    tokenizer = args.tokenizer or trained.tokenizer
    if tokenizer is None:
        raise UsageError(f"{folder}: the run's tokenizer is gone; pass --tokenizer tokenizer.json")
    cfg = trained.cfg
    encoder = encoder_for(cfg, tokenizer)
    samples = held_out(args, settings, encoder)
    log.info("eval data: %s", samples.report)
    weights = argparse.Namespace(**{k: settings[k] for k in ("audio_reduction", "text_weight", "audio_weight")},
                                 eval_every=0)
    scorer = Scorer(trained.model, int(settings["text_loss_chunk"]))
    step = _step_of(folder)
    dist = DistInfo(device=torch.device(args.device))
    evaluator = evaluate.Evaluator(scorer, samples, args.batch_size or int(settings["batch_size"]),
                                   encoder.pad_id, dist, None, weights)
    return evaluator.run(step)


def _step_of(folder: Path) -> int:
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # a bare adapter folder


def _main(argv) -> int:
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    row = score(args)
    if args.json:
        print(json.dumps(row))
    else:
        acc = [a for a in row["audio_accuracy_per_codebook"] if a is not None]
        show = evaluate._show  # a part without targets is null: '-', as the training log shows it
        print(f"eval of {args.checkpoint} (step {row['step']}): loss {row['loss']:.6f} (text {show(row['text_loss'], 6)}, "
              f"audio {show(row['audio_loss'], 6)}), text accuracy {show(row['text_accuracy'])}, audio accuracy "
              f"{show(sum(acc) / len(acc) if acc else None)} (mean of {len(acc)} codebooks), {row['samples']} samples")
    return 0


def main(argv=None) -> int:
    """A usage mistake exits 2, a run that cannot be scored exits 1, one line each (errors.guard)."""
    from higgs_min.checkpoint import CheckpointError

    return guard(_main, argv, PROG, runtime=(DataError, CheckpointError, runs.RunError, FileNotFoundError))
