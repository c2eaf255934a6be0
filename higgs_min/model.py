"""The Higgs Audio v2 model: a Llama-3 decoder with a DualFFN audio path.

    input_ids (B, L) ──embed_tokens──┐
                                      ├─ x (B, L, H): audio positions take the sum of
    audio_codes (B, L, K) ──codebook──┘   their K codebook embeddings instead (mean if audio_embed_avg)
    for each layer:
        text rows:  x += attn(input_layernorm(x));        x += mlp(post_attention_layernorm(x))
        audio rows: x += attn(audio_input_layernorm(x));  x += audio_mlp(audio_post_attention_layernorm(x))
        (attention is one shared self-attention over all rows; the DualFFN split
         only applies in layers listed in `audio_dual_ffn_layers`. Other layers are
         plain Llama layers for every row (audio_adapter_type "dual_ffn"), or, for
         "dual_ffn_fast_forward" (the release), "fast-forward" layers: audio rows
         pass through unchanged and text rows attend to text keys only.)
    hidden = norm(x)                                          (B, L, H)
    text logits  = audio_decoder_proj.text_lm_head(hidden rows)   (N, V)
    audio logits = audio_decoder_proj.audio_lm_head(hidden rows)  (N, K, C + 2)

The forward returns hidden states only; heads are applied by the caller to the
rows it scores (see loss.py), so nobody builds (B, L, V) logits by accident.
State-dict names are the released checkpoint's names exactly (higgs-v2-3b: 397 tensors, 5,771,283,456
parameters): embed_tokens, layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.*, layers.N.audio_mlp.*, four
layernorms per layer, norm, audio_codebook_embeddings (one Embedding(K·(C+2), H), codebook k offset by
k·(C+2)), audio_decoder_proj.text_lm_head, audio_decoder_proj.audio_lm_head.

Generation passes a `KVCache`: the L new positions sit at P..P+L-1 after the P
cached ones (RoPE at those positions), their keys/values are written into the
preallocated per-layer buffers, and each new query sees every cached key plus the
new keys up to itself (a causal mask aligned to the bottom right).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from higgs_min.config import ModelConfig
from higgs_min.lora import LoRALinear, shared_input
from higgs_min.ops import permute_rows, swiglu, swiglu_lora_in


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * self.normalize(x)

    def normalize(self, x):
        """x / rms(x), without the weight (two norms of the same eps share it: DecoderLayer)."""
        # Normalize in fp32 (as Llama does) whatever the compute dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@torch.no_grad()
def init_normal(module: nn.Module, std: float) -> None:
    """Every linear and embedding weight ~ N(0, std) (the config's initializer_range), every RMSNorm weight 1:
    how both model families are initialized when no weights are loaded (a preset run's seeded base)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, RMSNorm):
            m.weight.fill_(1.0)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with Llama-3 scaling when configured.

    Llama-3 scaling leaves high frequencies (short wavelengths) alone, divides
    low frequencies by `factor`, and blends linearly in between.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq.float()
    if rs.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling type {rs.get('rope_type')!r} is not supported (only 'llama3')")
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((orig / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > orig / low, inv_freq / factor, blended)
    out = torch.where(wavelen < orig / high, inv_freq, out)
    return out.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_plan(attention_mask, cache, L: int, device) -> tuple[int, torch.Tensor | None]:
    """Where L new positions start (P, the cached length) and their attention mask.

    attention_mask (B, L): 1 real / 0 padding, or None. Returns (P, mask): mask None means plain causal (or,
    for one cached step, every key); else bool (B or 1, 1, L, P + L), True = may attend.
    """
    P = 0
    if cache is not None:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("forward with a KV cache: padding (attention_mask zeros) is not supported")
        P = cache.length
        if P + L > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {P} used + {L} new do not fit")
    attn_mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        attn_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)
    if cache is not None and P > 0 and L > 1:
        # Chunked prefill: query i (position P+i) sees keys 0..P+i, a causal mask aligned bottom right.
        attn_mask = torch.ones(L, P + L, dtype=torch.bool, device=device).tril(diagonal=P)[None, None]
    return P, attn_mask


class KVCache:
    """Preallocated keys and values of every layer for one generation (batch B, usually 1).
    cfg: any config with num_hidden_layers, num_key_value_heads and head_dim (v2's ModelConfig, v3's V3Config).

    keys[i] / values[i]: (B, nkv, max_len, hd); positions [0, length) are filled.
    `HiggsAudioModel.forward(..., cache=c)` appends its L positions and advances `length`.
    """

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len, self.length = max_len, 0
        # which positions hold audio: fast-forward layers hide those keys from text queries (see DecoderLayer)
        self.audio = torch.zeros(batch, max_len, dtype=torch.bool, device=device)

    def layer(self, i: int) -> "_LayerKV":
        return _LayerKV(self, i)


class _LayerKV:
    """One layer's slot of a KVCache for the current forward (positions length .. length + L - 1)."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def append(self, k, v):
        """k, v (B, nkv, L, hd) -> every key/value so far, (B, nkv, P + L, hd)."""
        c, P, L = self.cache, self.cache.length, k.shape[2]
        c.keys[self.i][:, :, P:P + L] = k
        c.values[self.i][:, :, P:P + L] = v
        return c.keys[self.i][:, :, :P + L], c.values[self.i][:, :, :P + L]


class Attention(nn.Module):
    """Grouped-query self-attention through scaled_dot_product_attention.

    qk_norm (Qwen3, used by higgs_min.v3): q and k are RMS-normalized per head (over head_dim, weights
    `q_norm` / `k_norm` of shape (hd,)) before RoPE, as transformers' Qwen3Attention.forward."""

    def __init__(self, cfg, qk_norm: bool = False):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(self, x, cos, sin, attn_mask, kv=None):
        B, L, _ = x.shape
        q, k, v = shared_input((self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(B, L, self.nh, self.hd)  # (B, L, nh, hd)
        k = k.view(B, L, self.nkv, self.hd)  # (B, L, nkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, L, hd), (B, nkv, L, hd)
        v = v.view(B, L, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, L, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            k, v = kv.append(k, v)  # (B, nkv, P + L, hd)
        if attn_mask is None:
            # Square: causal (SDPA's is_causal is top-left aligned, right only when keys == queries).
            # Otherwise one cached step: its single query sees every key.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=k.shape[2] == L, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, L, self.nh * self.hd)  # (B, L, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        g, u = shared_input((self.gate_proj, self.up_proj), x)  # (…, I) each
        if isinstance(self.down_proj, LoRALinear) and self.down_proj.factored:  # backward keeps g and u, not h too
            return self.down_proj.base_plus_update(*swiglu_lora_in(g, u, self.down_proj.lora_A.weight))  # h, h Aᵀ
        return self.down_proj(swiglu(g, u))  # keeps g and u, not silu(g) too; plain, or another wrapper (PEFT's)


def dual_ffn_routing(audio_mask: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """audio_mask (B, L) bool -> (order, n_text, inverse), the DualFFN layers' gathers: order (B*L,) lists the text
    rows, then the audio rows (flat indices, each ascending), n_text of them text; order[inverse] is 0..B*L-1."""
    flat = audio_mask.reshape(-1)
    text_rows = (~flat).nonzero().squeeze(1)
    order = torch.cat((text_rows, flat.nonzero().squeeze(1)))  # (B*L,)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, text_rows.numel(), inverse


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dual_ffn: bool, fast_forward: bool = False, qk_norm: bool = False):
        super().__init__()
        H = cfg.hidden_size
        self.self_attn = Attention(cfg, qk_norm)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.dual_ffn = dual_ffn
        self.fast_forward = fast_forward and not dual_ffn
        if dual_ffn:
            self.audio_mlp = MLP(H, cfg.audio_ffn_intermediate_size)
            self.audio_input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
            self.audio_post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, audio_mask, routing, kv=None, ff_attn_mask=None):
        """x (B, L, H); audio_mask (B, L, 1) bool and routing (dual_ffn_routing), or both None (no audio row).
        kv: this layer's KVCache slot, or None. ff_attn_mask (B, 1, L, P + L) bool: the fast-forward layers' mask
        (HiggsAudioModel.fast_forward_mask), given when audio is among the queries or the cached keys."""
        if self.fast_forward and ff_attn_mask is not None:
            # Official HiggsAudioDualFFNDecoderLayer(fast_forward=True).forward (modeling_higgs_audio.py): a plain
            # Llama layer under the mask that hides audio keys, then audio rows restored to the layer's input.
            # INVARIANT: audio rows leave unchanged (bitwise); text rows get exactly a Llama layer run on the
            # sequence with the audio positions removed (RoPE positions kept). Proven in tests/test_options.py.
            y = x + self.self_attn(self.input_layernorm(x), cos, sin, ff_attn_mask, kv)
            y = y + self.mlp(self.post_attention_layernorm(y))
            return y if routing is None else torch.where(audio_mask, x, y)
        if not self.dual_ffn or routing is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv)
            return x + self.mlp(self.post_attention_layernorm(x))
        B, L, H = x.shape
        x = x + self.self_attn(self.dual_input_norm(x, audio_mask), cos, sin, attn_mask, kv)
        # Each row goes through exactly one FFN: one gather (text rows, then audio rows), each FFN on its part, one
        # gather back to the sequence order. Gathers keep only their index for backward (index_copy kept its source);
        # split, not two slices: its backward is one cat, a slice's a zero tensor of the whole and a copy.
        order, n_text, inverse = routing
        t, a = permute_rows(x.reshape(B * L, H), order, inverse).split([n_text, B * L - n_text])  # (Nt, H), (Na, H)
        ffn = torch.cat((self.mlp(self.post_attention_layernorm(t)),
                         self.audio_mlp(self.audio_post_attention_layernorm(a))))  # (B*L, H), routed order
        return x + permute_rows(ffn, inverse, order).view(B, L, H)

    def dual_input_norm(self, x, audio_mask):
        """x (B, L, H) -> each row through its own input norm: text rows input_layernorm, audio rows
        audio_input_layernorm. The two differ only by their weight: normalize once, weigh by each row's own (the
        same products as weighing twice and choosing, with one product and no choice to differentiate)."""
        n = self.input_layernorm.normalize(x)  # (B, L, H)
        return n * torch.where(audio_mask, self.audio_input_layernorm.weight, self.input_layernorm.weight)


class AudioDecoderProjector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text_lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.audio_lm_head = nn.Linear(
            cfg.hidden_size, cfg.audio_num_codebooks * cfg.audio_num_classes, bias=False
        )


class HiggsAudioModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        H, K = cfg.hidden_size, cfg.audio_num_codebooks
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.audio_codebook_embeddings = nn.Embedding(K * cfg.audio_num_classes, H)
        dual = set(cfg.audio_dual_ffn_layers)
        # Official HiggsAudioModel.__init__ (modeling_higgs_audio.py, the audio_adapter_type branches): layers
        # outside audio_dual_ffn_layers are LlamaDecoderLayer ("dual_ffn") or fast-forward DualFFN layers.
        ff = cfg.audio_adapter_type == "dual_ffn_fast_forward"
        self.layers = nn.ModuleList(DecoderLayer(cfg, i in dual, fast_forward=ff) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.audio_decoder_proj = AudioDecoderProjector(cfg)
        self.activation_checkpointing = False  # True: recompute each decoder layer in backward (less memory)
        # Not in the state dict: the released checkpoint has no buffers.
        self.register_buffer(
            "codebook_offsets", torch.arange(K) * cfg.audio_num_classes, persistent=False
        )  # (K,)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        init_normal(self, self.config.initializer_range)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        # Buffers hold garbage after to_empty() (meta -> real); recompute them.
        self.codebook_offsets.copy_(torch.arange(self.config.audio_num_codebooks) * self.config.audio_num_classes)

    def embed(self, input_ids, audio_codes, audio_mask):
        """input_ids (B, L); audio_codes (B, L, K) stream ids in [0, C+2); audio_mask (B, L)."""
        x = self.embed_tokens(input_ids)  # (B, L, H)
        if audio_mask is None or not audio_mask.any():
            return x
        b, l = audio_mask.nonzero(as_tuple=True)
        ids = audio_codes[b, l] + self.codebook_offsets  # (N, K), codebook k offset by k*(C+2)
        a = self.audio_codebook_embeddings(ids)  # (N, K, H)
        # Official HiggsAudioModel._embed_audio_ids: mean over codebooks if config.audio_embed_avg, else sum.
        a = a.mean(dim=1) if self.config.audio_embed_avg else a.sum(dim=1)  # (N, H)
        return x.index_put((b, l), a.to(x.dtype))

    def forward(self, input_ids, attention_mask=None, audio_codes=None, audio_mask=None, cache=None):
        """Return the final hidden states (B, L, H).

        attention_mask (B, L): 1 for real tokens, 0 for padding (None: no padding).
        audio_mask (B, L): True where the position holds an audio frame (in or out);
        those rows take the codebook embeddings and the audio FFN path.
        cache: a KVCache holding P positions; these L positions become P..P+L-1 and are
        appended to it (no padding then). Without a cache this is exactly the training forward.
        """
        B, L = input_ids.shape
        x = self.embed(input_ids, audio_codes, audio_mask)
        P, attn_mask = attention_plan(attention_mask, cache, L, x.device)
        pos = torch.arange(P, P + L, device=x.device, dtype=torch.float32)
        # Recomputed each call (hd/2 numbers) so that model.to(bf16) cannot round it.
        inv_freq = rope_inv_freq(self.config).to(x.device)
        freqs = torch.outer(pos, inv_freq)  # (L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # broadcast over (B, nh, L, hd)
        routing = None
        if audio_mask is not None and audio_mask.any():
            routing = dual_ffn_routing(audio_mask)
            audio_mask = audio_mask.view(B, L, 1)
        ff_attn_mask = None
        if any(layer.fast_forward for layer in self.layers):
            now = audio_mask.view(B, L) if routing is not None else torch.zeros(B, L, dtype=torch.bool,
                                                                                device=x.device)
            keys = now
            if cache is not None:  # which cached positions are audio: their keys are hidden in these layers too
                cache.audio[:, P:P + L] = now
                keys = cache.audio[:, :P + L]
            if keys.any():
                ff_attn_mask = self.fast_forward_mask(now, attention_mask if cache is None else None, keys)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                # Keep only each layer's input; recompute the layer (LoRA and DualFFN included) in backward.
                # Non-reentrant: works with frozen inputs and DDP, and gives the same grads (RNG state restored).
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, audio_mask, routing, None,
                                                      ff_attn_mask, use_reentrant=False)
            else:
                kv = None if cache is None else cache.layer(i)
                x = layer(x, cos, sin, attn_mask, audio_mask, routing, kv, ff_attn_mask)
        if cache is not None:
            cache.length = P + L
        return self.norm(x)

    @staticmethod
    def fast_forward_mask(audio_mask, attention_mask=None, key_audio=None):
        """audio_mask (B, L) bool for the queries, attention_mask (B, L) or None, key_audio (B, P + L) bool for
        every key (the P cached ones first; default audio_mask) -> (B, 1, L, P + L) bool, True = may attend.
        Query i sits at position P + i.

        Official `fast_forward_attention_mask` (modeling_higgs_audio.py, HiggsAudioDualFFNDecoderLayer.forward and
        _prepare_all_static_kv_cache_masks): the causal+padding mask with every (query audio) or (key audio)
        entry masked. For text queries ours is that exactly. Audio query rows are discarded by the layer, so
        there we keep only the diagonal instead of masking the whole row: a fully masked row would give NaN in SDPA
        (the official code needs `_unmask_unattended` on CUDA for the same reason), and NaN * 0 in backward.
        """
        B, L = audio_mask.shape
        key_audio = audio_mask if key_audio is None else key_audio
        S = key_audio.shape[1]
        keys = ~key_audio  # (B, S)
        if attention_mask is not None:
            keys = keys & attention_mask.bool()
        dev = audio_mask.device
        causal = torch.ones(L, S, dtype=torch.bool, device=dev).tril(diagonal=S - L)  # (L, S), bottom-right
        eye = torch.arange(S, device=dev)[None, :] == torch.arange(S - L, S, device=dev)[:, None]  # key = query
        q_audio = audio_mask[:, None, :, None]  # (B, 1, L, 1)
        return torch.where(q_audio, eye[None, None], causal[None, None] & keys[:, None, None, :])

    def text_logits(self, hidden_rows):
        """hidden_rows (N, H) -> (N, V)."""
        return self.audio_decoder_proj.text_lm_head(hidden_rows)

    def audio_logits(self, hidden_rows):
        """hidden_rows (N, H) -> (N, K, C + 2)."""
        K, C2 = self.config.audio_num_codebooks, self.config.audio_num_classes
        return self.audio_decoder_proj.audio_lm_head(hidden_rows).view(-1, K, C2)


# --------------------------------------------------------------------------- loading
