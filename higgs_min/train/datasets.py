"""The run's data: the training set and the held-out set, opened and checked before the model is built.

    open_data(args, dist_info, cfg) -> (encoder, dataset)      --data: a JSONL file or a packed corpus folder
    open_eval(args, encoder, dataset) -> (train set, eval set or None)   --eval-data, or --eval-split of --data
    holdout(n, fraction, seed) -> (train indices, eval indices)          deterministic given n, fraction, seed
    write_heldout(OUT, eval set)                                         OUT/eval_split.txt: source:line per sample
    prompt_format(dataset, encoder) -> {"system", ...}                   the system turn the data trains on
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from higgs_min import atomic
from higgs_min.batches import lengths_of
from higgs_min.chat import ChatEncoder
from higgs_min.errors import UsageError
from higgs_min.prepare.corpus import open_dataset
from higgs_min.v3.layout import V3Encoder

log = logging.getLogger("higgs_min.train")


def encoder_for(cfg, tokenizer):
    """The model family's encoder: v3 (a V3Config) lays conversations out as its TTS prompt (v3/layout.py), v2 as
    ChatML (chat.ChatEncoder)."""
    if getattr(cfg, "family", "v2") == "v3":
        return V3Encoder(tokenizer, cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
    return ChatEncoder(tokenizer, cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size,
                       delay=cfg.use_delay_pattern)


def open_data(args, dist_info, cfg):
    """Tokenizer + training data, every line checked before the model is built (cfg: a v2 ModelConfig or a
    V3Config: the encoder of its family lays the conversations out). A packed corpus is opened
    from its manifest, sizes and headers; each shard is hashed against the manifest before the first of its
    samples is used, on every rank that uses it (unless --no-verify-data), so start-up does not grow with it."""
    encoder = encoder_for(cfg, args.tokenizer)
    dataset = open_dataset(args.data, encoder, args.max_length, args.skip_bad_samples, audio_root=args.audio_root,
                           max_bad_fraction=args.max_bad_fraction, verify=not args.no_verify_data,
                           report_path=Path(args.output_dir) / "rejected.jsonl" if dist_info.is_main else None)
    if Path(args.data).is_dir():
        log.info("%s: each shard is verified (sha256) before its first sample is used%s", args.data,
                 " (--no-verify-data: not checked)" if args.no_verify_data else "")
    log.info("data: %s", dataset.report)
    if dist_info.is_main:
        for i in range(min(args.log_samples, len(dataset))):
            log.info("%s", dataset[i].stats())
    return encoder, dataset


def holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic share of n samples held out for evaluation: (train, eval), both sorted."""
    if not 0 < fraction < 1:
        raise UsageError(f"--eval-split {fraction}: expected a fraction between 0 and 1, e.g. 0.1")
    k = max(1, round(n * fraction))
    if k >= n:
        raise UsageError(f"--eval-split {fraction} of {n} samples leaves none to train on")
    held = sorted(random.Random(f"higgs_min eval split {seed}").sample(range(n), k))
    keep = set(held)
    return [i for i in range(n) if i not in keep], held


PROMPT_SAMPLES = 64  # conversations read to learn the prompt format (evenly spaced over the data)


def prompt_format(dataset, encoder: ChatEncoder) -> dict:
    """The prompt the run trains on, recorded in every checkpoint so that generate uses the same by default:
    {"system": the system turn's text, or None when the conversations start with the user, "samples": read,
    "distinct": how many different ones were seen}. The most common one wins; read back from each plan's
    tokens (`<|begin_of_text|>` + the system header + text + `<|eot_id|>`, ChatEncoder.plan), so a packed
    corpus answers as well as a JSONL file. A v3 run's TTS prompt has no system turn: {"system": None}."""
    if not isinstance(encoder, ChatEncoder):
        return {"system": None, "samples": 0, "distinct": 0}
    head, eot = encoder.header("system"), encoder.ids["eot"]
    n = len(dataset)
    k = min(n, PROMPT_SAMPLES)
    picks = [i * n // k for i in range(k)]  # all of a small set; else evenly spaced, distinct (n > k)
    seen = {}
    for i in picks:
        tokens = [int(t) for t in dataset.plan(i, check=False).tokens]  # a record, never trained on: no hashing
        system = None
        if tokens[1:1 + len(head)] == head and eot in tokens[1 + len(head):]:
            body = tokens[1 + len(head):]
            system = encoder.decode(body[:body.index(eot)])
        seen[system] = seen.get(system, 0) + 1
    best = max(seen, key=seen.get) if seen else None
    return {"system": best, "samples": len(picks), "distinct": len(seen)}


HELDOUT = "eval_split.txt"


def write_heldout(output_dir: Path, held: "Subset", fraction: float, seed: int) -> Path:
    """OUT/eval_split.txt: which lines --eval-split held out, one `source:line` per sample, in eval order
    (the order the evaluator scores them). Rewritten identically on resume (the split is deterministic)."""
    lines = [held.dataset.where(i) for i in held.indices]
    text = (f"# --eval-split {fraction:g} (seed {seed}): {len(lines)} of {len(held.dataset)} samples held out "
            f"for evaluation, as source:line\n" + "".join(f"{w}\n" for w in lines))
    path = Path(output_dir) / HELDOUT
    atomic.write_text(path, text)
    return path


class Subset:
    """Some samples of a dataset (a list, or corpus.open_dataset's), with the same interface."""

    def __init__(self, dataset, indices: list[int], what: str):
        self.dataset, self.indices = dataset, list(indices)
        self.lengths = np.asarray(lengths_of(dataset))[self.indices]
        self.report = f"{getattr(dataset, 'report', f'{len(dataset)} samples')}; {len(self.indices)} {what}"

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def check_samples(self, indices) -> None:  # see corpus.PackedDataset.check_samples
        check = getattr(self.dataset, "check_samples", None)
        if check is not None:
            check([self.indices[i] for i in indices])


def open_eval(args, encoder, dataset):
    """(training dataset, eval dataset or None) from --eval-data (JSONL or packed corpus) or --eval-split."""
    if args.eval_data is not None and args.eval_split:
        raise UsageError("--eval-data and --eval-split both given; choose one")
    if args.eval_data is not None:
        if not args.eval_data.exists():
            raise UsageError(f"--eval-data {args.eval_data}: no such file or folder")
        held = open_dataset(args.eval_data, encoder, args.max_length, args.skip_bad_samples,
                            verify=not args.no_verify_data)
        log.info("eval data: %s", held.report)
        return dataset, held
    if args.eval_split:
        train_idx, eval_idx = holdout(len(dataset), args.eval_split, args.seed)
        log.info("--eval-split %g: %d samples held out for evaluation, %d to train on",
                 args.eval_split, len(eval_idx), len(train_idx))
        return Subset(dataset, train_idx, "to train on"), Subset(dataset, eval_idx, "held out for eval")
    return dataset, None
