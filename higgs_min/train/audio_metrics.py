"""What a generated clip is worth beside its reference: intelligibility, voice, length, silence.

    normalize(text) -> str                      the text normalization WER/CER are computed on (below)
    error_counts(reference, hypothesis) -> {"word_edits", "words", "char_edits", "chars"}
    error_rate(edits, n) -> float | None        Σ edits / Σ reference units (None without reference units)
    silence_fraction(wave, rate) -> float       share of 20 ms windows below -40 dBFS RMS
    Asr(folder).transcribe(wave, rate) -> str   a local transformers Whisper checkpoint (--eval-asr)
    Speaker(folder).similarity(a, b) -> float   cosine of WavLM x-vector embeddings (--eval-speaker)

WER and CER are Levenshtein distances (substitutions + deletions + insertions, each 1) between the normalized
reference and the normalized transcript, over words (split on whitespace) and over characters (spaces
included), divided by the reference's length -- jiwer's definitions (tests/test_audio_metrics.py compares
them on 1,000 seeded pairs). Over several samples the rate is Σ edits / Σ reference length (jiwer's corpus
rate), not the mean of per-sample rates.

The normalization is Whisper's BasicTextNormalizer (openai/whisper whisper/normalizers/basic.py, also
transformers' models/whisper/english_normalizer.py), the one its papers report for non-English text:
    lowercase; drop spans in [brackets], <angle brackets> and (parentheses); NFKC, then every character of a
    Unicode mark (M*), symbol (S*) or punctuation (P*) category becomes a space; runs of whitespace become one
    space; strip.
So "Hello, World!" and "hello world" match, "don't" becomes "don t", digits are kept as digits (the English
normalizer's number spelling is not applied: it is English-only and the demo set is half Arabic).

transformers is a test-only dependency of the project: it is imported here only when --eval-asr or
--eval-speaker names a folder, and its absence is one error line saying how to install it.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import torch

from higgs_min.errors import UsageError

ASR_RATE = SPEAKER_RATE = 16000  # Whisper's and WavLM's input rate
SILENCE_DBFS = -40.0
SILENCE_WINDOW_S = 0.02


# ----------------------------------------------------------------------------- text

def normalize(text: str) -> str:
    """Whisper's BasicTextNormalizer (see the module docstring)."""
    s = text.lower()
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)  # [noise], <unk>
    s = re.sub(r"\(([^)]+?)\)", "", s)  # (laughs)
    s = "".join(" " if unicodedata.category(c)[0] in "MSP" else c for c in unicodedata.normalize("NFKC", s))
    return re.sub(r"\s+", " ", s).strip()


def edit_distance(ref: list | str, hyp: list | str) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions turning ref into hyp.
    One row of the dynamic-programming table at a time: O(len(ref) * len(hyp)) time, O(len(hyp)) memory."""
    row = list(range(len(hyp) + 1))  # distance from ref[:0] to hyp[:j]
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def error_counts(reference: str, hypothesis: str) -> dict:
    """Word and character edits of the normalized hypothesis against the normalized reference."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    return {"word_edits": edit_distance(ref.split(), hyp.split()), "words": len(ref.split()),
            "char_edits": edit_distance(ref, hyp), "chars": len(ref)}


def error_rate(edits: int, n: int) -> float | None:
    """edits / n; None when the reference is empty (nothing to be wrong about)."""
    return edits / n if n > 0 else None


# ----------------------------------------------------------------------------- waveform

def silence_fraction(wave: torch.Tensor, rate: int) -> float:
    """Share of the clip's 20 ms windows whose RMS is below -40 dBFS (full scale = 1.0); a partial last window
    counts as a window. wave: (T,) float in [-1, 1]."""
    n = max(1, round(rate * SILENCE_WINDOW_S))
    w = wave.float().flatten()
    if w.numel() == 0:
        return 1.0
    w = torch.nn.functional.pad(w, (0, -w.numel() % n)).view(-1, n)  # (windows, n)
    rms = w.pow(2).mean(1).sqrt()
    return float((rms < 10 ** (SILENCE_DBFS / 20)).float().mean())


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    if rate == target:
        return wave
    import torchaudio.functional as AF  # arrives with descript-audio-codec

    return AF.resample(wave.float(), rate, target)


# ----------------------------------------------------------------------------- models (transformers, lazily)

def _transformers(flag: str, folder: Path):
    if not Path(folder).is_dir() or not (Path(folder) / "config.json").is_file():
        raise UsageError(f"{flag} {folder}: expected a transformers model folder with config.json "
                         f"(nothing is downloaded)")
    try:
        import transformers
    except ImportError as e:
        raise UsageError(f"{flag} needs the transformers package (a test-only dependency of higgs_min): "
                         f"pip install -r requirements-test.txt, or drop {flag}") from e
    return transformers


def _load(flag: str, folder: Path, device, what: str, preprocessor: str, model: str):
    """(preprocessor, model in eval mode on `device`) from a transformers folder, by their Auto class names;
    a folder that does not load is one UsageError naming the flag and `what` it should hold."""
    tf = _transformers(flag, folder)
    try:
        pre = getattr(tf, preprocessor).from_pretrained(str(folder))
        net = getattr(tf, model).from_pretrained(str(folder)).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{flag} {folder}: not a loadable {what}: {e}") from e
    return pre, net


class Asr:
    """A Whisper checkpoint folder (config.json, weights, the processor's files): clip -> transcript."""

    def __init__(self, folder: Path, device="cpu", max_new_tokens: int = 128):
        self.processor, self.model = _load("--eval-asr", folder, device, "Whisper checkpoint",
                                           "AutoProcessor", "AutoModelForSpeechSeq2Seq")
        # the decoder's positions bound prompt + answer (448 in the released checkpoints)
        limit = getattr(self.model.config, "max_target_positions", max_new_tokens + 8)
        self.device, self.max_new_tokens = device, min(max_new_tokens, limit - 8)

    @torch.no_grad()
    def transcribe(self, wave: torch.Tensor, rate: int) -> str:
        x = resample(wave, rate, ASR_RATE).cpu().numpy()
        feats = self.processor(x, sampling_rate=ASR_RATE, return_tensors="pt").input_features
        ids = self.model.generate(feats.to(self.device, self.model.dtype), max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class Speaker:
    """A WavLM x-vector checkpoint folder (WavLMForXVector + its feature extractor): clip -> embedding."""

    def __init__(self, folder: Path, device="cpu"):
        self.extractor, self.model = _load("--eval-speaker", folder, device, "x-vector checkpoint",
                                           "AutoFeatureExtractor", "AutoModelForAudioXVector")
        self.device = device

    @torch.no_grad()
    def embed(self, wave: torch.Tensor, rate: int) -> torch.Tensor:
        """(T,) at `rate` -> (D,) float32 x-vector."""
        x = resample(wave, rate, SPEAKER_RATE).cpu().numpy()
        inputs = self.extractor(x, sampling_rate=SPEAKER_RATE, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.model(**inputs).embeddings[0].float().cpu()

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Cosine of two embeddings (the usual x-vector verification score, in [-1, 1])."""
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
