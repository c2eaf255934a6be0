"""`python -m higgs_min.generate`: a trained adapter (or a base) -> generated codes -> a wav.

    python -m higgs_min.generate --adapter output/checkpoint-300 --random-codec-seed 0 \\
        --system "You are a helpful voice assistant. Answer in the language of the question." \\
        --text "What is the capital of France?" --out out.wav --codes-out out.npy

The model: `--adapter` alone rebuilds the base as the run's trainer built it (the preset and seed recorded in
the checkpoint, runs.load_trained); with `--base-weights DIR` the base is loaded from released-format
weights (and the adapter, if given, applied with the project's LoRA code, merged unless --no-merge).
Decoding: `--audio-tokenizer DIR` (the released Higgs audio tokenizer, higgs_min.audio.tokenizer), or DAC
(`--codec-weights dac.pth`, or the demo's seeded random DAC `--random-codec-seed N`); with none of them
only `--codes-out` is written. Sampling defaults are those of the official examples/generation.py
(README: "Generation"). Voice cloning (--reference-codes + --reference-text, or --reference-audio encoded
with the chosen codec) adds a user turn with the transcript and an assistant turn holding the reference audio
before your text, as the official examples/generation.py does. A progress bar counts steps (on a terminal);
the end prints the text, frames, seconds of audio, frames/s and the real-time factor.

Higgs Audio v3 (`--base-weights` a v3 folder, or `--adapter` of a run trained on a v3 preset or folder): the
same command, dispatched on the loaded model's config to generate/v3.py (TTS prompt, serving's sampler).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from higgs_min import atomic
from higgs_min.chat import ChatEncoder
from higgs_min.schema import DataError
from higgs_min.prepare.codes_file import load_codes
from higgs_min.errors import Parser, UsageError, guard
from higgs_min.generate import v3 as v3_cli
from higgs_min.generate.sampling import GenerationError, build_messages, generate, make_prompt

PROG = "python -m higgs_min.generate"

log = logging.getLogger("higgs_min.generate")


# The official examples/generation.py sampling defaults (v2); v3's are in generate/v3.py.
V2_SAMPLING = {"temperature": 0.3, "top_k": 50, "top_p": 0.95, "ras_win_len": 7, "ras_max_repeat": 2}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--adapter", type=Path, help="a checkpoint folder (adapter_config.json + adapter_model.safetensors), "
                                   "OUT/best or OUT/latest, or a training output folder (its newest valid checkpoint)")
    a("--base-weights", type=Path, help="released-format base folder (config.json + safetensors); "
                                        "without it the base is rebuilt from the run's preset and seed")
    a("--no-merge", action="store_true", help="keep LoRA layers instead of merging them into the weights")
    a("--tokenizer", type=Path, help="tokenizer.json (default: the run's, else BASE/tokenizer.json)")
    a("--text", required=True, help="the user's text (what to say)")
    a("--system", help="system message; \"\" for none (default: the one the run trained on, else "
                       "'Generate audio following instruction.' + scene)")
    a("--scene", help="scene description for the default system message")
    a("--reference-codes", type=Path, help="voice cloning: reference codes (K, T) .npy/.safetensors")
    a("--reference-audio", type=Path, help="voice cloning: reference 16-bit wav, encoded with the chosen codec")
    a("--reference-text", help="voice cloning: the reference's transcript")
    a("--force-audio", action="store_true", help="end the prompt with <|audio_out_bos|>: audio comes first")
    a("--audio-tokenizer", type=Path,
      help="decode with the released Higgs audio tokenizer in DIR (any layout, or a v3 model folder)")
    a("--codec-weights", type=Path, help="decode with DAC weights (.pth)")
    a("--random-codec-seed", type=int, help="decode with the seeded random DAC of the demo set (not for listening)")
    a("--out", type=Path, help="output wav (needs a decoder)")
    a("--codes-out", type=Path, help="also write the generated codes (K, T) as int16 .npy")
    a("--max-new-tokens", type=int, default=2048, help="steps (text tokens + audio columns; v3: audio rows) at most")
    # Sampling defaults differ by family (filled in by run): v2 the official examples', v3 serving's for speech.
    a("--temperature", type=float, help="0 = greedy (default: 0.3; v3: 0.8)")
    a("--top-k", type=int, help="0 = off (default: 50; v3: 30)")
    a("--top-p", type=float, help="1 = off (default: 0.95; v3: 0.8)")
    a("--ras-win-len", type=int, help="v2: repetition-aware sampling window; 0 = off (default: 7)")
    a("--ras-max-repeat", type=int, help="v2: resample a codebook repeating this often in the window (default: 2)")
    a("--seed", type=int, help="sampling seed (a run repeats exactly on CPU)")
    a("--device", default="cpu")
    a("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, bfloat16 on CUDA")
    return p


def load_model(adapter: Path | None, base_weights: Path | None, device: torch.device, dtype: torch.dtype,
               merge: bool):
    """-> (model in eval mode, the run's tokenizer or None). runs.load_trained: the base rebuilt from the
    recorded preset and seed exactly as the trainer built it (or loaded), the adapter loaded strictly."""
    from higgs_min import lora
    from higgs_min.train import runs

    if adapter is None:
        model, _, _ = runs.build_base("", base_weights, 0, dtype)
        tokenizer = base_weights / "tokenizer.json"
        return model.to(device).eval(), tokenizer if tokenizer.exists() else None
    t = runs.load_trained(adapter, base_weights, device, dtype)
    model = t.model
    if merge:
        lora.merge_lora(model)
        for m in lora.lora_layers(model).values():
            m._undo = None  # generation never unmerges: do not hold the merge's undo record
    return model.to(device=device, dtype=dtype).eval(), t.tokenizer


class Decoder:
    """Codes (K, T) -> waveform; also encodes a reference wav. DAC or the Higgs audio tokenizer, loaded on
    first use (importing dac takes seconds: not before the model has generated)."""

    def __init__(self, args):
        self.args, self._model = args, None
        self.kind = ("higgs" if args.audio_tokenizer is not None else
                     "dac" if args.codec_weights is not None or args.random_codec_seed is not None else None)
        for flag, path in (("--audio-tokenizer", args.audio_tokenizer), ("--codec-weights", args.codec_weights)):
            if path is not None and not Path(path).exists():
                raise UsageError(f"{flag} {path}: not found (nothing is downloaded)")

    @property
    def model(self):
        if self._model is None:
            if self.kind == "higgs":
                try:
                    from higgs_min.audio import tokenizer as audio_tokenizer
                except ImportError as e:
                    raise UsageError("--audio-tokenizer: higgs_min.audio.tokenizer is not in this checkout; "
                                     "use --codec-weights or --random-codec-seed") from e
                self._model = audio_tokenizer.load(self.args.audio_tokenizer, device=self.args.device)
            else:
                from higgs_min.audio import codec
                self._model = codec.load_codec(self.args.codec_weights, self.args.random_codec_seed)
        return self._model

    @property
    def rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def fps(self) -> float:
        """Frames per second of the codes."""
        if self.kind == "dac":
            return self.model.sample_rate / self.model.hop_length
        return float(self.model.frame_rate)

    def decode(self, codes: np.ndarray) -> torch.Tensor:
        if self.kind == "dac":
            from higgs_min.audio import codec
            return codec.decode(self.model, codes)
        return self.model.decode(codes.astype(np.int64))  # (hop * T,) float

    def encode(self, path: Path) -> np.ndarray:
        from higgs_min.audio import codec
        if self.kind == "dac":
            wave, rate = codec.read_wav(path)
            return codec.encode(self.model, wave, rate)
        return self.model.encode_file(path).numpy()


def check_args(args) -> None:
    """The option combinations refused before anything is loaded (one UsageError each)."""
    if args.adapter is None and args.base_weights is None:
        raise UsageError("pass --adapter CKPT (a run trained on a preset) and/or --base-weights DIR")
    if args.reference_codes is not None and args.reference_audio is not None:
        raise UsageError("pass --reference-codes or --reference-audio, not both")
    if args.reference_codes is None and args.reference_audio is None and args.reference_text is not None:
        raise UsageError("voice cloning needs --reference-text together with --reference-codes/--reference-audio")
    for flag, path in (("--reference-audio", args.reference_audio), ("--reference-codes", args.reference_codes)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")


def check_outputs(args, decoder: Decoder) -> None:
    """Something to write, and a decoder for --out."""
    if decoder.kind is None and args.out is not None:
        raise UsageError(f"--out {args.out}: no decoder; pass --audio-tokenizer, --codec-weights or "
                         f"--random-codec-seed, or drop --out and keep --codes-out")
    if args.out is None and args.codes_out is None:
        raise UsageError("nothing to write: pass --out out.wav and/or --codes-out out.npy")


def reference_codes(args, cfg, decoder: Decoder) -> torch.Tensor | None:
    """Voice cloning's reference (K, T): --reference-codes as stored, or --reference-audio encoded by the codec."""
    if args.reference_codes is not None:
        return load_codes(args.reference_codes, "--reference-codes", cfg.audio_num_codebooks, cfg.audio_codebook_size)
    if args.reference_audio is not None:
        if decoder.kind is None:
            raise UsageError("--reference-audio needs a codec to encode it (--codec-weights, --random-codec-seed "
                             "or --audio-tokenizer); or pass --reference-codes")
        return torch.from_numpy(decoder.encode(args.reference_audio).astype(np.int64))
    return None


def progress(total: int):
    """-> (a tqdm bar counting steps on stderr, on a terminal or with HIGGS_MIN_PROGRESS=1; on_step(step, frames))."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", desc="generate", file=sys.stderr,
               disable=not sys.stderr.isatty() and os.environ.get("HIGGS_MIN_PROGRESS") != "1")
    done = [0]

    def on_step(step, frames):
        bar.update(step - done[0])
        done[0] = step
        bar.set_postfix(frames=frames, refresh=False)

    return bar, on_step


def write_outputs(args, codes: np.ndarray, summary: dict, decoder: Decoder, v3: bool) -> None:
    """--codes-out (int16 .npy, written atomically) and --out (the decoded wav; no frames is a GenerationError)."""
    if args.codes_out is not None:
        args.codes_out.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(args.codes_out, "wb") as f:
            np.save(f, codes)
    if args.out is not None:
        if codes.shape[1] == 0:
            hint = "more --max-new-tokens" if v3 else "--force-audio or more --max-new-tokens"
            raise GenerationError(f"no audio frames generated ({summary['steps']} steps, stopped by "
                                  f"{summary['stopped']}; text: {summary['text']!r}); try {hint}")
        from higgs_min.audio import codec
        wave = decoder.decode(codes).float().cpu()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        codec.write_wav(args.out, wave, decoder.rate)


def run(args) -> dict:
    """Load the model, generate (v2 or v3, by the model's config), write the outputs; -> the summary printed."""
    from higgs_min.train import runs

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check_args(args)
    v3_cli.default_decoder(args)
    decoder = Decoder(args)
    check_outputs(args, decoder)
    adapter = runs.find_adapter(args.adapter) if args.adapter is not None else None
    model, run_tokenizer = load_model(adapter, args.base_weights, device, dtype, merge=not args.no_merge)
    # the prompt the run trained on: its checkpoint's record, or an exported folder's prompt.json
    args.trained_prompt = runs.read_prompt(adapter if adapter is not None else args.base_weights)
    cfg = model.config
    tok = args.tokenizer or run_tokenizer
    if tok is None:
        raise UsageError("no tokenizer: the run's recorded one is gone and the base folder has none; "
                         "pass --tokenizer tokenizer.json")
    v3 = getattr(cfg, "family", "v2") == "v3"
    if v3:
        v3_cli.resolve_options(args)
    else:
        for name, value in V2_SAMPLING.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    ref = reference_codes(args, cfg, decoder)

    bar, on_step = progress(args.max_new_tokens)
    t0 = time.perf_counter()
    if v3:
        codes, info = v3_cli.generate_codes(args, model, Path(tok), ref, on_step)
    else:
        codes, info = generate_v2(args, model, tok, ref, on_step)
    wall = time.perf_counter() - t0
    bar.close()
    codes = codes.numpy().astype(np.int16)
    # 25 frames/s: the released audio tokenizer's and the demo DAC's rate, when no decoder says otherwise.
    fps = decoder.fps if decoder.kind else 25.0
    seconds = codes.shape[1] / fps
    summary = {"codebooks": int(codes.shape[0]), "frames": int(codes.shape[1]), **info,
               "audio_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
               "frames_per_second": round(codes.shape[1] / wall, 2) if wall > 0 else None,
               "rtf": round(wall / seconds, 3) if seconds > 0 else None}
    write_outputs(args, codes, summary, decoder, v3)
    return summary


def chosen_system(args, recorded: dict | None) -> str | None:
    """--system wins ("" = no system turn); else --scene (the official default system message with it); else
    the system turn the run trained on ("" when it had none); else None: the official default."""
    if args.system is not None or args.scene or recorded is None:
        return args.system
    return recorded["system"] or ""


def _turn(system: str | None) -> str:
    return "no system turn" if system is None else f"system turn {system!r}"


def generate_v2(args, model, tokenizer, ref, on_step) -> tuple[torch.Tensor, dict]:
    """The v2 chat prompt and sampler -> (codes (K, T), the summary's generation fields)."""
    cfg = model.config
    if ref is not None and args.reference_text is None:
        raise UsageError("voice cloning needs --reference-text together with --reference-codes/--reference-audio")
    enc = ChatEncoder(tokenizer, cfg.audio_num_codebooks, cfg.audio_codebook_size, cfg.vocab_size)
    ref_item = {"type": "audio", "codes": ref} if ref is not None else None
    recorded = getattr(args, "trained_prompt", None)
    messages = build_messages(args.text, chosen_system(args, recorded), args.scene, args.reference_text, ref_item)
    used = messages[0]["content"] if messages[0]["role"] == "system" else None
    if recorded is not None and used != recorded["system"]:
        log.warning("prompt differs from training: %s, the run trained on %s (drop --system/--scene to use the run's)",
                    _turn(used), _turn(recorded["system"]))
    else:
        log.info("prompt: %s%s", _turn(used), " (as the run trained)" if recorded is not None else "")
    prompt = make_prompt(enc, messages, force_audio=args.force_audio)
    g = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, top_p=args.top_p, ras_win_len=args.ras_win_len,
                 ras_max_repeat=args.ras_max_repeat, seed=args.seed, on_step=on_step)
    return g.codes, {"steps": g.steps, "stopped": g.stopped, "segments": len(g.audio),
                     "text": enc.decode(g.text_ids)}


def _main(argv) -> int:
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = run(args)
    if "rows" in s:  # v3: audio only
        print(f"{s['steps']} steps ({s['stopped']}), {s['rows']} delayed rows, {s['frames']} frames = "
              f"{s['audio_seconds']} s of audio in {s['wall_seconds']} s: {s['frames_per_second']} frames/s, "
              f"real-time factor {s['rtf']}")
    else:
        print(f"text: {s['text']!r}")
        print(f"{s['steps']} steps ({s['stopped']}), {s['segments']} audio segment(s), {s['frames']} frames = "
              f"{s['audio_seconds']} s of audio in {s['wall_seconds']} s: {s['frames_per_second']} frames/s, "
              f"real-time factor {s['rtf']}")
    if args.codes_out is not None:
        print(f"codes: {args.codes_out} (int16, shape [{s['codebooks']}, {s['frames']}])")
    if args.out is not None:
        print(f"audio: {args.out}")
    else:
        print("no decoder given: codes only (decode later with --codec-weights / --audio-tokenizer)")
    return 0


def main(argv=None) -> int:
    """Usage mistakes exit 2, a run that cannot go on exits 1, each as one line (errors.guard); --debug
    keeps the traceback."""
    from higgs_min.checkpoint import CheckpointError

    return guard(_main, argv, PROG, runtime=(ValueError, FileNotFoundError, KeyError, DataError, GenerationError,
                                            CheckpointError))
