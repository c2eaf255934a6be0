"""Layers of the Higgs Audio v2 audio tokenizer (used by audio_tokenizer.py), each as the official writes it.

Line numbers cite boson-ai/higgs-audio boson_multimodal/audio_processing/: semantic_module.py for the
semantic encoder, descriptaudiocodec/dac/model/dac.py and dac/nn/layers.py (the official copy of DAC)
for the acoustic encoder and decoder. Shapes are (B, C, T) throughout. `resample` is the 24k -> 16k step
of higgs_audio_tokenizer.py L165 (torchaudio.functional.resample with its defaults).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SEMANTIC_RATE = 16000  # HuBERT-base's input rate


def resample(x: torch.Tensor, orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """(..., N) -> (..., ceil(N * new / orig)): windowed-sinc (Hann) resampling, the computation of
    torchaudio.functional.resample with its defaults (the official call, L165), in x's dtype."""
    if orig == new:
        return x
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff  # cutoff below the lower Nyquist
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=x.dtype, device=x.device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=x.dtype, device=x.device)[:, None, None] / new + idx  # (new, 1, taps)
    t = (t * base).clamp_(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t) * (window * (base / orig))
    shape = x.shape
    flat = F.pad(x.reshape(-1, shape[-1]), (width, width + orig))
    y = F.conv1d(flat[:, None], kernel, stride=orig).transpose(1, 2).reshape(flat.shape[0], -1)
    return y[:, :math.ceil(new * shape[-1] / orig)].reshape(*shape[:-1], -1)


# ---- layers the official writes itself (semantic_module.py, dac.py Decoder) --------------------

class _Wrapped(nn.Module):
    """semantic_module.Conv1d: an nn.Conv1d under `.conv` with padding (k-1)//2*dilation (L16-54)."""

    def __init__(self, cin, cout, k, dilation=1, bias=True):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, padding=(k - 1) // 2 * dilation, dilation=dilation, bias=bias)

    def forward(self, x):
        return self.conv(x)


class _SemResUnit(nn.Module):  # semantic_module.ResidualUnit (L57-83): x + conv2(elu(conv1(elu(x)))), no biases
    def __init__(self, c):
        super().__init__()
        self.conv1 = _Wrapped(c, c, 3, bias=False)
        self.conv2 = nn.Conv1d(c, c, 1, bias=False)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class _SemBlock(nn.Module):  # semantic_module.EncoderBlock (L125-147), stride 1, dilations (1, 1)
    def __init__(self, c):
        super().__init__()
        self.res_units = nn.ModuleList([_SemResUnit(c), _SemResUnit(c)])
        self.conv = _Wrapped(c, c, 3)

    def forward(self, x):
        for unit in self.res_units:
            x = unit(x)
        return self.conv(x)


class SemanticEncoder(nn.Module):  # semantic_module.Encoder(768, 768) with its defaults (L150-190)
    def __init__(self, c):
        super().__init__()
        self.conv = _Wrapped(c, c, 3, bias=False)
        self.conv_blocks = nn.ModuleList([_SemBlock(c), _SemBlock(c)])

    def forward(self, x):
        x = self.conv(x)
        for block in self.conv_blocks:
            x = block(x)
        return x


# ---- the DAC layers (descriptaudiocodec/dac/model/dac.py and dac/nn/layers.py of the official copy) ----
# Written here with plain convs rather than imported from the pinned descript-audio-codec: its convs
# carry weight norm (folded at load here), importing it costs seconds, and its Decoder differs from
# the official one anyway. tests/test_audio_tokenizer.py checks names and outputs against the pinned dac.

SNAKE_SLICE = 1 << 17  # elements per time slice of the inference Snake (512 KiB of float32: stays in L2)


def snake_into(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Inference Snake, x (B, C, T) -> out (B, C, T) (out may be x itself): x + 1/(alpha + 1e-9) * sin(alpha x)^2.

    Computed one time slice at a time in one small reused buffer: the five elementwise passes then run on data
    in the core's cache instead of streaming a whole activation (61 MB at the encoder's first stage) five times,
    and no full-size temporary is allocated (a fresh one costs a page fault per 4 KiB; over 32 MB glibc maps
    it anew on every call). Bit for bit the formula: every element goes through the same operations in the
    same order (pow(2) is s * s; products and sums are commutative in IEEE arithmetic); only the slicing differs.
    """
    inv = (alpha + 1e-9).reciprocal()  # (1, C, 1)
    step = max(1, SNAKE_SLICE // (x.shape[0] * x.shape[1])) if x.is_cpu else x.shape[2]  # a GPU: one slice
    buf = x.new_empty(x.shape[0], x.shape[1], min(step, x.shape[2]))  # (B, C, step)
    for a in range(0, x.shape[2], step):
        xs = x[:, :, a:a + step]
        s = buf[:, :, :xs.shape[2]]
        torch.mul(alpha, xs, out=s).sin_()
        s.mul_(s).mul_(inv)
        torch.add(s, xs, out=out[:, :, a:a + step])
    return out


class Snake1d(nn.Module):  # dac/nn/layers.py snake: x + 1/(alpha + 1e-9) * sin(alpha x)^2
    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x, overwrite: bool = False):
        """x (B, C, T) -> (B, C, T). In inference with overwrite=True the result is written over x (callers
        pass it only for a temporary nobody else reads: _Chain)."""
        if torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad):
            return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)
        return snake_into(x, self.alpha, x if overwrite else torch.empty_like(x))


class _Chain(nn.Sequential):
    """nn.Sequential (same parameter names) whose Snakes, past the first layer, overwrite their input in
    inference: that input is the previous layer's fresh output, read by nobody else. One full-size
    allocation fewer per Snake."""

    def forward(self, x):
        for i, layer in enumerate(self):
            x = layer(x, overwrite=True) if i and isinstance(layer, Snake1d) else layer(x)
        return x


class ResidualUnit(nn.Module):  # dac.py ResidualUnit (L24-40); lengths are equal, so no crop is needed
    def __init__(self, dim, dilation):
        super().__init__()
        self.block = _Chain(Snake1d(dim), nn.Conv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation),
                            Snake1d(dim), nn.Conv1d(dim, dim, 1))

    def forward(self, x):
        if torch.is_grad_enabled():
            return x + self.block(x)
        return self.block(x).add_(x)  # inference: into the block's fresh output, bit for bit x + block(x)


class EncoderBlock(nn.Module):  # dac.py EncoderBlock (L43-61)
    def __init__(self, dim, stride):
        super().__init__()
        self.block = _Chain(
            ResidualUnit(dim // 2, 1), ResidualUnit(dim // 2, 3), ResidualUnit(dim // 2, 9), Snake1d(dim // 2),
            nn.Conv1d(dim // 2, dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))

    def forward(self, x):
        return self.block(x)


class Encoder(nn.Module):  # dac.py Encoder(d_model, strides, d_latent) (L64-91): channels double per block
    def __init__(self, d_model, strides, d_latent):
        super().__init__()
        layers = [nn.Conv1d(1, d_model, 7, padding=3)]
        for s in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, s))
        layers += [Snake1d(d_model), nn.Conv1d(d_model, d_latent, 3, padding=1)]
        self.block = _Chain(*layers)

    def forward(self, x):
        return self.block(x)


class _ConvTranspose1d(nn.ConvTranspose1d):
    """nn.ConvTranspose1d whose CPU inference hands oneDNN channels-last tensors. Its transposed convolution
    computes in channels-last (acdb) either way: given a plain (B, C, T) tensor it first reorders the input, and
    PyTorch turns the output back to plain with a strided gather (at 64 x 80000 -> 32 x 240000 that copy costs
    about what the convolution does). Here both transpositions are blocked 2-D copies, and the primitive gets
    the same bytes in the same layout: the output is bitwise nn.ConvTranspose1d's (tests check it)."""

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, T')
        if torch.is_grad_enabled() or not x.is_cpu or x.dim() != 3:
            return super().forward(x)
        b, c, t = x.shape
        x_tc = x.new_empty(b, t, c)  # (B, T, Cin): channels-last memory
        for i in range(b):
            x_tc[i].copy_(x[i].t())  # a contiguous destination and a transposed source: PyTorch's blocked copy
        y = F.conv_transpose2d(x_tc.transpose(1, 2)[:, :, None], self.weight[:, :, None], self.bias,
                               (1, self.stride[0]), (0, self.padding[0]), (0, self.output_padding[0]))
        out = x.new_empty(b, y.shape[1], y.shape[3])  # (B, Cout, T'), y (B, Cout, 1, T') is channels-last
        for i in range(b):
            out[i].copy_(y[i, :, 0])
        return out


class _DecoderBlock(nn.Module):  # dac.py DecoderBlock (L94-113) of the official copy
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.block = _Chain(
            Snake1d(cin),
            _ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                             output_padding=stride % 2),  # the official's change: exactly stride x length
            ResidualUnit(cout, 1), ResidualUnit(cout, 3), ResidualUnit(cout, 9))

    def forward(self, x):
        return self.block(x)


class Decoder(nn.Module):  # dac.py Decoder(input_channel, channels, rates) (L116-149): no final Tanh
    def __init__(self, cin, channels, rates):
        super().__init__()
        layers = [nn.Conv1d(cin, channels, 7, padding=3)]
        for i, s in enumerate(rates):
            layers.append(_DecoderBlock(channels // 2 ** i, channels // 2 ** (i + 1), s))
        out = channels // 2 ** len(rates)
        layers += [Snake1d(out), nn.Conv1d(out, 1, 7, padding=3)]
        self.model = _Chain(*layers)

    def forward(self, x):
        return self.model(x)
