"""The Higgs Audio v2 audio tokenizer (bosonai/higgs-audio-v2-tokenizer), encode and decode, in PyTorch.

Follows boson-ai/higgs-audio boson_multimodal/audio_processing/higgs_audio_tokenizer.py
(`HiggsAudioTokenizer`: `get_regress_target` L164-207, `_xcodec_encode` L263-294, `decode`
L296-309, `load_higgs_audio_tokenizer` L312-329) and what it imports; line numbers are of
that file unless another is named. Released shape (config.json): D=256, ratios [8,5,4,2,3]
(hop 960 = 25 frames/s at 24 kHz), n_q=8 codebooks of bins=1024, codebook_dim=64.

encode, wav (N,) at 24 kHz:
    x (1,1,N) ──resample 24k->16k (torchaudio sinc_interp_hann, below)──> pad 160|160
        └─ HuBERT-base (hubert.py): 13 hidden states, averaged ─> every 2nd frame ─> (1,T,768)
           └─ encoder_semantic (semantic_module.Encoder: conv + 2 blocks of ELU res units) ─> (1,768,T)
    x ──encoder (DAC Encoder(64, ratios, D): 2048 ch before the last conv)──> (1,D,Ta)
    Ta != T: encoder(pad(x, 320|320)), then both trimmed to the shorter          (L271-279)
    cat [acoustic; semantic] (1,D+768,T) ─> fc_prior ─> e (T,1024)   (a batch: B clips of one length)
    RVQ, layer i=0..7: h=project_in(r) (T,64); code=argmax -||h-E_i||^2 (core_vq_lsx_version
        EuclideanCodebook.quantize); r = r - project_out(E_i[code])             ─> codes (8,T)
decode, codes (8,T):
    q = sum_i project_out_i(E_i[codes[i]]) (T,1024) ─> fc_post2 (T,256) ─> decoder_2 ─> (960*T,)
    decoder_2 = DAC-style Decoder(D, 1024, ratios): ConvTranspose1d with output_padding = stride % 2
        and no final Tanh (descriptaudiocodec/dac/model/dac.py L94-149, the official copy).

Frames: T = N / 960 when N is a multiple of 960 (acoustic and semantic paths agree); otherwise the
official count `frames(N)` below (the shorter of the two paths after the padded re-encode): 1000 samples give
1 frame, not 2. Clips under 960 samples (40 ms) are refused (the official gives no frame or fails there).

Loading (`load`): any of the three layouts users download (audio/tokenizer_files.py): the original
folder (config.json + model.pth, read only with torch.load(weights_only=True), or the model.safetensors
`python -m higgs_min.prepare convert-audio-tokenizer` writes), transformers' folder, or the codec inside
a Higgs Audio v3 model folder. Tensors are renamed to the official names, weight norm (weight_g/weight_v,
or parametrizations original0/original1) is folded with torch._weight_norm, the very function the
official forward calls on every step, so the folded weights are bitwise those the official model uses.
Strict: every tensor is consumed or training-only; one error names the rest. The identity
(`higgs-audio-v2-tokenizer:<sha16>`) hashes those official-named folded tensors, so it is the same
whichever layout held the same weights. Only encoding/decoding is done here; the official's training path
(fc_post1, decoder_semantic, EMA codebook updates) is not, and its tensors are dropped by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from higgs_min.audio.layers import SEMANTIC_RATE, Decoder, Encoder, SemanticEncoder, resample
from higgs_min.audio.hubert import Hubert, HubertConfig
from higgs_min.audio import tokenizer_files as files
from higgs_min.audio.tokenizer_files import AudioTokenizerError

NAME = "higgs-audio-v2-tokenizer"
# The official constructor's arguments (L44-64; n_filters, target_bandwidths, last_layer_semantic and
# semantic_mode do not change inference with bandwidth None) and higgs_min's test-size widths.
KNOWN_CONFIG_KEYS = {"n_filters", "D", "codebook_dim", "target_bandwidths", "ratios", "sample_rate", "bins", "n_q",
                     "semantic_techer", "last_layer_semantic", "merge_mode", "downsample_mode", "semantic_mode",
                     "vq_scale", "semantic_sample_rate", "causal", "normalize", "encoder_dim", "decoder_dim", "hubert"}


@dataclass(frozen=True)
class AudioTokenizerConfig:
    """The released config.json fields that matter, plus three widths the official hard-codes
    (encoder_dim 64 and decoder_dim 1024 at L74/L76, HuBERT-base); tests shrink those."""
    D: int = 256
    codebook_dim: int = 64
    ratios: tuple = (8, 5, 4, 2, 3)
    sample_rate: int = 24000
    bins: int = 1024
    n_q: int = 8
    semantic_techer: str = "hubert_base_general"
    encoder_dim: int = 64
    decoder_dim: int = 1024
    hubert: HubertConfig = field(default_factory=HubertConfig)

    @property
    def hop(self) -> int:
        return int(np.prod(self.ratios))

    @property
    def semantic_factor(self) -> int:  # L107: int(hop / (sr / semantic_sr) / 320) = 2 for the release
        return int(self.hop / (self.sample_rate / SEMANTIC_RATE) / 320)

    @classmethod
    def from_json(cls, path: Path) -> "AudioTokenizerConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise AudioTokenizerError(f"{path}: cannot read the tokenizer config: {e}") from e
        return cls.from_json_dict(raw, path)

    @classmethod
    def from_json_dict(cls, raw: dict, path="config.json") -> "AudioTokenizerConfig":
        unknown = sorted(set(raw) - KNOWN_CONFIG_KEYS)
        if unknown:
            raise AudioTokenizerError(f"{path}: unknown tokenizer config keys {unknown}")
        if not isinstance(raw.get("bins", 1024), int):
            raise AudioTokenizerError(f"{path}: bins={raw['bins']!r}: only the RVQ quantizer (integer bins) "
                                      "is implemented, not RFSQ")
        if raw.get("semantic_sample_rate", SEMANTIC_RATE) != SEMANTIC_RATE:
            raise AudioTokenizerError(f"{path}: semantic_sample_rate must be {SEMANTIC_RATE} (HuBERT-base)")
        if raw.get("semantic_techer", "hubert_base_general") not in ("hubert_base_general", "hubert_base"):
            raise AudioTokenizerError(f"{path}: semantic_techer {raw['semantic_techer']!r}: only the HuBERT-base "
                                      "teachers (hubert_base_general, hubert_base) are implemented")
        for key, official in (("merge_mode", "concat"), ("downsample_mode", "step_down"), ("vq_scale", 1),
                              ("causal", False), ("normalize", False)):
            if raw.get(key, official) != official:
                raise AudioTokenizerError(f"{path}: {key}={raw[key]!r} is not implemented (only {official!r})")
        kw = {k: raw[k] for k in ("D", "codebook_dim", "sample_rate", "bins", "n_q", "semantic_techer",
                                  "encoder_dim", "decoder_dim") if k in raw}
        if "ratios" in raw:
            kw["ratios"] = tuple(raw["ratios"])
        if "hubert" in raw:  # higgs_min extension, for small test models only
            kw["hubert"] = HubertConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["hubert"].items()})
        return cls(**kw)

    def frames(self, n: int) -> int:
        """Codes frames for n samples, the official count (L266-279), computed from conv arithmetic."""
        def acoustic(length):
            for s in self.ratios:  # DAC EncoderBlock conv: kernel 2s, stride s, padding ceil(s/2)
                length = (length + 2 * math.ceil(s / 2) - 2 * s) // s + 1
            return length
        g = math.gcd(self.sample_rate, SEMANTIC_RATE)  # resample's output length, as torchaudio computes it
        resampled = math.ceil(SEMANTIC_RATE // g * n / (self.sample_rate // g))
        semantic = -(-self.hubert.frames(resampled + 320) // self.semantic_factor)
        a = acoustic(n)
        if a != semantic:
            a = acoustic(n + 2 * 160 * self.semantic_factor)
        return min(a, semantic)


class _VQ(nn.Module):  # core_vq_lsx_version.VectorQuantization, inference only (L290-375)
    def __init__(self, dim, cdim, bins):
        super().__init__()
        self.project_in = nn.Linear(dim, cdim) if cdim != dim else nn.Identity()
        self.project_out = nn.Linear(cdim, dim) if cdim != dim else nn.Identity()
        self._codebook = nn.Module()
        self._codebook.register_buffer("embed", torch.zeros(bins, cdim))


class _RVQ(nn.Module):
    def __init__(self, dim, cdim, bins, n_q):
        super().__init__()
        self.vq = nn.Module()
        self.vq.layers = nn.ModuleList(_VQ(dim, cdim, bins) for _ in range(n_q))


class HiggsAudioTokenizerModel(nn.Module):
    """The official module tree and parameter names, without the training-only parts."""

    def __init__(self, c: AudioTokenizerConfig):
        super().__init__()
        self.config = c
        h = c.hubert.hidden_size
        self.encoder = Encoder(c.encoder_dim, c.ratios, c.D)  # L74: dac2.Encoder(64, ratios, D)
        self.decoder_2 = Decoder(c.D, c.decoder_dim, c.ratios)  # L76: dac2.Decoder(D, 1024, ratios)
        self.semantic_model = Hubert(c.hubert)
        self.encoder_semantic = SemanticEncoder(h)
        self.fc_prior = nn.Linear(c.D + h, c.D + h)
        self.fc_post2 = nn.Linear(c.D + h, c.D)
        self.quantizer = _RVQ(c.D + h, c.codebook_dim, c.bins, c.n_q)

    def semantic_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N) at sample_rate -> (B, T, 768): get_regress_target (L164-207)."""
        x = resample(x, self.config.sample_rate, SEMANTIC_RATE)
        states = self.semantic_model(F.pad(x, (160, 160)))
        target = torch.stack(states, dim=1).mean(1)  # average of all 13 hidden states (L175-178)
        return target[:, ::self.config.semantic_factor] if self.config.semantic_factor > 1 else target

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N) float at sample_rate, B clips of the same length -> codes (B, n_q, T) int64:
        _xcodec_encode (L263-294). Each clip's codes are those it gets alone (AudioTokenizer.encode_batch)."""
        x = x[:, None]  # (B, 1, N)
        e_sem = self.encoder_semantic(self.semantic_features(x[:, 0]).transpose(1, 2))  # (B, 768, T)
        e_ac = self.encoder(x)  # (B, D, Ta)
        if e_ac.shape[2] != e_sem.shape[2]:  # L271-273: re-encode padded by 160 * semantic factor
            pad = 160 * self.config.semantic_factor
            e_ac = self.encoder(F.pad(x, (pad, pad)))
        t = min(e_ac.shape[2], e_sem.shape[2])  # L275-279: trim to the shorter
        e = self.fc_prior(torch.cat([e_ac[:, :, :t], e_sem[:, :, :t]], dim=1).transpose(1, 2))  # (B, T, 1024)
        return torch.stack([self.quantize(clip) for clip in e])  # one clip at a time: the same matmuls as alone

    def quantize(self, e: torch.Tensor) -> torch.Tensor:
        """(T, D+768) -> codes (n_q, T): ResidualVectorQuantization.forward (core_vq_lsx_version L387-405)
        in eval mode: per layer, nearest entry of project_in(residual), minus its project_out."""
        residual, codes = e, []
        for layer in self.quantizer.vq.layers:
            h = layer.project_in(residual)
            embed = layer._codebook.embed.t()
            dist = -(h.pow(2).sum(1, keepdim=True) - 2 * h @ embed + embed.pow(2).sum(0, keepdim=True))
            idx = dist.max(dim=-1).indices  # EuclideanCodebook.quantize (L225-229): the official expression
            residual = residual - layer.project_out(F.embedding(idx, layer._codebook.embed))
            codes.append(idx)
        return torch.stack(codes)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n_q, T) -> (T, D+768): ResidualVectorQuantization.decode (L419-425), summed from 0 in order."""
        q = torch.tensor(0.0, device=codes.device)
        for layer, idx in zip(self.quantizer.vq.layers, codes):
            q = q + layer.project_out(F.embedding(idx, layer._codebook.embed))
        return q

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n_q, T) -> wav (hop * T,): decode (L296-309): fc_post2, then decoder_2."""
        return self.decoder_2(self.fc_post2(self.dequantize(codes)).t()[None])[0, 0]


# ---- loading ------------------------------------------------------------------------------------

def load_state(folder: str | Path) -> tuple[AudioTokenizerConfig, dict, files.Found]:
    """Any of the three layouts (audio/tokenizer_files.py) -> (config, {official name: float32 tensor},
    what was found). Folded, renamed, then checked strictly against the model the config describes."""
    found = files.read_folder(folder)
    cfg = AudioTokenizerConfig.from_json_dict(found.config, Path(folder) / "config.json")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in HiggsAudioTokenizerModel(cfg).state_dict().items()}
    state = files.fold_weight_norm(found.tensors)
    shown = lambda k: k  # noqa: E731  errors name each tensor as the file does
    if found.transformers_names:
        state = files.to_our_names(state, expected)
        shown = lambda k: found.prefix + (files.transformers_name(k) if k in expected else k)  # noqa: E731
    state = files.check_and_filter(state, expected, found.source, cfg.n_q, shown)
    return cfg, {k: v.float().contiguous() for k, v in state.items()}, found


def weights_sha16(state: dict) -> str:
    """sha256 of the folded tensors in safetensors layout (same for .pth and converted files)."""
    from higgs_min.atomic import safetensors_chunks
    h = hashlib.sha256()
    for chunk in safetensors_chunks(state):
        h.update(chunk)
    return h.hexdigest()[:16]


def keep_freed_blocks(block: int = 128 << 20, top: int = 1 << 30) -> bool:
    """Have glibc's malloc reuse freed blocks up to `block` bytes (process-wide; a no-op off glibc).

    By default glibc serves each allocation over 32 MiB (its dynamic threshold's cap) with a fresh mmap and unmaps
    it on free, so every large activation (the acoustic encoder's first stage is (64, 24000 x seconds) float32:
    61 MB at 10 s; HuBERT's first conv output 65 MB) faults all its 4 KiB pages in again, each zeroed by the
    kernel: about 400k faults and 0.7 s of system time in a 4 s encode of a 10 s clip (1 thread), 100k faults
    and 0.2 s in decode. With blocks up to `block` served from the heap, and up to `top` bytes of free heap
    kept rather than trimmed, a freed block's pages serve the next tensor: no faults after the first call.
    Only where tensors live changes, never what is computed. The price: memory a call frees stays with the
    process, and heap fragmentation raises the peak somewhat (a 60 s clip's encode: 1.8 -> 2.1 GiB over the
    weights). Larger `block`s fragment more (1 GiB: 3.4 GiB at 60 s). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: leave its allocator alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, block)) and bool(mallopt(M_TRIM_THRESHOLD, top))


class AudioTokenizer:
    """An auditor's handle: encode (N,) -> (8, T) int64, decode (8, T) -> (960 T,) float, at 24 kHz.
    On CPU it sets glibc's malloc to reuse large freed blocks (keep_freed_blocks: a process-wide setting)."""

    def __init__(self, model: HiggsAudioTokenizerModel, identity: str, dtype=torch.float32):
        self.model, self.identity, self.dtype = model.eval(), identity, dtype
        if self.device.type == "cpu":
            keep_freed_blocks()
        c = model.config
        self.sample_rate, self.num_codebooks, self.codebook_size = c.sample_rate, c.n_q, c.bins
        self.frame_rate = math.ceil(c.sample_rate / c.hop)  # L69
        self.hop = c.hop

    @property
    def device(self):
        return next(self.model.parameters()).device

    def checked_wav(self, wav) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav)
        if x.dim() != 1 or not x.is_floating_point() or x.numel() == 0:
            raise ValueError(f"encode takes a non-empty 1-D float waveform at {self.sample_rate} Hz, "
                             f"got {tuple(x.shape)} {x.dtype}")
        if x.numel() < self.hop:  # shorter clips give no frame, or fail in the official's first encoder call
            raise ValueError(f"a clip of {x.numel()} samples is shorter than one frame; give at least {self.hop} "
                             f"samples ({1000 * self.hop // self.sample_rate} ms)")
        return x

    def encode(self, wav) -> torch.Tensor:
        """wav (N,) float at sample_rate -> codes (n_q, T) int64."""
        x = self.checked_wav(wav)
        with torch.inference_mode():
            return self.model.encode(x.to(self.device, self.dtype)[None])[0].cpu().long()

    def encode_batch(self, wavs, max_batch: int = 4) -> list[torch.Tensor]:
        """Several clips -> their codes, in order, each exactly what encode(wav) gives it.

        Only clips of the same length (in samples) are encoded together, up to max_batch at a time; the others
        one by one. Padding to a common length would change the codes, not only near the padded end:
        HuBERT's first layer normalizes each channel over the whole clip (GroupNorm), its attention sees
        every frame, and each DAC conv's zero padding at a clip's end would read the padded region's
        activations instead of zeros. Exactness within a batch rests on every op computing a clip's rows as
        it does alone (convs per batch element, the same matmuls per row); tests check it bit for bit."""
        xs = [self.checked_wav(w) for w in wavs]
        out: list = [None] * len(xs)
        by_length: dict[int, list[int]] = {}
        for i, x in enumerate(xs):
            by_length.setdefault(x.numel(), []).append(i)
        for group in by_length.values():
            for a in range(0, len(group), max_batch):
                idx = group[a:a + max_batch]
                with torch.inference_mode():
                    codes = self.model.encode(torch.stack([xs[i] for i in idx]).to(self.device, self.dtype))
                for i, c in zip(idx, codes.cpu().long()):
                    out[i] = c
        return out

    def decode(self, codes) -> torch.Tensor:
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).long()
        if c.dim() != 2 or c.shape[0] != self.num_codebooks:
            raise ValueError(f"decode takes codes ({self.num_codebooks}, T), got {tuple(c.shape)}")
        if c.numel() and (c.min() < 0 or c.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size - 1}]: {int(c.min())}..{int(c.max())}")
        with torch.inference_mode():
            return self.model.decode(c.to(self.device)).float().cpu()

    def encode_file(self, path, max_seconds: float | None = None) -> torch.Tensor:
        """Any integer-PCM wav (codec.read_wav): channels averaged to mono, resampled to 24 kHz with `resample`."""
        from higgs_min.audio.codec import read_wav
        x, rate = read_wav(path)
        if max_seconds is not None and x.numel() / rate > max_seconds:
            raise ValueError(f"{path}: {x.numel() / rate:.1f} s is longer than the limit of {max_seconds:g} s "
                             "(--max-seconds); split the clip")
        return self.encode(resample(x, rate, self.sample_rate))


def load(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> AudioTokenizer:
    """A tokenizer folder in any layout, or a v3 model folder (load_state) -> AudioTokenizer (eval, no grad).
    fp32 on CPU; another dtype only on CUDA."""
    if torch.device(device).type == "cpu" and dtype != torch.float32:
        raise ValueError("the audio tokenizer runs in float32 on CPU; --dtype applies on CUDA only")
    cfg, state, _ = load_state(path)
    with torch.device("meta"):
        model = HiggsAudioTokenizerModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return AudioTokenizer(model.to(device, dtype), f"{NAME}:{weights_sha16(state)}", dtype)


def convert_main(argv) -> int:
    """prepare convert-audio-tokenizer SRC OUT: any tokenizer layout (original model.pth, transformers, the
    codec inside a v3 model folder) -> OUT/model.safetensors (official names, folded, strict) + config.json
    (the original layout's form), which loads without pickle and with the same identity."""
    import argparse
    from higgs_min.atomic import json_bytes, replace_file, safetensors_chunks
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.prepare convert-audio-tokenizer",
                                 description=convert_main.__doc__)
    ap.add_argument("src", type=Path, help="the tokenizer folder (any layout) or a Higgs Audio v3 model folder")
    ap.add_argument("out", type=Path, help="output folder (created; not SRC)")
    args = ap.parse_args(argv)
    if args.out.resolve() == args.src.resolve():
        print(f"error: {args.out}: OUT must be another folder than SRC (SRC's files would be replaced)",
              file=sys.stderr)
        return 2
    try:
        _, state, found = load_state(args.src)
    except AudioTokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("model.safetensors", safetensors_chunks(state)), ("config.json", json_bytes(found.config))):
        replace_file(args.out / name, data)
    print(f"wrote {args.out}/model.safetensors ({len(state)} tensors from {found.source}, {found.layout} layout); "
          f"identity {NAME}:{weights_sha16(state)}")
    return 0
