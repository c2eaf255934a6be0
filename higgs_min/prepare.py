"""Encode the wav items of a JSONL data set into DAC codes, or decode codes to a wav.

    python -m higgs_min.prepare --data in.jsonl --out out.jsonl --codec-weights dac.pth
    python -m higgs_min.prepare --decode codes.npy --codec-weights dac.pth --out x.wav
    python -m higgs_min.prepare SUBCOMMAND ...   (see SUBCOMMANDS below; each has --help)

Each `{"type": "audio", "audio": "a.wav"}` item becomes
`{"type": "audio", "codes": "codes/<hash>.npy", "source_audio": "a.wav"}`, the codes
(8, T) int16 saved beside out.jsonl. Files are named by a hash of the wav bytes
and the codec, so a second run encodes nothing. Nothing is downloaded: without
--codec-weights the command refuses, unless --random-codec-seed asks for a
seeded random codec (demos and tests only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from higgs_min.checkpoint import sha256_file, write_file

log = logging.getLogger("higgs_min.prepare")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_file(tmp, data)
    os.replace(tmp, path)


def prepare(data: Path, out: Path, codec_weights=None, random_seed=None) -> dict:
    """Returns counts: {'encoded': n, 'cached': m, 'audio_items': n + m}."""
    from tqdm import tqdm

    from higgs_min import codec

    codec_id = f"weights:{sha256_file(Path(codec_weights))}" if codec_weights else f"random-seed:{random_seed}"
    if codec_weights is None and random_seed is None:
        raise SystemExit("refusing to run without --codec-weights PATH (nothing is downloaded); "
                         "--random-codec-seed N builds a seeded random codec for demos and tests only")
    if random_seed is not None and codec_weights is None:
        log.warning("using a RANDOMLY INITIALIZED DAC (seed %d): codes are for demos and tests only", random_seed)
    lines = data.read_text(encoding="utf-8").splitlines()
    jobs = []  # (line index, message index, item index, wav path)
    convs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            convs.append(None)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{data}:{n}: malformed JSON: {e.msg} at column {e.colno}")
        convs.append(obj)
        for m_i, msg in enumerate(obj.get("messages", [])):
            content = msg.get("content") if isinstance(msg, dict) else None
            for i_i, item in enumerate(content if isinstance(content, list) else []):
                if isinstance(item, dict) and item.get("type") == "audio" and "audio" in item:
                    wav = data.parent / item["audio"]
                    if not wav.exists():
                        raise SystemExit(f"{data}:{n}: messages[{m_i}].content[{i_i}].audio: {wav} does not exist")
                    jobs.append((len(convs) - 1, m_i, i_i, wav))
    codes_dir = out.parent / "codes"
    codes_dir.mkdir(parents=True, exist_ok=True)
    model = None
    counts = {"encoded": 0, "cached": 0}
    for conv_i, m_i, i_i, wav in tqdm(jobs, desc="encoding audio", unit="file", disable=not jobs):
        key = hashlib.sha256(f"{codec_id}:{sha256_file(wav)}".encode()).hexdigest()[:20]
        target = codes_dir / f"{key}.npy"
        if target.exists():
            counts["cached"] += 1
        else:
            if model is None:
                model = codec.load_codec(codec_weights, random_seed)
            x, rate = codec.read_wav(wav)
            codes = codec.encode(model, x, rate)  # (8, T) int16
            tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.npy")
            np.save(tmp, codes)
            os.replace(tmp, target)
            counts["encoded"] += 1
        item = convs[conv_i]["messages"][m_i]["content"][i_i]
        src = os.path.relpath(wav, out.parent)
        item.pop("audio")
        item["codes"] = os.path.relpath(target, out.parent)
        item["source_audio"] = src
    body = "".join((json.dumps(c, ensure_ascii=False) if c is not None else "") + "\n" for c in convs)
    _write_atomic(out, body.encode("utf-8"))
    counts["audio_items"] = len(jobs)
    return counts


# The data-preparation steps that live in their own modules. Each entry is
# "module:function"; the function takes argv (the words after the subcommand) and
# returns an exit code. Imported only when asked for, so `prepare --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        module, _, func = SUBCOMMANDS[argv[0]][0].partition(":")
        import importlib
        return getattr(importlib.import_module(module), func)(argv[1:])
    return encode_main(argv)


def encode_main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m higgs_min.prepare", description=__doc__.split("\n\n")[0],
        epilog="subcommands: " + ", ".join(f"{k} ({v[1]})" for k, v in SUBCOMMANDS.items()) if SUBCOMMANDS else None)
    ap.add_argument("--data", type=Path, help="input JSONL whose audio items hold wav paths")
    ap.add_argument("--out", type=Path, required=True, help="output JSONL (or wav with --decode)")
    ap.add_argument("--codec-weights", help="local DAC weights file (dac.DAC.load); never downloaded")
    ap.add_argument("--random-codec-seed", type=int, help="build a seeded random DAC instead (demos/tests only)")
    ap.add_argument("--decode", type=Path, help="codes .npy (K, T) to turn back into a wav at --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.decode:
        from higgs_min import codec
        model = codec.load_codec(args.codec_weights, args.random_codec_seed)
        x = codec.decode(model, np.load(args.decode, allow_pickle=False))
        codec.write_wav(args.out, x, model.sample_rate)
        print(f"wrote {args.out} ({x.numel() / model.sample_rate:.2f} s at {model.sample_rate} Hz)")
        return 0
    if args.data is None:
        ap.error("--data is required unless --decode is given")
    counts = prepare(args.data, args.out, args.codec_weights, args.random_codec_seed)
    print(f"{args.out}: {counts['audio_items']} audio items, {counts['encoded']} encoded, {counts['cached']} cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
