"""The trainer's options: one table, each option declared once with its help and its resume class.

    python -m higgs_min.train --help

A resume compares the options with the run's record (runconfig.py) and treats each by its class:

    TRAINED       changes what is trained (data, tokenizer, base, LoRA scale, seed, batch, loss, schedule shape):
                  a change is refused on resume unless --allow-changed-settings (then recorded)
    SHAPE         changes the adapter's shapes: refused always (the checkpoint would not load)
    OPERATIONAL   changes how the run executes, not what it trains (length of the run, cadences, workers,
                  data verification, logging, devices, timeouts): accepted on resume, logged and recorded

`--max-steps`/`--epochs` are OPERATIONAL because extending a run is what a user resumes for, though the cosine
schedule is stretched to the new end. A new option must be given a class here: there is no other list.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from higgs_min.config import PRESETS
from higgs_min.v3.config import PRESETS as V3_PRESETS
from higgs_min.errors import Parser, UsageError
from higgs_min.generate.v3 import bundled_codec
from higgs_min.lora import DEFAULT_TARGETS

DEFAULT_SAMPLES = 4  # --eval-samples when there is eval data

TRAINED, SHAPE, OPERATIONAL = "trained", "shape", "operational"
DATA = Path(__file__).resolve().parents[2] / "data"


def opt(flag: str, resume: str, **kwargs) -> tuple[str, str, dict]:
    return flag, resume, kwargs


OPTIONS = (
    opt("--config", OPERATIONAL, type=Path, help="JSON file of option values (keys as option names with _); "
                                      "command-line options override it"),
    opt("--data", TRAINED, type=Path, default=DATA / "demo.jsonl",
          help="training conversations: a JSONL file, or a corpus folder made by `prepare pack`"),
    opt("--tokenizer", TRAINED, type=Path, help="tokenizers tokenizer.json (default: the one in --base-weights, "
                                         "else the demo's data/tokenizer.json, data/tokenizer_v3.json for v3-*)"),
    opt("--preset", SHAPE, default="tiny", choices=sorted(PRESETS) + sorted(V3_PRESETS),
        help="model preset when no --base-weights (v3-*: Higgs Audio v3 TTS)"),
    opt("--base-weights", TRAINED, type=Path, help="released-format weights (folder with config.json and shards)"),
    opt("--output-dir", OPERATIONAL, type=Path, default=Path("output"), help="where checkpoints and logs go"),
    opt("--max-steps", OPERATIONAL, type=int, default=300, help="optimizer steps to train"),
    opt("--epochs", OPERATIONAL, type=int, help="train N passes over the data instead (sets --max-steps)"),
    opt("--save-steps", OPERATIONAL, type=int, default=100, help="save every N steps (and always at the last step)"),
    opt("--batch-size", TRAINED, type=int, default=8, help="samples per micro-batch per rank"),
    opt("--grad-accum", TRAINED, type=int, default=1, help="micro-batches per optimizer step"),
    opt("--lr", TRAINED, type=float, default=3e-3, help="peak learning rate"),
    opt("--min-lr-ratio", TRAINED, type=float, default=0.1, help="final learning rate as a fraction of --lr"),
    opt("--warmup-steps", TRAINED, type=int, default=20, help="linear warmup steps, then cosine decay"),
    opt("--weight-decay", TRAINED, type=float, default=0.0, help="AdamW weight decay"),
    opt("--grad-clip", TRAINED, type=float, default=1.0, help="max gradient norm (0: no clipping)"),
    opt("--seed", TRAINED, type=int, default=0, help="seed for model init, LoRA init and data order"),
    opt("--resume", OPERATIONAL, default="auto", help="auto (newest valid checkpoint in --output-dir), none, or a checkpoint folder"),
    opt("--lora-rank", SHAPE, type=int, default=16, help="LoRA rank r"),
    opt("--lora-alpha", TRAINED, type=float, default=32.0, help="LoRA alpha (scale = alpha / r)"),
    opt("--lora-dropout", TRAINED, type=float, default=0.0, help="dropout on the adapter's input"),
    opt("--lora-targets", SHAPE, default=",".join(DEFAULT_TARGETS),
          help="comma-separated module-name patterns (PEFT suffix rule)"),
    opt("--rslora", TRAINED, action="store_true", help="scale = alpha / sqrt(r)"),
    opt("--text-weight", TRAINED, type=float, default=1.0, help="weight of the text loss"),
    opt("--audio-weight", TRAINED, type=float, default=1.0, help="weight of the audio loss"),
    opt("--audio-reduction", TRAINED, default="codebook_mean", choices=["codebook_mean", "token_mean"],
          help="mean of per-codebook means, or mean over all audio tokens"),
    opt("--text-loss-chunk", OPERATIONAL, type=int, default=128, help="text rows per head+CE chunk (bounds memory)"),
    opt("--max-length", TRAINED, type=int, default=2048, help="longer samples are skipped (counted)"),
    opt("--group-by-length", TRAINED, action="store_true", help="batch samples of similar length (less padding)"),
    opt("--skip-bad-samples", TRAINED, action="store_true", help="leave bad JSONL lines out (listed in OUTPUT/rejected.jsonl) "
                                                          "instead of failing"),
    opt("--max-bad-fraction", OPERATIONAL, type=float, default=0.01, help="with --skip-bad-samples: fail when more than this "
                                                               "share of the lines is bad"),
    opt("--audio-root", TRAINED, type=Path, help="folder the codes paths are relative to (default: the JSONL's folder)"),
    opt("--train-audio-embedding", SHAPE, action="store_true",
        help="v3: also train the fused audio matrix (the audio embedding AND the tied audio head: one fp32 "
             "tensor, saved beside the adapter)"),
    opt("--data-workers", OPERATIONAL, type=int, help="DataLoader worker processes building batches (default: 0 on CPU, 2 on CUDA)"),
    opt("--no-verify-data", OPERATIONAL, action="store_true", help="skip the sha256 check of a packed corpus's shards (each before its first sample)"),
    opt("--eval-data", OPERATIONAL, type=Path, help="held-out conversations (JSONL), scored at --eval-every and at the end"),
    opt("--eval-split", TRAINED, type=float, default=0.0,
          help="without --eval-data: hold out this share of --data for evaluation (e.g. 0.1; 0: no eval); "
               "the held-out lines are listed in OUTPUT_DIR/eval_split.txt"),
    opt("--eval-every", OPERATIONAL, type=int, default=0, help="evaluate before the first step, every N steps (0: at every save) and at the end"),
    opt("--eval-samples", OPERATIONAL, type=int,
          help=f"held-out prompts generated at each evaluation, written to OUTPUT/samples/step-N/ and "
               f"OUTPUT/report.html (default: {DEFAULT_SAMPLES} when there is eval data; 0: none)"),
    opt("--audio-tokenizer", OPERATIONAL, type=Path, help="decode the samples with the released Higgs audio "
                                                         "tokenizer in DIR, or the codec a v3 model folder bundles "
                                                         "(as generate; default: a v3 --base-weights folder's)"),
    opt("--codec-weights", OPERATIONAL, type=Path, help="decode the samples with DAC weights (.pth) (as generate)"),
    opt("--random-codec-seed", OPERATIONAL, type=int, help="decode the samples with the demo's seeded random DAC "
                                                          "(the demo set was encoded with seed 0)"),
    opt("--eval-asr", OPERATIONAL, type=Path, help="a local transformers Whisper folder: WER and CER of each sample "
                                                  "(needs transformers and a decoder)"),
    opt("--eval-speaker", OPERATIONAL, type=Path, help="a local transformers WavLM x-vector folder: speaker "
                                                      "similarity of each sample to its reference"),
    # OPERATIONAL: it chooses which checkpoint `best` names, not what is trained. Changed on resume, the next
    # checkpoint is compared with the current best by the new figure (a best without it is replaced).
    opt("--best-by", OPERATIONAL, default="eval_loss", choices=["eval_loss", "wer", "speaker_similarity"],
          help="what `best` follows: the lowest eval loss, the lowest sample WER (--eval-asr) or the highest "
               "speaker similarity (--eval-speaker)"),
    opt("--log-every", OPERATIONAL, type=int, default=25, help="log metrics every N steps"),
    opt("--log-samples", OPERATIONAL, type=int, default=3, help="log the label statistics of the first N samples"),
    opt("--device", OPERATIONAL, default="auto", choices=["auto", "cpu", "cuda"], help="where to train"),
    opt("--dist-timeout", OPERATIONAL, type=float, default=600.0, help="seconds a collective may wait before failing"),
    opt("--keep-last", OPERATIONAL, type=int, default=0, help="keep only the newest N valid checkpoints (0: all)"),
    opt("--backup-dir", OPERATIONAL, type=Path, help="second output folder to try when a save fails"),
    opt("--on-save-error", OPERATIONAL, default="raise", choices=["raise", "continue"], help="what a failed save does"),
    opt("--strict-space", OPERATIONAL, action="store_true", help="fail in preflight when free space looks too small"),
    opt("--tensorboard", OPERATIONAL, action="store_true", help="also write TensorBoard event files"),
    opt("--allow-changed-settings", OPERATIONAL, action="store_true",
          help="resume even though settings that change what is trained differ from the run's record (recorded)"),
    opt("--debug", OPERATIONAL, action="store_true", help="show the traceback of a reported error"),
    opt("--activation-checkpointing", OPERATIONAL, action="store_true",
          help="recompute each decoder layer in backward: less activation memory, about one more forward of time"),
)
# dest ("max_steps") -> resume class
RESUME_CLASS = {flag[2:].replace("-", "_"): resume for flag, resume, _ in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m higgs_min.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="LoRA fine-tuning of a Higgs Audio model: one process, or many under torchrun.")
    for flag, _, kwargs in OPTIONS:
        ap.add_argument(flag, **kwargs)
    return ap


# Never part of --config input: where the file came from, and per-invocation switches.
NOT_CONFIG = ("config", "allow_changed_settings", "debug")


def as_config(raw: dict) -> dict:
    """Option values from a --config file: a flat {option: value} or a run_config.json."""
    values = raw["train"] if isinstance(raw.get("train"), dict) and "model" in raw else raw
    return {k: v for k, v in values.items() if k not in NOT_CONFIG}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line over --config's values over the table's defaults."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.config:
        try:
            values = as_config(json.loads(args.config.read_text()))
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
        args.tokenizer = DATA / ("tokenizer_v3.json" if args.preset in V3_PRESETS else "tokenizer.json")
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
    check_listening(args)


def check_listening(args) -> None:
    """--eval-samples and what depends on it; resolves its default (DEFAULT_SAMPLES with eval data, else 0)."""
    has_eval = args.eval_data is not None or bool(args.eval_split)
    if args.eval_samples is None:
        args.eval_samples = DEFAULT_SAMPLES if has_eval else 0
    elif args.eval_samples < 0:
        raise UsageError(f"--eval-samples must be 0 or more, got {args.eval_samples}")
    elif args.eval_samples > 0 and not has_eval:
        raise UsageError(f"--eval-samples {args.eval_samples}: the samples are held-out prompts; "
                         f"pass --eval-data FILE or --eval-split 0.1")
    decoders = [f for f in ("audio_tokenizer", "codec_weights", "random_codec_seed") if getattr(args, f) is not None]
    if len(decoders) > 1:
        raise UsageError("choose one decoder: " + " or ".join(f"--{f.replace('_', '-')}" for f in decoders))
    if args.eval_samples and not decoders and bundled_codec(args.base_weights) is not None:
        # a released v3 folder bundles its codec: the decoder generate defaults to (recorded as --audio-tokenizer)
        args.audio_tokenizer, decoders = bundled_codec(args.base_weights), ["audio_tokenizer"]
    for flag, value in (("--eval-asr", args.eval_asr), ("--eval-speaker", args.eval_speaker)):
        if value is not None and not (args.eval_samples and decoders):
            raise UsageError(f"{flag} scores generated audio: it needs --eval-samples > 0 and a decoder "
                             f"(--random-codec-seed, --codec-weights or --audio-tokenizer)")
    needs = {"wer": ("--eval-asr", args.eval_asr), "speaker_similarity": ("--eval-speaker", args.eval_speaker)}
    if args.best_by in needs and needs[args.best_by][1] is None:
        raise UsageError(f"--best-by {args.best_by} needs {needs[args.best_by][0]} DIR")
