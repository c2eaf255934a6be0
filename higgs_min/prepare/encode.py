"""Encode the wav items of a JSONL data set into audio codes, or decode codes to a wav.

    python -m higgs_min.prepare --data in.jsonl --out out.jsonl --audio-tokenizer higgs-audio-v2-tokenizer/
    python -m higgs_min.prepare --data in.jsonl --out out.jsonl --codec-weights dac.pth
    python -m higgs_min.prepare --decode codes.npy --audio-tokenizer DIR --out x.wav   (or --codec-weights)
    python -m higgs_min.prepare SUBCOMMAND ...   (see SUBCOMMANDS below; each has --help)

Each `{"type": "audio", "audio": "a.wav"}` item becomes
`{"type": "audio", "codes": "codes/<hash>.npy", "source_audio": "a.wav", "codec": ID}`, the codes
(8, T) int16 saved beside out.jsonl; ID names the tokenizer ("higgs-audio-v2-tokenizer:<sha16 of its
weights>", "dac:<sha16 of the weights file>" or "dac-random-seed:N"). The Higgs Audio v2 tokenizer
(--audio-tokenizer) gives the codes the released model was trained on; DAC stays for the demo and for
training from scratch. Files are named by a hash of the wav bytes and the codec, so a second run
encodes nothing. A clip longer than --max-seconds is refused by name. Nothing is downloaded: without
a tokenizer or codec the command refuses, unless --random-codec-seed asks for a seeded random codec
(demos and tests only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from higgs_min import atomic
from higgs_min.manifest import sha256_file
from higgs_min.errors import Parser, RunError, UsageError, guard
from higgs_min.prepare.audio_check import check_clip, transcript_of

log = logging.getLogger("higgs_min.prepare")


class _ClipError(Exception):
    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index, self.message = index, message


class _Codec:
    """The audio -> codes step behind `prepare`: a DAC (codec.py) or the Higgs Audio v2 tokenizer
    (audio_tokenizer.py). `identity` names it in each prepared item's "codec" field and in the cache key."""

    def __init__(self, codec_weights=None, random_seed=None, audio_tokenizer=None, device="cpu", dtype="float32"):
        self.model = None
        self.args = (codec_weights, random_seed)
        if audio_tokenizer is not None:
            if codec_weights is not None or random_seed is not None:
                raise SystemExit("--audio-tokenizer and --codec-weights/--random-codec-seed are exclusive: "
                                 "one codec per data set")
            from higgs_min.audio import tokenizer as at
            import torch
            try:  # loaded up front: its identity is a hash of its (folded) weights
                self.model = at.load(audio_tokenizer, device, getattr(torch, dtype))
            except at.AudioTokenizerError as e:
                raise SystemExit(f"--audio-tokenizer: {e}")
            except ValueError as e:  # a dtype other than float32 on CPU
                raise SystemExit(f"--dtype {dtype} --device {device}: {e}")
            self.identity, self.sample_rate = self.model.identity, self.model.sample_rate
        elif codec_weights is not None:
            if not Path(codec_weights).is_file():
                raise UsageError(f"--codec-weights {codec_weights}: no such file (a local DAC weights file, "
                                 f"e.g. weights_44khz_8kbps_0.0.1.pth; nothing is downloaded)")
            self.identity = f"dac:{sha256_file(Path(codec_weights))[:16]}"
        elif random_seed is not None:
            log.warning("using a RANDOMLY INITIALIZED DAC (seed %d): codes are for demos and tests only", random_seed)
            self.identity = f"dac-random-seed:{random_seed}"
        else:
            raise SystemExit("refusing to run without --audio-tokenizer DIR or --codec-weights PATH (nothing is "
                             "downloaded); --random-codec-seed N builds a seeded random codec for demos and tests only")

    def encode(self, x, rate) -> np.ndarray:
        """Mono float waveform at `rate` -> (8, T) int16 codes."""
        from higgs_min.audio import tokenizer as at
        from higgs_min.audio import codec
        if isinstance(self.model, at.AudioTokenizer):
            return self.model.encode(at.resample(x, rate, self.model.sample_rate)).numpy().astype(np.int16)
        if self.model is None:
            self.model = codec.load_codec(*self.args)
        return codec.encode(self.model, x, rate)

    def encode_many(self, clips: list) -> list[np.ndarray]:
        """[(mono waveform, rate)] -> [(8, T) int16], each what encode gives it: the Higgs tokenizer encodes
        clips of one length together; DAC one by one. A clip it refuses raises _ClipError naming its index."""
        from higgs_min.audio import tokenizer as at
        if not isinstance(self.model, at.AudioTokenizer):
            return [self.encode(x, rate) for x, rate in clips]
        wavs = [at.resample(x, rate, self.model.sample_rate) for x, rate in clips]
        for i, w in enumerate(wavs):
            try:
                self.model.checked_wav(w)
            except ValueError as e:
                raise _ClipError(i, str(e)) from None
        return [c.numpy().astype(np.int16) for c in self.model.encode_batch(wavs, max_batch=len(wavs))]

    def decode(self, codes: np.ndarray):
        """(K, T) codes -> (waveform, rate)."""
        from higgs_min.audio import tokenizer as at
        from higgs_min.audio import codec
        if isinstance(self.model, at.AudioTokenizer):
            return self.model.decode(codes), self.model.sample_rate
        if self.model is None:
            self.model = codec.load_codec(*self.args)
        return codec.decode(self.model, codes), self.model.sample_rate


def encode_missing(enc: _Codec, missing: dict, batch: int) -> tuple[float, float]:
    """{codes file: (where, wav, seconds)} -> each codes file written (atomically); returns (audio seconds,
    compute seconds). Clips go in order of length, `batch` at a time, so that clips of one length meet in one
    call: the Higgs tokenizer encodes those together (AudioTokenizer.encode_batch: the codes each gets alone)."""
    import time

    from tqdm import tqdm

    from higgs_min.audio import codec

    order = sorted(missing.items(), key=lambda kv: kv[1][2])  # [(target, (where, wav, seconds))]
    audio_s, compute_s = 0.0, 0.0
    bar = tqdm(total=len(order), desc=f"encoding audio ({enc.identity})", unit="clip",
               disable=None if order else True)  # None: no bar into a pipe or a log file
    for a in range(0, len(order), batch):
        group = order[a:a + batch]
        t0 = time.perf_counter()
        clips = []
        for _, (where, wav, _) in group:
            try:
                clips.append(codec.read_wav(wav))  # (x, rate)
            except ValueError as e:  # e.g. a float WAV; the message names the file
                raise SystemExit(f"{where}: {e}")
        try:
            codes = enc.encode_many(clips)  # [(8, T) int16]
        except _ClipError as e:  # a clip shorter than one frame
            where, wav, _ = group[e.index][1]
            raise SystemExit(f"{where}: {wav}: {e.message}")
        for (target, _), c in zip(group, codes):
            with atomic.replacing(target, "wb") as f:
                np.save(f, c)
        audio_s += sum(s for _, (_, _, s) in group)
        compute_s += time.perf_counter() - t0
        bar.update(len(group))
        bar.set_postfix_str(f"{audio_s / compute_s:.1f} audio-s/s")
    bar.close()
    return audio_s, compute_s


def check_all(data: Path, out: Path, found: list, max_seconds: float) -> list[float]:
    """audio_check.check_clip on every clip -> their seconds. Any error: every bad clip of the file listed in
    one error (and all of them in OUT.rejected.jsonl, OUT without its .jsonl), nothing encoded. Warnings: counted, listed, encoded."""
    from higgs_min.prepare.sanitize import RejectReport, Rejection

    errors, warnings, seconds = RejectReport(), RejectReport(), []
    for n, where, wav, transcript in found:
        clip = check_clip(wav, transcript, max_seconds)
        seconds.append(clip.seconds)
        for report, problems in ((errors, clip.errors), (warnings, clip.warnings)):
            for reason, detail in problems:
                report.add(Rejection(str(data), n, where, reason, detail))
    if warnings.rows:
        for r in warnings.rows[:20]:
            log.warning("%s", r.message())
        log.warning("%s: %d clip warning(s) (%s); encoded anyway", data, len(warnings), warnings.summary())
    if errors.rows:
        path = out.with_suffix(".rejected.jsonl")
        errors.write(path)
        if len(errors) == 1:
            raise RunError(f"{errors.rows[0].message()} (nothing was encoded)")
        first = "\n  ".join(r.message() for r in errors.rows[:20])
        more = f"\n  ... and {len(errors.rows) - 20} more" if len(errors.rows) > 20 else ""
        raise RunError(f"{data}: {len(errors)} bad clip(s) of {len(found)} ({errors.summary()}); nothing was encoded "
                       f"(all of them in {path}):\n  {first}{more}")
    return seconds


def prepare(data: Path, out: Path, codec_weights=None, random_seed=None, audio_tokenizer=None,
            max_seconds: float = 60.0, device: str = "cpu", dtype: str = "float32", encode_batch: int = 1) -> dict:
    """Returns counts: {'encoded': n, 'cached': m, 'audio_items': n + m, 'codec': identity}."""
    if encode_batch < 1:
        raise UsageError(f"--encode-batch {encode_batch}: give 1 (one clip at a time) or more")
    enc = _Codec(codec_weights, random_seed, audio_tokenizer, device, dtype)
    lines = data.read_text(encoding="utf-8").splitlines()
    jobs = []  # (line index, message index, item index, wav path, seconds)
    convs = []
    found = []  # (line, where, wav, transcript): every clip, checked below before any is encoded
    for n, line in enumerate(lines, 1):
        if not line.strip():
            convs.append(None)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{data}:{n}: malformed JSON: {e.msg} at column {e.colno}")
        convs.append(obj)
        messages = obj.get("messages", []) if isinstance(obj, dict) else []
        for m_i, msg in enumerate(messages):
            content = msg.get("content") if isinstance(msg, dict) else None
            for i_i, item in enumerate(content if isinstance(content, list) else []):
                if isinstance(item, dict) and item.get("type") == "audio" and "audio" in item:
                    where = f"messages[{m_i}].content[{i_i}].audio"
                    if not isinstance(item["audio"], str):
                        raise UsageError(f"{data}:{n}: {where}: expected a wav path "
                                         f"string, got {json.dumps(item['audio'])[:60]}; write "
                                         '{"type": "audio", "audio": "a.wav"}')
                    found.append((n, where, data.parent / item["audio"], transcript_of(messages, m_i)))
                    jobs.append((len(convs) - 1, m_i, i_i, data.parent / item["audio"]))
    seconds = check_all(data, out, found, max_seconds)
    jobs = [(*job, s) for job, s in zip(jobs, seconds)]
    codes_dir = out.parent / "codes"
    codes_dir.mkdir(parents=True, exist_ok=True)
    targets, missing = [], {}  # per job its codes file; the files to write (a wav listed twice is encoded once)
    for conv_i, m_i, i_i, wav, clip_s in jobs:
        key = hashlib.sha256(f"{enc.identity}:{sha256_file(wav)}".encode()).hexdigest()[:20]
        targets.append(codes_dir / f"{key}.npy")
        if not targets[-1].exists() and targets[-1] not in missing:
            missing[targets[-1]] = (f"{data}:{conv_i + 1}: messages[{m_i}].content[{i_i}].audio", wav, clip_s)
    audio_s, compute_s = encode_missing(enc, missing, encode_batch)
    for (conv_i, m_i, i_i, wav, _), target in zip(jobs, targets):
        item = convs[conv_i]["messages"][m_i]["content"][i_i]
        src = os.path.relpath(wav, out.parent)
        item.pop("audio")
        item["codes"] = os.path.relpath(target, out.parent)
        item["source_audio"] = src
        item["codec"] = enc.identity  # provenance: which tokenizer's codes these are
    body = "".join((json.dumps(c, ensure_ascii=False) if c is not None else "") + "\n" for c in convs)
    atomic.write_text(out, body)
    counts = {"encoded": len(missing), "cached": len(jobs) - len(missing), "audio_items": len(jobs)}
    counts["codec"] = enc.identity
    if compute_s:
        log.info("encoded %.1f s of audio in %.1f s (%.1f audio-s/s)", audio_s, compute_s, audio_s / compute_s)
    return counts


# The data-preparation steps that live in their own modules. Each entry is
# "module:function"; the function takes argv (the words after the subcommand) and
# returns an exit code. Imported only when asked for, so `prepare --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("higgs_min.prepare.convert:main", "ljspeech / wav folder / ShareGPT / OpenAI chat -> the project's JSONL"),
    "convert-audio-tokenizer": ("higgs_min.audio.tokenizer:convert_main",
                                "the Higgs audio tokenizer in any layout -> its model.safetensors, once"),
    "pack": ("higgs_min.prepare.pack:pack_main", "JSONL with codes -> a packed, memory-mapped corpus folder"),
    "verify": ("higgs_min.prepare.corpus:verify_main", "check a packed corpus's shards against its manifest"),
}


def main(argv=None) -> int:
    return guard(_dispatch, argv, "python -m higgs_min.prepare")


def _dispatch(argv) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        module, _, func = SUBCOMMANDS[argv[0]][0].partition(":")
        import importlib
        return getattr(importlib.import_module(module), func)(argv[1:])
    return encode_main(argv)


def encode_main(argv) -> int:
    ap = Parser(
        prog="python -m higgs_min.prepare", description=__doc__.split("\n\n")[0],
        epilog="subcommands: " + ", ".join(f"{k} ({v[1]})" for k, v in SUBCOMMANDS.items()) if SUBCOMMANDS else None)
    ap.add_argument("--data", type=Path, help="input JSONL whose audio items hold wav paths")
    ap.add_argument("--out", type=Path, required=True, help="output JSONL (or wav with --decode)")
    ap.add_argument("--codec-weights", help="local DAC weights file (dac.DAC.load); never downloaded")
    ap.add_argument("--random-codec-seed", type=int, help="build a seeded random DAC instead (demos/tests only)")
    ap.add_argument("--audio-tokenizer", type=Path, metavar="DIR",
                    help="the Higgs Audio v2 audio tokenizer: its folder (original model.pth or transformers' layout) "
                         "or a Higgs Audio v3 model folder; the codes the released model understands; see "
                         "convert-audio-tokenizer")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="refuse a clip longer than this many seconds, naming the file (default 60)")
    ap.add_argument("--device", default="cpu", help="device for --audio-tokenizer (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype for --audio-tokenizer; other than float32 only on CUDA (codes then not bit-exact)")
    ap.add_argument("--encode-batch", type=int, default=1, metavar="N",
                    help="--audio-tokenizer: encode up to N clips of the same length together (default 1); the codes "
                         "are those each clip gets alone (clips of other lengths go one by one). N times the memory; "
                         "1 thread: no faster; 2 threads on a busy 2-core box: 2.3x (make bench); GPU not measured")
    ap.add_argument("--decode", type=Path, help="codes .npy (K, T) to turn back into a wav at --out")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.decode:
        from higgs_min.audio import codec
        enc = _Codec(args.codec_weights, args.random_codec_seed, args.audio_tokenizer, args.device, args.dtype)
        x, rate = enc.decode(np.load(args.decode, allow_pickle=False))
        codec.write_wav(args.out, x, rate)
        print(f"wrote {args.out} ({x.numel() / rate:.2f} s at {rate} Hz, {enc.identity})")
        return 0
    if args.data is None:
        ap.error("--data is required unless --decode is given")
    if args.encode_batch < 1:
        ap.error(f"--encode-batch {args.encode_batch}: give 1 (one clip at a time) or more")
    counts = prepare(args.data, args.out, args.codec_weights, args.random_codec_seed, args.audio_tokenizer,
                     args.max_seconds, args.device, args.dtype, args.encode_batch)
    print(f"{args.out}: {counts['audio_items']} audio items, {counts['encoded']} encoded, {counts['cached']} cached"
          f" (codec {counts['codec']})")
    return 0
