"""Every clip checked before anything is encoded (prepare/encode.py): broken audio is named, never encoded.

    check_clip(wav, transcript, max_seconds) -> Clip(seconds, errors, warnings)   (reason, detail) pairs

errors (the clip is refused; prepare lists every one of a run, then encodes nothing):
    no such file, empty file (0 bytes), not a WAV file (no RIFF/WAVE, no fmt or data chunk),
    truncated      the data chunk declares more bytes than the file holds (header seconds vs held seconds)
    odd byte count the data bytes are not a whole number of frames (channels x bytes per sample)
    no audio       0 frames
    too long       longer than --max-seconds
    unreadable     what codec.read_wav refuses (a float WAV, an unknown sample width)
    empty transcript   the text the clip speaks is empty (see `transcript_of`)
warnings (counted and listed; the clip is encoded):
    padded         bytes after the last chunk that are not a chunk (ignored by every reader)
    silent         peak below SILENT_PEAK of full scale
    pace           characters of transcript per second of audio outside CPS_WINDOW: a clip cut short, or
                   a transcript of another clip (checked from MIN_PACE_CHARS characters on: short words
                   carry leading and trailing silence)
The chunk walk follows the RIFF layout (chunk id, little-endian uint32 size, data, a pad byte after an odd
size); it reads the headers only, then `codec.read_wav` reads the samples for the peak.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

SILENT_PEAK = 1e-3  # -60 dBFS: nothing a microphone picks up in a room is below it
CPS_WINDOW = (3.0, 35.0)  # read speech is about 12-18 characters a second; this only catches gross mismatches
MIN_PACE_CHARS = 10


class ClipError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Clip:
    seconds: float = 0.0
    errors: list = field(default_factory=list)  # (reason, detail)
    warnings: list = field(default_factory=list)  # (reason, detail)


def walk_chunks(path: Path) -> dict:
    """The RIFF chunks of a wav, from their headers: {rate, channels, width, frames, padded} or ClipError."""
    size = path.stat().st_size
    if size == 0:
        raise ClipError("empty file", "0 bytes")
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ClipError("not a WAV file", f"{size} bytes starting {head[:12]!r}, not RIFF....WAVE")
        fmt = data = None
        pos, padded = 12, 0
        while pos + 8 <= size:
            f.seek(pos)
            cid, csize = struct.unpack("<4sI", f.read(8))
            if not all(32 <= b < 127 for b in cid):  # not a chunk id: trailing junk
                padded = size - pos
                break
            if cid == b"fmt " and csize >= 16:
                fmt = struct.unpack("<HHIIHH", f.read(16))  # format, channels, rate, byte rate, block, bits
            elif cid == b"data" and data is None:
                data = (pos + 8, csize)
            pos += 8 + csize + (csize & 1)
        else:
            padded = max(0, size - pos) if pos < size else 0
    if fmt is None or data is None:
        raise ClipError("not a WAV file", f"no {'fmt' if fmt is None else 'data'} chunk")
    _, channels, rate, _, block, bits = fmt
    if channels < 1 or rate < 1 or bits < 8:
        raise ClipError("not a WAV file", f"fmt chunk: {channels} channel(s), {rate} Hz, {bits} bits")
    block = channels * ((bits + 7) // 8)
    start, declared = data
    held = size - start
    if declared > held:
        raise ClipError("truncated", f"the header declares {declared} data bytes ({declared / block / rate:.2f} s), "
                                     f"the file holds {held} ({held / block / rate:.2f} s): a cut-off copy?")
    if declared % block:
        raise ClipError("odd byte count", f"{declared} data bytes is not a whole number of {block}-byte frames "
                                          f"({channels} channel(s) x {bits} bits)")
    if declared == 0:
        raise ClipError("no audio", "the data chunk holds 0 frames")
    return {"rate": rate, "channels": channels, "frames": declared // block, "padded": padded}


def check_clip(wav: Path, transcript: str | None, max_seconds: float) -> Clip:
    """Everything wrong with one clip (see the module docstring). transcript None: nothing to compare."""
    from higgs_min.audio import codec

    clip = Clip()
    if transcript is not None and not transcript.strip():
        clip.errors.append(("empty transcript", "the text this clip speaks is empty"))
    if not wav.is_file():
        clip.errors.append(("no such file", f"{wav} does not exist"))
        return clip
    try:
        info = walk_chunks(wav)
    except ClipError as e:
        clip.errors.append((e.reason, f"{wav}: {e.detail}"))
        return clip
    clip.seconds = info["frames"] / info["rate"]
    if clip.seconds > max_seconds:
        clip.errors.append(("too long", f"{wav} is {clip.seconds:.1f} s, longer than --max-seconds {max_seconds:g}; "
                                        f"split it or raise the limit"))
        return clip  # not read: refusing a long clip must not cost its memory
    if info["padded"]:
        clip.warnings.append(("padded", f"{wav}: {info['padded']} bytes after the last chunk (ignored)"))
    try:
        x, _ = codec.read_wav(wav)
    except ValueError as e:
        clip.errors.append(("unreadable", str(e)))
        return clip
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak < SILENT_PEAK:
        clip.warnings.append(("silent", f"{wav}: peak {peak:.2e} of full scale over {clip.seconds:.2f} s"))
    chars = len(transcript.strip()) if transcript else 0
    if chars >= MIN_PACE_CHARS:
        pace = chars / clip.seconds
        lo, hi = CPS_WINDOW
        if not lo <= pace <= hi:
            clip.warnings.append(("pace", f"{wav}: {chars} characters in {clip.seconds:.2f} s = {pace:.1f} "
                                          f"characters/s, outside [{lo:g}, {hi:g}]: cut short, or another clip's text?"))
    return clip


def transcript_of(messages: list, m_i: int) -> str | None:
    """The text an audio item of messages[m_i] speaks: the message's own text items when it has any (text
    + audio in one turn), else, for an assistant turn, the user turn before it when that is text (the TTS
    layout: user says what to say); None when there is no text to compare (speech-to-speech)."""
    def texts(content):
        if isinstance(content, str):
            return content
        items = [i.get("text") for i in content if isinstance(i, dict) and i.get("type") == "text"] \
            if isinstance(content, list) else []
        return " ".join(t for t in items if isinstance(t, str)) if items else None

    msg = messages[m_i]
    own = texts(msg.get("content"))
    if own is not None and own.strip():
        return own
    if msg.get("role") == "assistant" and m_i > 0 and isinstance(messages[m_i - 1], dict) \
            and messages[m_i - 1].get("role") == "user":
        return texts(messages[m_i - 1].get("content"))
    return None
