"""Audio <-> codes with descript-audio-codec (DAC), imported lazily.

`import dac` pulls in descript-audiotools and torchaudio (seconds), so only
this module imports it, and only inside functions: training never waits for it.
Nothing here downloads: weights come from a local file, or, for demos and
tests only, a seeded random DAC is built on request.
"""

from __future__ import annotations

import warnings
import wave
from pathlib import Path

import numpy as np
import torch

from higgs_min import atomic

NUM_CODEBOOKS = 8

# A small random DAC at the released audio tokenizer's framing (24 kHz, hop 960
# = 25 frames/s, 8 codebooks of 1024). Its codes are deterministic functions of
# the audio but carry no learned meaning: for demos and tests only.
RANDOM_CODEC_CONFIG = dict(encoder_dim=32, encoder_rates=[2, 4, 8, 15], decoder_dim=256,
                           decoder_rates=[15, 8, 4, 2], n_codebooks=8, codebook_size=1024,
                           sample_rate=24000)


def load_codec(weights: str | Path | None = None, random_seed: int | None = None):
    """A DAC in eval mode: from local `weights`, or seeded random when asked explicitly."""
    import dac  # lazy: see the module docstring

    if weights is None and random_seed is None:
        raise ValueError("no codec weights: pass --codec-weights PATH, or --random-codec-seed N "
                         "for a seeded random codec (demos and tests only)")
    if weights is not None and not Path(weights).exists():
        raise FileNotFoundError(f"{weights}: codec weights not found (nothing is downloaded)")
    with warnings.catch_warnings():  # the pinned dac builds its convs with torch's deprecated weight_norm: its
        warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)  # not ours
        if weights is not None:
            model = dac.DAC.load(str(weights))
        else:
            torch.manual_seed(random_seed)
            model = dac.DAC(**RANDOM_CODEC_CONFIG)
    if model.n_codebooks < NUM_CODEBOOKS:
        raise ValueError(f"codec has {model.n_codebooks} codebooks, need at least {NUM_CODEBOOKS}")
    return model.eval()


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """8/16/24/32-bit integer PCM WAV, any channel count -> (mono float waveform (T,), sample rate):
    samples scaled to [-1, 1) and the channels averaged."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:  # e.g. "unknown format: 3" for a float WAV
        raise ValueError(f"{path}: not a readable integer-PCM WAV file: {e} (convert float WAVs to PCM first)") from e
    if width == 1:  # 8-bit WAV is unsigned
        pcm = np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0
    elif width == 3:  # 24-bit: little-endian 3-byte words, sign-extended via the top byte
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        pcm = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32)
    else:
        pcm = np.frombuffer(raw, dtype={2: "<i2", 4: "<i4"}[width]).astype(np.float32)
    x = torch.from_numpy(pcm / float(2 ** (8 * width - 1))).view(-1, ch).mean(1)
    return x, rate


def write_wav(path: str | Path, x: torch.Tensor, rate: int) -> None:
    """Mono 16-bit PCM, written through the atomic writer (the wav appears whole or not at all)."""
    pcm = (x.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with atomic.replacing(path, "wb") as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


@torch.no_grad()
def encode(model, waveform: torch.Tensor, rate: int) -> np.ndarray:
    """Mono waveform (T,) at `rate` -> int16 codes (8, frames): the first 8 quantizers."""
    import torchaudio.functional as AF

    if rate != model.sample_rate:
        waveform = AF.resample(waveform, rate, model.sample_rate)
    x = model.preprocess(waveform.view(1, 1, -1), model.sample_rate)  # (1, 1, T') padded to the hop
    _, codes, _, _, _ = model.encode(x)  # (1, n_q, frames)
    return codes[0, :NUM_CODEBOOKS].to(torch.int16).numpy()


@torch.no_grad()
def decode(model, codes: np.ndarray) -> torch.Tensor:
    """Codes (K, frames) -> mono waveform (T,) at model.sample_rate."""
    c = torch.from_numpy(np.asarray(codes, dtype=np.int64))[None]  # (1, K, frames)
    z = model.quantizer.from_codes(c)[0]
    return model.decode(z)[0, 0]
