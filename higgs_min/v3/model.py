"""The Higgs Audio v3 TTS model: a stock Qwen3 decoder with one fused, tied audio matrix.

    input_ids (B, L) ──text_embedding E (V, H)──────────────┐
                                                             ├─ x (B, L, H): an audio position takes ONLY
    audio_codes (B, L, K) ──sum_c W[code_c + c*(C+2)]───────┘   the fused sum (its input id is ignored)
    for each layer (Qwen3: v2's DecoderLayer with per-head q_norm / k_norm, no DualFFN):
        x += attn(input_layernorm(x));  x += mlp(post_attention_layernorm(x))
    hidden = norm(x)                                           (B, L, H)
    text logits  = hidden @ Eᵀ                                 (N, V)         tied to the text embedding
    audio logits = (hidden @ Wᵀ).view(N, K, C + 2)             (N, K, C + 2)  tied to the fused embedding

Serving code followed (sglang-omni 0.1.9, sglang_omni/models/higgs_tts/): modeling.py
`HiggsFusedMultiTextEmbedding` / `HiggsFusedMultiTextHead` (offset lookup, the head reshape), model.py
`HiggsTTSModel` (tie: the head IS the embedding Parameter; the backbone is Qwen3ForCausalLM with the text head
tied), model_runner.py `build_prefill_input_embeds` (audio positions replace the text embedding), utils.py
`truncate_rope_to_bf16` (RoPE cos/sin tables rounded to bf16, as Boson trained; here in every dtype).

State-dict names are the released checkpoint's (tied.embedding.text_embedding.weight, body.layers.N...,
body.norm.weight, tied.embedding.modality_embeddings.0.embedding.weight), so weights load and save without a
name map, and LoRA targets the same module names as v2 (q_proj ... down_proj). The forward takes v2's
arguments in v2's order and the same `KVCache`, so v2's loss, evaluation and cache machinery apply.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from higgs_min.model import DecoderLayer, RMSNorm, attention_plan, init_normal
from higgs_min.v3.config import V3Config


def rope_tables(cfg: V3Config, start: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, hd) for positions start .. start + length - 1, rounded to bf16, then `dtype`.

    The fp32 recipe of sglang's RotaryEmbedding (`_compute_inv_freq`, `_compute_cos_sin_cache`) and of
    transformers' default RoPE: inv_freq = 1 / theta ** (arange(0, hd, 2) / hd), angle = pos * inv_freq, all
    fp32; then utils.truncate_rope_to_bf16 (bf16 tables, "Higgs's bf16 training-time RoPE")."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    return emb.cos().to(torch.bfloat16).to(dtype), emb.sin().to(torch.bfloat16).to(dtype)


# ----------------------------------------------------------------------------- containers named as released

class FusedAudioEmbedding(nn.Module):
    """`tied.embedding.modality_embeddings.0`: the fused matrix (K * (C + 2), H) under `.embedding`."""

    def __init__(self, cfg: V3Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.audio_num_codebooks * cfg.audio_num_classes, cfg.hidden_size)


class TiedEmbeddings(nn.Module):
    """`tied.embedding`: the text embedding and the audio modality embeddings (heads are tied to both)."""

    def __init__(self, cfg: V3Config):
        super().__init__()
        self.text_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.modality_embeddings = nn.ModuleList([FusedAudioEmbedding(cfg)])


class Tied(nn.Module):
    def __init__(self, cfg: V3Config):
        super().__init__()
        self.embedding = TiedEmbeddings(cfg)


class Body(nn.Module):
    """`body`: the Qwen3 layers and the final norm."""

    def __init__(self, cfg: V3Config):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, dual_ffn=False, qk_norm=True)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- the model

class HiggsV3Model(nn.Module):
    def __init__(self, config: V3Config):
        super().__init__()
        config.validate()
        self.config = config
        self.tied = Tied(config)
        self.body = Body(config)
        self.activation_checkpointing = False  # True: recompute each decoder layer in backward (less memory)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def text_embedding(self) -> nn.Embedding:
        return self.tied.embedding.text_embedding

    @property
    def audio_embedding(self) -> nn.Embedding:
        """The fused audio matrix W (K * (C + 2), H): input embedding and audio head, one tensor."""
        return self.tied.embedding.modality_embeddings[0].embedding

    def init_weights(self):
        init_normal(self, self.config.initializer_range)

    def embed(self, input_ids, audio_codes, audio_mask):
        """input_ids (B, L); audio_codes (B, L, K) in [0, C+2), read where audio_mask (B, L) -> x (B, L, H).

        modeling.py HiggsFusedMultiTextEmbedding.forward: ids code_c + c * (C+2), embeddings summed over c,
        in the matrix's dtype (bf16 in serving), then cast to the activations' dtype."""
        x = self.text_embedding(input_ids)  # (B, L, H)
        if audio_mask is None or not audio_mask.any():
            return x
        b, l = audio_mask.nonzero(as_tuple=True)
        K, C2 = self.config.audio_num_codebooks, self.config.audio_num_classes
        offsets = torch.arange(K, device=audio_codes.device, dtype=audio_codes.dtype) * C2  # (K,)
        a = self.audio_embedding(audio_codes[b, l] + offsets).sum(dim=-2)  # (N, H)
        return x.index_put((b, l), a.to(x.dtype))

    def forward(self, input_ids, attention_mask=None, audio_codes=None, audio_mask=None, cache=None):
        """Return the final hidden states (B, L, H), after the final norm. v2's arguments (HiggsAudioModel.forward):

        attention_mask (B, L): 1 for real tokens, 0 for padding (None: no padding).
        audio_codes (B, L, K) long, audio_mask (B, L) bool: positions holding one delayed audio row.
        cache: a higgs_min.model.KVCache holding P positions; these L become P..P+L-1 (no padding then).
        Without a cache this is exactly the training forward.
        """
        B, L = input_ids.shape
        x = self.embed(input_ids, audio_codes, audio_mask)
        P, attn_mask = attention_plan(attention_mask, cache, L, x.device)
        cos, sin = rope_tables(self.config, P, L, x.device, x.dtype)  # broadcast over (B, nh, L, hd)
        for i, layer in enumerate(self.body.layers):
            # v2's DecoderLayer without DualFFN: (x, cos, sin, mask, audio_mask, routing, kv)
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, None, None, None,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, None, None, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.length = P + L
        return self.body.norm(x)

    def text_logits(self, hidden_rows):
        """hidden_rows (N, H) -> (N, V): the tied text head (Qwen3ForCausalLM with tie_word_embeddings)."""
        w = self.text_embedding.weight
        return F.linear(hidden_rows, w.to(hidden_rows.dtype))

    def audio_logits(self, hidden_rows):
        """hidden_rows (N, H) -> (N, K, C + 2): modeling.py HiggsFusedMultiTextHead.generate, tied to the
        fused embedding (a trained fp32 matrix is cast to the activations' dtype, as LoRA casts its input)."""
        w = self.audio_embedding.weight
        K, C2 = self.config.audio_num_codebooks, self.config.audio_num_classes
        return F.linear(hidden_rows, w.to(hidden_rows.dtype)).view(-1, K, C2)


def describe(preset: str = "v3-4b") -> str:
    """Parameter names, shapes and count of a preset, built on the meta device (no memory):
    `python -m higgs_min.v3 v3-4b`."""
    with torch.device("meta"):
        model = HiggsV3Model(V3Config.from_preset(preset))
    lines, total = [], 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".layers." not in name or ".layers.0." in name:
            lines.append(f"{name:60s} {tuple(p.shape)}")
    lines.append(f"(layers 1..{model.config.num_hidden_layers - 1}: as layer 0)")
    lines.append(f"{preset}: {total:,} parameters ({total / 1e9:.3f} B), the fused audio matrix counted once")
    return "\n".join(lines)
