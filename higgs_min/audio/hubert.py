"""HuBERT-base in plain PyTorch: the semantic teacher inside the Higgs Audio v2 audio tokenizer.

The official tokenizer loads `bosonai/hubert_base` through transformers' AutoModel
(boson-ai/higgs-audio boson_multimodal/audio_processing/higgs_audio_tokenizer.py,
`HiggsAudioTokenizer.__init__`, semantic_techer == "hubert_base_general") and reads
all hidden states (`get_regress_target`). This module computes the same thing with
the same parameter names as transformers' `HubertModel` (feat_extract_norm="group",
do_stable_layer_norm=False, no masking at inference), so the released `model.pth`
keys under `semantic_model.` load unchanged.

    wav (B, S) at 16 kHz
      -> feature_extractor: 7 convs (512 ch, kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2:
         320 samples per frame, receptive field 400), GroupNorm(512 groups) after the first, GELU
      -> (B, F, 512) -> feature_projection: LayerNorm(512), Linear(512 -> 768)
      -> encoder: x + GELU(pos_conv(x)) (kernel 128, 16 groups, last frame dropped), LayerNorm
         = hidden_states[0]
      -> 12 post-norm layers: x = LN(x + MHA(x)); x = LN(x + FFN(x))  = hidden_states[1..12]
    returns the 13 hidden states, each (B, F, 768)

Dropouts are absent (inference only). The positional conv's weight norm (dim=2) is folded
into a plain weight by the loader (audio/tokenizer_files.py fold_weight_norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HubertConfig:
    """HuBERT-base defaults (facebook/hubert-base-ls960 layout, the transformers HubertConfig defaults)."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5

    def frames(self, samples: int) -> int:
        """Feature frames for `samples` input samples (each conv: floor((L - k) / s) + 1)."""
        for k, s in zip(self.conv_kernel, self.conv_stride):
            samples = (samples - k) // s + 1
        return samples


class _ConvLayer(nn.Module):
    def __init__(self, cin, cout, k, s, group_norm: bool):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride=s, bias=False)  # conv_bias=False in HuBERT-base
        if group_norm:  # one group per channel: GroupNorm(512, 512), first layer only
            self.layer_norm = nn.GroupNorm(cout, cout, affine=True)

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "layer_norm"):
            x = self.layer_norm(x)
        return F.gelu(x)


class _FeatureExtractor(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        dims = (1,) + tuple(c.conv_dim)
        self.conv_layers = nn.ModuleList(
            _ConvLayer(dims[i], dims[i + 1], c.conv_kernel[i], c.conv_stride[i], group_norm=(i == 0))
            for i in range(len(c.conv_dim)))

    def forward(self, wav):  # (B, S) -> (B, C, F)
        x = wav[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class _FeatureProjection(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c.conv_dim[-1], eps=c.layer_norm_eps)
        self.projection = nn.Linear(c.conv_dim[-1], c.hidden_size)

    def forward(self, x):
        return self.projection(self.layer_norm(x))


class _PosConv(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        k = c.num_conv_pos_embeddings
        self.conv = nn.Conv1d(c.hidden_size, c.hidden_size, k, padding=k // 2, groups=c.num_conv_pos_embedding_groups)
        self.remove = 1 if k % 2 == 0 else 0  # even kernel + padding k//2 gives one frame too many

    def forward(self, x):  # (B, F, H) -> (B, F, H)
        y = self.conv(x.transpose(1, 2))
        if self.remove:
            y = y[:, :, :-self.remove]
        return F.gelu(y).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.q_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x):
        b, n, h = x.shape
        split = lambda t: t.view(b, n, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        # no mask: one unpadded clip per call; scale 1/sqrt(head_dim) is SDPA's default
        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(o.transpose(1, 2).reshape(b, n, h))


class _FeedForward(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output_dense = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class _Layer(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.feed_forward = _FeedForward(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):  # post-norm (do_stable_layer_norm=False)
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class _Encoder(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.pos_conv_embed = _PosConv(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x) -> list[torch.Tensor]:
        x = self.layer_norm(x + self.pos_conv_embed(x))
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return states


class Hubert(nn.Module):
    """`forward(wav (B, S) at 16 kHz) -> list of num_hidden_layers + 1 tensors (B, F, hidden)`."""

    def __init__(self, config: HubertConfig = HubertConfig()):
        super().__init__()
        self.config = config
        self.feature_extractor = _FeatureExtractor(config)
        self.feature_projection = _FeatureProjection(config)
        self.encoder = _Encoder(config)

    def forward(self, wav: torch.Tensor) -> list[torch.Tensor]:
        feats = self.feature_extractor(wav).transpose(1, 2)  # (B, F, 512)
        return self.encoder(self.feature_projection(feats))
