"""Other data layouts -> the project's JSONL (then `prepare` encodes the audio, then train or pack).

    python -m higgs_min.prepare convert --from ljspeech DIR  --out OUT.jsonl   (DIR/metadata.csv id|text|normalized, DIR/wavs/)
    python -m higgs_min.prepare convert --from folder DIR    --out OUT.jsonl   (a.wav beside a.txt)
    python -m higgs_min.prepare convert --from sharegpt FILE --out OUT.jsonl   ({"conversations": [{"from", "value"}]})
    python -m higgs_min.prepare convert --from openai FILE   --out OUT.jsonl   ({"messages": [...]} with input_audio)

Every output line is {"messages": [{"role", "content"}]} with audio items {"type": "audio", "audio": PATH}
(PATH relative to OUT's folder). Speech corpora (ljspeech, folder) become "say this" conversations: the user
turn is the text (with --user-prefix), the assistant turn is the audio, after the system turn of the official
TTS prompt ("Generate audio following instruction.", examples/generation.py; --system to change it, --system ""
for none): the prompt generate uses by default. The role mapping (--role FROM=TO) is an option. A line or folder of unknown layout is an error naming the keys
found and the layouts known.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import sys
from pathlib import Path

from higgs_min import atomic
from higgs_min.chat import DEFAULT_SYSTEM

# Known layouts: name -> how to recognize one parsed line (JSON layouts) and what it looks like.
LAYOUTS = {
    "ljspeech": "a folder with metadata.csv (id|text|normalized text) and wavs/ID.wav",
    "folder": "a folder of a.wav beside a.txt (the transcript)",
    "sharegpt": 'JSONL/JSON of {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}',
    "openai": 'JSONL of {"messages": [{"role", "content": [{"type": "text"} | {"type": "input_audio", '
              '"input_audio": {"data": BASE64, "format": "wav"}}]}]}',
}


def detect_layout(obj) -> str | None:
    """The name of the JSON layout one parsed line is in, or None (the project's own format is not detected)."""
    if not isinstance(obj, dict):
        return None
    conv = obj.get("conversations")
    if isinstance(conv, list) and any(isinstance(m, dict) and "from" in m and "value" in m for m in conv):
        return "sharegpt"
    messages = obj.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(isinstance(i, dict) and i.get("type") == "input_audio"
                                                 for i in content):
                return "openai"
    return None


def file_hint(path: Path, first_line: bytes) -> str:
    """'; this looks like ...: python -m higgs_min.prepare convert ...' for a --data file that is not JSONL
    at all (an LJSpeech metadata.csv, a JSON list, a folder of wavs), else ''."""
    cmd = "; this looks like {}: python -m higgs_min.prepare convert --from {} {} --out OUT.jsonl"
    if path.is_dir():
        if (path / "metadata.csv").is_file():
            return cmd.format("an LJSpeech folder", "ljspeech", path)
        if any(path.glob("*.wav")):
            return cmd.format("a folder of wavs", "folder", path)
        return ""
    if path.name == "metadata.csv" or (path.suffix == ".csv" and b"|" in first_line):
        return cmd.format("an LJSpeech metadata.csv", "ljspeech", path.parent)
    if first_line.lstrip().startswith(b"["):
        return cmd.format("a JSON list (ShareGPT files often are)", "sharegpt", path)
    return ""


DEFAULT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "developer": "system"}


class ConvertError(ValueError):
    """Input the converter cannot use: names the file, line and field."""


def _audio(path: Path, out_dir: Path) -> dict:
    return {"type": "audio", "audio": os.path.relpath(path, out_dir)}


def _speech_conversation(text: str, wav: Path, out_dir: Path, system: str | None, prefix: str) -> dict:
    system = DEFAULT_SYSTEM if system is None else system  # the official TTS prompt unless --system says
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": prefix + text}, {"role": "assistant", "content": [_audio(wav, out_dir)]}]
    return {"messages": msgs}


def from_ljspeech(src: Path, out_dir: Path, opts) -> list[dict]:
    """DIR/metadata.csv: `id|text|normalized text` (normalized used when present), audio DIR/wavs/ID.wav."""
    meta = src / "metadata.csv"
    if not meta.is_file():
        raise ConvertError(f"{src}: no metadata.csv: not an LJSpeech folder ({LAYOUTS['ljspeech']}); found "
                           f"{sorted(p.name for p in src.iterdir())[:8] if src.is_dir() else 'no folder'}")
    rows, problems = [], []  # every bad line of the file, reported together
    for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("|")
        if len(cols) < 2 or not cols[0]:
            problems.append(f"{meta}:{n}: expected id|text|normalized text, got {len(cols)} column(s)")
            continue
        text = cols[2] if len(cols) > 2 and cols[2].strip() and not opts.raw_text else cols[1]
        wav = src / "wavs" / f"{cols[0]}.wav"
        if not wav.is_file():
            problems.append(f"{meta}:{n}: {wav} does not exist")
        elif not text.strip():
            problems.append(f"{meta}:{n}: empty transcript for {wav.name} (nothing to say: fill in the text or "
                            f"remove the line)")
        else:
            rows.append(_speech_conversation(text.strip(), wav, out_dir, opts.system, opts.user_prefix))
    if problems and problems[0].startswith(f"{meta}:1: ") and len(problems) == 1 and rows:
        raise ConvertError(f"{problems[0]}; line 1 looks like a header row ({line_of(meta, 1)!r}): LJSpeech's "
                           f"metadata.csv has none; remove it")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConvertError(problems[0] if len(problems) == 1 else
                           f"{meta}: {len(problems)} bad line(s), nothing written:\n  " + "\n  ".join(problems[:20]) + more)
    return rows


def line_of(path: Path, n: int) -> str:
    return path.read_text(encoding="utf-8-sig").splitlines()[n - 1][:60]


def from_folder(src: Path, out_dir: Path, opts) -> list[dict]:
    """Every a.wav (any depth, sorted) with its transcript a.txt beside it."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder ({LAYOUTS['folder']})")
    wavs = sorted(src.rglob("*.wav"))
    if not wavs:
        raise ConvertError(f"{src}: no .wav files ({LAYOUTS['folder']}); found {sorted(p.name for p in src.iterdir())[:8]}")
    missing = [w for w in wavs if not w.with_suffix(".txt").is_file()]
    if missing:
        raise ConvertError(f"{src}: {len(missing)} wav file(s) without a transcript beside them, e.g. "
                           f"{missing[0].with_suffix('.txt')} does not exist")
    texts = {w: w.with_suffix(".txt").read_text(encoding="utf-8-sig").strip() for w in wavs}
    empty = [w.with_suffix(".txt") for w in wavs if not texts[w]]
    if empty:
        raise ConvertError(f"{src}: {len(empty)} empty transcript(s) (nothing to say), e.g. {empty[0]}")
    return [_speech_conversation(texts[w], w, out_dir, opts.system, opts.user_prefix) for w in wavs]


def _records(src: Path):
    """(line or index, record) from a JSON list file or a JSONL file."""
    text = src.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{src}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        yield from ((f"{src}: record {i}", r) for i, r in enumerate(data))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{src}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{src}:{n}: malformed JSON: {e.msg} at column {e.colno}") from None


def _unknown(where: str, rec, wanted: str) -> ConvertError:
    found = sorted(map(str, rec))[:10] if isinstance(rec, dict) else type(rec).__name__
    other = detect_layout(rec)
    hint = f"; it looks like {other}: use --from {other}" if other and other != wanted else ""
    return ConvertError(f"{where}: not a {wanted} record (found keys {found}); known layouts: "
                        + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()) + hint)


def _role(where: str, name, roles: dict) -> str:
    if not isinstance(name, str) or name not in roles:
        raise ConvertError(f"{where}: role {name!r} is not mapped (known: {sorted(roles)}; add --role {name}=user)")
    return roles[name]


def from_sharegpt(src: Path, out_dir: Path, opts) -> list[dict]:
    """{"conversations": [{"from", "value"}], "system"?: str, "audios"?: [paths]}; each "<audio>" in a value
    takes the next path of "audios" (relative to the file's folder)."""
    rows = []
    for where, rec in _records(src):
        if detect_layout(rec) != "sharegpt":
            raise _unknown(where, rec, "sharegpt")
        audios = list(rec.get("audios") or [])
        system = rec.get("system") or opts.system
        msgs = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        for t, turn in enumerate(rec["conversations"]):
            tw = f"{where}: conversations[{t}]"
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ConvertError(f"{tw}: expected {{'from': ROLE, 'value': TEXT}}")
            role = _role(f"{tw}.from", turn.get("from"), opts.roles)
            content = []
            for k, piece in enumerate(turn["value"].split("<audio>")):
                if k:
                    if not audios:
                        raise ConvertError(f"{tw}.value: more <audio> tags than paths in 'audios'")
                    wav = src.parent / audios.pop(0)
                    if not wav.is_file():
                        raise ConvertError(f"{tw}.value: audio {wav} does not exist")
                    content.append(_audio(wav, out_dir))
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
            msgs.append({"role": role, "content": content})
        if audios:
            raise ConvertError(f"{where}: audios: {len(audios)} path(s) not used by an <audio> tag")
        rows.append({"messages": msgs})
    return rows


def _write_audio(where: str, b64, fmt, out_dir: Path) -> Path:
    if fmt not in ("wav", None):
        raise ConvertError(f"{where}.format: {fmt!r} audio: only wav is read (convert it first, e.g. with ffmpeg)")
    try:
        data = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
    except (binascii.Error, ValueError):
        data = None
    if not data:
        raise ConvertError(f"{where}.data: expected base64-encoded audio")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ConvertError(f"{where}.data: the decoded bytes are not a WAV file")
    target = out_dir / "audio" / f"{hashlib.sha256(data).hexdigest()[:20]}.wav"
    if not target.exists():  # named by content: a second run writes nothing
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.replace_file(target, data)
    return target


def from_openai(src: Path, out_dir: Path, opts) -> list[dict]:
    """Chat `messages`; content items text / input_audio {data (base64), format}; an assistant message's
    "audio": {"data": ...} becomes an audio item too. The audio is written to OUT's folder/audio/."""
    rows = []
    for where, rec in _records(src):
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise _unknown(where, rec, "openai")
        msgs = [{"role": "system", "content": opts.system}] if opts.system else []
        for m_i, msg in enumerate(rec["messages"]):
            mw = f"{where}: messages[{m_i}]"
            if not isinstance(msg, dict):
                raise ConvertError(f"{mw}: expected an object")
            role = _role(f"{mw}.role", msg.get("role"), opts.roles)
            content = msg.get("content")
            items = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
            if not isinstance(items, list):
                raise ConvertError(f"{mw}.content: expected a string or a list")
            out = []
            for i_i, item in enumerate(items):
                iw = f"{mw}.content[{i_i}]"
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text" and isinstance(item.get("text"), str):
                    out.append({"type": "text", "text": item["text"]})
                elif kind == "input_audio" and isinstance(item.get("input_audio"), dict):
                    a = item["input_audio"]
                    out.append(_audio(_write_audio(f"{iw}.input_audio", a.get("data"), a.get("format"), out_dir),
                                      out_dir))
                else:
                    raise ConvertError(f"{iw}: expected a text or input_audio item, got type {kind!r}")
            if isinstance(msg.get("audio"), dict) and msg["audio"].get("data"):
                out.append(_audio(_write_audio(f"{mw}.audio", msg["audio"]["data"], "wav", out_dir), out_dir))
            msgs.append({"role": role, "content": out})
        rows.append({"messages": msgs})
    return rows


CONVERTERS = {"ljspeech": from_ljspeech, "folder": from_folder, "sharegpt": from_sharegpt, "openai": from_openai}


def convert(layout: str, src: Path, out: Path, opts) -> int:
    """Convert and write `out` atomically; returns the number of conversations."""
    out_dir = out.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = CONVERTERS[layout](src.resolve(), out_dir, opts)
    if not rows:
        raise ConvertError(f"{src}: no conversation found")
    atomic.write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main(argv) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.prepare convert", description=__doc__.split("\n\n")[0],
                                 epilog="layouts: " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    ap.add_argument("--from", dest="layout", required=True, choices=sorted(CONVERTERS), help="input layout")
    ap.add_argument("input", type=Path, help="folder (ljspeech, folder) or JSON/JSONL file (sharegpt, openai)")
    ap.add_argument("--out", type=Path, required=True, help="output JSONL (audio paths written relative to it)")
    ap.add_argument("--system", help="system prompt put first in every conversation; \"\" for none (default: "
                                     "ljspeech/folder: the official TTS prompt 'Generate audio following "
                                     "instruction.'; sharegpt/openai: none unless the record has one)")
    ap.add_argument("--role", action="append", default=[], metavar="FROM=TO",
                    help=f"role mapping, repeatable (defaults: {DEFAULT_ROLES}); TO in system, user, assistant")
    ap.add_argument("--user-prefix", default="", help="ljspeech/folder: text put before the transcript in the "
                                                      "user turn (e.g. 'Say: ')")
    ap.add_argument("--raw-text", action="store_true", help="ljspeech: use the raw text column, not the normalized")
    opts = ap.parse_args(argv)
    opts.roles = dict(DEFAULT_ROLES)
    for spec in opts.role:
        src, sep, dst = spec.partition("=")
        if not sep or dst not in ("system", "user", "assistant"):
            ap.error(f"--role {spec}: expected FROM=TO with TO one of system, user, assistant")
        opts.roles[src] = dst
    try:
        n = convert(opts.layout, opts.input, opts.out, opts)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as e:  # a file vanished, is unreadable, or is not UTF-8 text
        print(f"error: {opts.input}: {e}", file=sys.stderr)
        return 1
    print(f"{opts.out}: {n} conversations from {opts.input} ({opts.layout}); next: python -m higgs_min.prepare "
          f"--data {opts.out} --out PREPARED.jsonl --audio-tokenizer DIR (the released Higgs audio tokenizer; "
          f"--codec-weights dac.pth only to train from scratch)")
    return 0
