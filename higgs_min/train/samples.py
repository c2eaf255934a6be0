"""Listen to every evaluation: fixed held-out prompts generated with the adapter being trained.

    Listener(args, model, encoder, eval_set, device, family)(eval_row, tb) -> figures merged into the checkpoint's
                                                                                 "eval" record (what --best-by reads)

The loop calls it on rank 0 after each evaluation row is logged (loop.Run.listen): the core loop knows a plain
callable, this folder knows generation, codecs and the report. What one call writes, each file atomically:

    RUN/samples/reference/<id>.{wav,npy,json}   the held-out clip itself (decoded from its codes), once
    RUN/samples/step-N/<id>.{wav,npy,json}      generated at step N; the folder appears whole (staged, renamed)
    RUN/metrics.jsonl                           one row {"split": "samples", "step": N, ...} (means over samples)
    RUN/loss.png, RUN/report.html               redrawn (train/plot.py, train/report.py)
    TensorBoard (--tensorboard)                 samples/<id> audio, samples/* scalars

What differs between the model families is a Family: how a held-out sample is cut into a prompt, and how codes
are generated from it (v2's ChatML here, V2; v3's TTS layout in train/samples_v3.py, V3; train/run.py picks by
the model's config). Everything else (writing, scoring, the summary, the report, TensorBoard) is shared.

The prompts: the first --eval-samples held-out samples that hold assistant audio, each cut just before its last
assistant audio segment, so the prompt ends with the token that starts the audio (v2 <|audio_out_bos|>, v3
<|audio|>) and is laid out exactly as training laid it out (v2: the run's prompt format, its system message,
any reference audio, and the text the audio should say; v3: the TTS prompt with its reference clip and text).
The reference clip is that segment's codes; its text is the text the clip says.
Generation: the family's sampler with the CLI's defaults (v2 generate.sampling.generate, v3 v3.sampler.generate_v3),
seeded per sample (--seed + sample number, so a sample changes between evaluations only because the adapter did),
limited to twice the reference's stream (its frames, the delay and v2's BOS/EOS); generation stops when the clip
ends by EOS (v2: no text after it; v3: the countdown after codebook 0's EOC), and a clip cut by the limit is
reported as such.
Training's RNG is untouched: the decoder is built under torch.random.fork_rng (the random DAC seeds torch), and
generation draws from its own generator, so a run trains the same with and without samples.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from higgs_min import atomic
from higgs_min.data import revert_delay_pattern
from higgs_min.generate.sampling import Prompt, generate
from higgs_min.loop import append_metrics
from higgs_min.train import audio_metrics

log = logging.getLogger("higgs_min.train")

FIGURES = ("duration_ratio", "eos_rate", "silence_fraction", "wer", "cer", "speaker_similarity")
FALLBACK_FPS = 25.0  # frames per second without a decoder: the demo DAC's and the released tokenizer's rate


# ----------------------------------------------------------------------------- the prompts

@dataclass
class Held:
    """One held-out prompt and what it should produce."""
    id: str  # eval-NNNN: the sample's index in the eval set
    number: int  # that index (seeds its generation)
    prompt: object  # the family's prompt: generate.sampling.Prompt (v2), v3.sampler.V3Prompt (v3)
    reference: torch.Tensor  # (K, T) codes of the held-out clip
    text: str  # what the clip says (v2: the assistant text before it; v3: the text after <|text|>)


@dataclass
class Generated:
    """What the listener needs of one generation, whatever the family."""
    codes: torch.Tensor  # (K, T) codes of the generated clip
    stopped: str  # "eos" (the clip ended) or "limit" (cut by max_new_tokens)
    steps: int


@dataclass
class Family:
    """The family-specific half of listening (the rest of this module is shared)."""
    name: str
    cut: Callable  # (sample, index, encoder) -> Held | None (None: no assistant audio)
    generate: Callable  # (model, prompt, limit, seed) -> Generated


def held_prompt(sample, index: int, encoder) -> Held | None:
    """A sample cut before its last assistant audio segment (None when it has none). The layout is chat.py's:
    ... text <|audio_out_bos|> [S audio-out positions] <|audio_eos|> ..."""
    out = sample.audio_out_mask
    if not bool(out.any()):
        return None
    last = int(torch.nonzero(out)[-1])
    start = last
    while start > 0 and bool(out[start - 1]):
        start -= 1
    stream = sample.audio_codes[start:last + 1].T  # (K, S): [BOS | codes | EOS], delayed when the run delays
    codes = (revert_delay_pattern(stream) if encoder.delay else stream)[:, 1:-1]
    ids = sample.input_ids
    sp = encoder.ids
    # the text the clip says: from the assistant header (or the previous segment) to <|audio_out_bos|>
    stops = torch.nonzero((ids[:start - 1] == sp["end_header"]) | (ids[:start - 1] == sp["audio_eos"]))
    first = int(stops[-1]) + 1 if len(stops) else 0
    text = encoder.tok.decode(ids[first:start - 1].tolist(), skip_special_tokens=True).strip()
    prompt = Prompt(ids[:start].clone(), sample.audio_codes[:start].clone(),
                    (sample.audio_in_mask | out)[:start].clone(), out[:start].clone(), dict(sp),
                    encoder.tok.get_vocab_size())
    return Held(f"eval-{index:04d}", index, prompt, codes.long().clone(), text)


def generate_v2(model, prompt: Prompt, limit: int, seed: int) -> Generated:
    """One segment of audio (max_segments=1): it stops at the clip's EOS, before any text after it."""
    g = generate(model, prompt, max_new_tokens=limit, seed=seed, max_segments=1)
    return Generated(g.codes, "eos" if g.stopped == "audio segments" else "limit", g.steps)


V2 = Family("v2", held_prompt, generate_v2)


def choose_prompts(eval_set, n: int, encoder, cut: Callable = held_prompt) -> list[Held]:
    """The first n held-out samples with assistant audio (a fixed choice: the eval set's order is), each cut by
    `cut` (the family's; v2's held_prompt by default)."""
    chosen = []
    for i in range(len(eval_set)):
        if len(chosen) == n:
            break
        h = cut(eval_set[i], i, encoder)
        if h is not None:
            chosen.append(h)
    return chosen


# ----------------------------------------------------------------------------- figures

def mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


# ----------------------------------------------------------------------------- the listener

class Listener:
    """Generates, writes and scores the held-out samples at each evaluation (rank 0 only)."""

    def __init__(self, args, model, encoder, eval_set, device, family: Family = V2):
        from higgs_min.generate.cli import Decoder

        self.args, self.model, self.encoder, self.family = args, model, encoder, family
        self.out = Path(args.output_dir)
        self.held = choose_prompts(eval_set, args.eval_samples, encoder, family.cut)
        if len(self.held) < args.eval_samples:
            log.warning("--eval-samples %d: only %d held-out samples hold assistant audio", args.eval_samples,
                        len(self.held))
        self.decoder = Decoder(argparse.Namespace(audio_tokenizer=args.audio_tokenizer, codec_weights=args.codec_weights,
                                                  random_codec_seed=args.random_codec_seed, device=str(device)))
        if self.decoder.kind is None:
            log.info("samples: codes only (no decoder; --random-codec-seed, --codec-weights or --audio-tokenizer "
                     "(a v3 model folder gives its bundled codec) to listen, and for the silence, ASR and speaker "
                     "figures)")
        # loaded now, so that a bad folder stops the run before step 1
        self.asr = audio_metrics.Asr(args.eval_asr, device) if args.eval_asr else None
        self.speaker = audio_metrics.Speaker(args.eval_speaker, device) if args.eval_speaker else None
        self._references = {}  # id -> (wave or None, embedding or None)
        self._tb_references = False

    def __call__(self, eval_row: dict, tb=None) -> dict:
        if not self.held:  # no held-out sample holds assistant audio (e.g. a text-only set): nothing to hear
            return {}
        step = eval_row["step"]
        t0 = time.perf_counter()
        (self.out / "samples").mkdir(exist_ok=True)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            self.write_references()
            waves = {}
            with atomic.staged_folder(self.out / "samples" / f"step-{step}", replace=True) as folder:
                rows = [self.one(h, step, folder, waves) for h in self.held]
        row = self.summary(step, rows, time.perf_counter() - t0)
        append_metrics(self.out / "metrics.jsonl", row)
        log.info("samples at step %d: %s (%.1f s; %s)", step, ", ".join(
            f"{k} {row[k]:.3f}" for k in FIGURES if row.get(k) is not None), row["generation_s"],
                 self.out / "report.html")
        if tb is not None:
            self.to_tensorboard(tb, step, row, waves)
        self.redraw()
        return {k: row[k] for k in FIGURES if row.get(k) is not None}

    # -- one sample
    def one(self, h: Held, step: int, folder: Path, waves: dict) -> dict:
        """Generate h, write <id>.npy (+ .wav) and <id>.json into `folder`, return its row."""
        from higgs_min.audio import codec

        T = h.reference.shape[1]
        limit = 2 * int(self.encoder.streams.length(T))  # twice the reference's stream (frames, delay, v2's BOS/EOS)
        t0 = time.perf_counter()
        g = self.family.generate(self.model, h.prompt, limit, self.args.seed + h.number)
        wall = time.perf_counter() - t0
        codes = g.codes.numpy().astype(np.int16)
        fps = self.decoder.fps if self.decoder.kind else FALLBACK_FPS
        row = {"id": h.id, "step": step, "text": h.text, "frames": int(codes.shape[1]), "reference_frames": T,
               "duration_s": round(codes.shape[1] / fps, 3), "duration_ratio": codes.shape[1] / max(T, 1),
               "stopped": g.stopped, "steps": g.steps,
               "limit": limit, "generation_s": round(wall, 3),
               "rtf": round(wall / (codes.shape[1] / fps), 3) if codes.shape[1] else None,
               "files": [f"{h.id}.npy", f"{h.id}.json"]}
        with atomic.replacing(folder / f"{h.id}.npy", "wb") as f:
            np.save(f, codes)
        if self.decoder.kind and codes.shape[1] > 0:
            waves[h.id] = wave = self.decoder.decode(codes).float().cpu()
            codec.write_wav(folder / f"{h.id}.wav", wave, self.decoder.rate)
            row["files"].insert(1, f"{h.id}.wav")
            row.update(self.score(h, wave))
        atomic.write_json(folder / f"{h.id}.json", row)
        return row

    def score(self, h: Held, wave: torch.Tensor) -> dict:
        """The waveform figures of one generated clip (silence; WER/CER and speaker similarity when asked)."""
        rate = self.decoder.rate
        row = {"silence_fraction": audio_metrics.silence_fraction(wave, rate)}
        if self.asr is not None:
            row["transcript"] = self.asr.transcribe(wave, rate)
            row.update(audio_metrics.error_counts(h.text, row["transcript"]))
            row["wer"] = audio_metrics.error_rate(row["word_edits"], row["words"])
            row["cer"] = audio_metrics.error_rate(row["char_edits"], row["chars"])
        if self.speaker is not None:
            row["speaker_similarity"] = self.speaker.similarity(self.speaker.embed(wave, rate),
                                                                self._references[h.id][1])
        return row

    def write_references(self) -> None:
        """samples/reference/ once per run, whole (a resumed run finds it); each reference's wave and embedding
        kept in memory for the figures."""
        from higgs_min.audio import codec

        if len(self._references) == len(self.held):
            return
        final = self.out / "samples" / "reference"
        final.parent.mkdir(parents=True, exist_ok=True)
        for h in self.held:
            codes = h.reference.numpy().astype(np.int16)
            wave = self.decoder.decode(codes).float().cpu() if self.decoder.kind and codes.shape[1] else None
            embedding = self.speaker.embed(wave, self.decoder.rate) if self.speaker and wave is not None else None
            self._references[h.id] = (wave, embedding)
        with atomic.staged_folder(final, replace=True) as folder:
            for h in self.held:
                codes, wave = h.reference.numpy().astype(np.int16), self._references[h.id][0]
                row = {"id": h.id, "text": h.text, "frames": int(codes.shape[1]),
                       "files": [f"{h.id}.npy", f"{h.id}.json"]}
                with atomic.replacing(folder / f"{h.id}.npy", "wb") as f:
                    np.save(f, codes)
                if wave is not None:
                    codec.write_wav(folder / f"{h.id}.wav", wave, self.decoder.rate)
                    row["files"].insert(1, f"{h.id}.wav")
                    row["duration_s"] = round(codes.shape[1] / self.decoder.fps, 3)
                    row["silence_fraction"] = audio_metrics.silence_fraction(wave, self.decoder.rate)
                atomic.write_json(folder / f"{h.id}.json", row)

    # -- the evaluation's figures
    def summary(self, step: int, rows: list[dict], seconds: float) -> dict:
        """The metrics.jsonl row: means over samples; WER/CER as Σ edits / Σ reference length."""
        row = {"split": "samples", "step": step, "samples": len(rows), "generation_s": round(seconds, 3),
               "duration_ratio": mean(r["duration_ratio"] for r in rows),
               "eos_rate": mean(float(r["stopped"] == "eos") for r in rows),
               "silence_fraction": mean(r.get("silence_fraction") for r in rows),
               "speaker_similarity": mean(r.get("speaker_similarity") for r in rows),
               "rtf": mean(r["rtf"] for r in rows)}
        if self.asr is not None:
            row["wer"] = audio_metrics.error_rate(sum(r.get("word_edits", 0) for r in rows),
                                                  sum(r.get("words", 0) for r in rows))
            row["cer"] = audio_metrics.error_rate(sum(r.get("char_edits", 0) for r in rows),
                                                  sum(r.get("chars", 0) for r in rows))
        row["per_sample"] = [{k: r.get(k) for k in ("id", "frames", "duration_ratio", "stopped", "silence_fraction",
                                                    "wer", "cer", "speaker_similarity", "transcript")} for r in rows]
        return row

    def to_tensorboard(self, tb, step: int, row: dict, waves: dict) -> None:
        for k in FIGURES:
            if row.get(k) is not None and math.isfinite(row[k]):
                tb.add_scalar(f"samples/{k}", row[k], step)
        for h in self.held:
            if h.id in waves:
                tb.add_audio(f"samples/{h.id}", waves[h.id][None].clamp(-1, 1), step, sample_rate=self.decoder.rate)
            reference = self._references[h.id][0]
            if reference is not None and not self._tb_references:  # once per process, at its first evaluation
                tb.add_audio(f"samples/{h.id}/reference", reference[None].clamp(-1, 1), step,
                             sample_rate=self.decoder.rate)
        self._tb_references = True

    def redraw(self) -> None:
        """loss.png and report.html from everything written so far (a drawing failure only warns)."""
        from higgs_min.train import plot, report

        try:
            plot.plot(self.out)
        except (ImportError, OSError, ValueError, KeyError, SystemExit) as e:
            log.warning("could not draw loss.png: %s", e)
        report.write(self.out)
