"""Bench rows for issue #18: mid-preset MFU with audio routing, activation checkpointing, checkpoint save/load.

    python -m higgs_min.bench --only mfu,act_ckpt,checkpoint

Each timed figure alternates its two contestants (ours, theirs, ours, theirs, ...), takes the MINIMUM of the
repeats (the least disturbed run on a shared machine), and prints the 1-minute load average beside it.
Saves and loads are preceded by os.sync(), so one run's dirty pages are not written back in the next one's time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from higgs_min.data import targets_of

ROOT = Path(__file__).resolve().parents[2]
MID = dict(vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
           num_attention_heads=16, num_key_value_heads=4, head_dim=64, audio_dual_ffn_layers=list(range(8)),
           audio_ffn_intermediate_size=2816, rope_scaling=None, rope_theta=500000.0)
TEXT_TARGET_DENSITY = 233 / (8 * 504)  # share of text positions with a text target in the seed's data


def load_avg() -> float:
    return os.getloadavg()[0]


def alternate(contestants: dict, repeats: int, before=None, clock=time.perf_counter, times=None) -> dict:
    """name -> fn. Runs them in turn `repeats` times (after one warm-up each); returns name -> min seconds.
    clock: wall time by default; time.thread_time counts only the CPU time of this thread (single-threaded work
    on a shared machine: the time spent descheduled is not counted). times: a dict, filled with name -> every
    timed run's seconds (for medians)."""
    best = {}
    for r in range(repeats + 1):
        for name, fn in contestants.items():
            if before:
                before()
            t = clock()
            fn()
            dt = clock() - t
            if r:  # round 0 is the warm-up
                best[name] = min(best.get(name, dt), dt)
                if times is not None:
                    times.setdefault(name, []).append(dt)
    return best


def peak_matmul_flops(repeats=3, clock=time.perf_counter) -> float:
    """The best of a few large fp32 matmuls (FLOP/s): the peak an MFU figure is measured against."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (4096, 1024, 2816), (1024, 4096, 4096)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(repeats):
            t = clock()
            a @ b
            best = max(best, 2 * m * k * n / (clock() - t))
    return best


def step_flops(cfg, B, L, n_text, n_audio, r) -> float:
    """FLOPs of one LoRA step with frozen base weights (r=0: no LoRA).

    Matmuls: forward 2·m·n·k; backward needs only the input gradient of a frozen weight (1× forward), plus the
    weight gradient of LoRA A and B (1× their forward). Attention (causal half of QKᵀ and AV): backward is 2×
    forward (dQ and dK, dA and dV). Heads only at scored rows: text head at n_text rows, audio head at n_audio.
    DualFFN routes each row through one FFN of the same width, so it adds no FLOPs.
    """
    H, I, nh, nkv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.head_dim)
    T = B * L
    proj = H * nh * hd * 2 + H * nkv * hd * 2 + 3 * H * I
    lora = r * ((H + nh * hd) * 2 + (H + nkv * hd) * 2 + 3 * (H + I))
    attn_fwd = 2 * 2 * B * nh * L * L * hd / 2
    per_layer = 2 * (2 * T * (proj + lora)) + 2 * T * lora + 3 * attn_fwd
    heads = 2 * (2 * n_text * H * cfg.vocab_size + 2 * n_audio * H * cfg.audio_num_codebooks * cfg.audio_num_classes)
    return cfg.num_hidden_layers * per_layer + heads


def lora_matmul_floor(cfg, ffn_rows: list[int], r: int, repeats: int = 3, clock=time.thread_time) -> float:
    """Seconds per step of LoRA's six thin matmuls alone (forward x Aᵀ, z Bᵀ; backward dy B, dyᵀ z, dzᵀ x, dz A)
    on every target of every layer: what any LoRA adds to a frozen stack before any overhead of its own.
    ffn_rows: the rows each FFN of a layer sees (DualFFN: text rows to mlp, audio rows to audio_mlp)."""
    H, I, q, kv = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim,
                   cfg.num_key_value_heads * cfg.head_dim)
    n = sum(ffn_rows)
    shapes = [(n, H, q), (n, H, kv), (n, H, kv), (n, q, H)]  # (rows, in, out): q, k, v, o
    shapes += [s for m in ffn_rows if m for s in ((m, H, I), (m, H, I), (m, I, H))]  # gate, up, down per FFN
    data = [(torch.randn(m, i), torch.randn(r, i), torch.randn(o, r), torch.randn(m, o)) for m, i, o in shapes]

    def one_layer():
        for x, a, b, dy in data:
            z = x @ a.t()
            z @ b.t()
            dz = dy @ b
            dy.t() @ z, dz.t() @ x, dz @ a

    return cfg.num_hidden_layers * alternate({"floor": one_layer}, repeats, clock=clock)["floor"]


def audio_batch(cfg, B, L, audio_share=0.5, seed=0):
    """A batch shaped like the trainer's, with about `audio_share` of positions audio-out (two streams per row)."""
    g = torch.Generator().manual_seed(seed)
    K = cfg.audio_num_codebooks
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    audio = torch.zeros(B, L, dtype=torch.bool)
    span = int(L * audio_share / 2)
    for s in (L // 8, L // 2 + L // 8):
        audio[:, s:s + span] = True
    codes = torch.randint(0, cfg.audio_codebook_size, (B, L, K), generator=g)
    text_labels = torch.full((B, L), -100)
    text_pos = (~audio).nonzero(as_tuple=True)
    pick = torch.rand(len(text_pos[0]), generator=g) < TEXT_TARGET_DENSITY / (1 - audio_share)
    text_labels[text_pos[0][pick], text_pos[1][pick]] = ids[text_pos[0][pick], text_pos[1][pick]]
    audio_labels = torch.where(audio[..., None], codes, torch.full_like(codes, -100))
    text_targets, audio_targets = targets_of(text_labels, audio_labels)
    audio_targets[~audio] = -100  # as in a v2 sample, whose stream starts with an unlabelled BOS row
    return {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "text_targets": text_targets,
            "audio_codes": codes, "audio_targets": audio_targets, "audio_in_mask": torch.zeros_like(audio),
            "audio_out_mask": audio}


def our_step(cfg, batch, r=16, activation_checkpointing=False):
    """The trainer's own step (Scorer + objective + AdamW), LoRA r on the default targets."""
    from argparse import Namespace

    from higgs_min.lora import apply_lora
    from higgs_min.loss import target_counts
    from higgs_min.model import HiggsAudioModel
    from higgs_min.loop import Scorer, objective

    torch.manual_seed(0)
    model = HiggsAudioModel(cfg)
    apply_lora(model, r=r, alpha=2 * r)
    model.activation_checkpointing = activation_checkpointing
    scorer = Scorer(model, text_chunk=128)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    args = Namespace(text_weight=1.0, audio_weight=1.0, audio_reduction="codebook_mean")
    counts = target_counts(batch["text_targets"], batch["audio_targets"])
    info = {"model": model}

    def step():
        text, audio = scorer(batch)
        objective(text, audio, counts, args).backward()
        opt.step()
        opt.zero_grad()
        info.update(n_text=int(text.count), n_audio=audio.logits_shape[0])

    return step, info


class PlainBlock(nn.Module):
    """A Llama block in plain PyTorch (F.rms_norm, SDPA causal, SwiGLU): the reference stack."""

    def __init__(self, cfg, r: int = 0):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv = nn.Linear(H, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.o = nn.Linear(self.nh * self.hd, H, bias=False)
        self.gate_up = nn.Linear(H, 2 * I, bias=False)
        self.down = nn.Linear(I, H, bias=False)
        self.n1, self.n2 = nn.RMSNorm(H, eps=1e-5), nn.RMSNorm(H, eps=1e-5)
        q, kv = self.nh * self.hd, self.nkv * self.hd
        # r > 0: a textbook LoRA on the same 7 projections as ours (q, k, v and gate, up each their own A, B)
        self.lora = nn.ModuleDict({name: TextbookLoRA(i, o, r) for name, i, o in (
            ("q", H, q), ("k", H, kv), ("v", H, kv), ("o", q, H), ("gate", H, I), ("up", H, I), ("down", I, H))}
        ) if r else None

    def project(self, base, names, x):
        """base(x) (…, Σout), plus the LoRA updates of `names` (their outputs side by side) when r > 0."""
        y = base(x)
        if self.lora is None:
            return y
        return y + torch.cat([self.lora[n](x) for n in names], -1)

    def forward(self, x, cos, sin):
        B, L, _ = x.shape
        qkv = self.project(self.qkv, ("q", "k", "v"), self.n1(x))
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        rot = lambda t: t * cos + torch.cat((-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]), -1) * sin  # noqa
        q = rot(q.view(B, L, self.nh, self.hd).transpose(1, 2))
        k = rot(k.view(B, L, self.nkv, self.hd).transpose(1, 2))
        v = v.view(B, L, self.nkv, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.project(self.o, ("o",), y.transpose(1, 2).reshape(B, L, -1))
        g, u = self.project(self.gate_up, ("gate", "up"), self.n2(x)).chunk(2, -1)
        return x + self.project(self.down, ("down",), F.silu(g) * u)


class TextbookLoRA(nn.Module):
    """PEFT's computation, written plainly: scale · (x Aᵀ) Bᵀ, x (…, i) -> (…, o); B not zero (a trained one)."""

    def __init__(self, i: int, o: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(r, i) / i ** 0.5)
        self.B = nn.Parameter(torch.randn(o, r) / r ** 0.5 * 0.01)
        self.scale = 2.0

    def forward(self, x):
        return (x @ self.A.t()) @ self.B.t() * self.scale


def plain_step(cfg, batch, n_text, n_audio, r: int = 0):
    """Same shapes, frozen weights, no routing: input gradients through every layer, same heads. r = 0: no LoRA;
    r > 0: a textbook LoRA of rank r on the same projections and an AdamW step over it, as ours."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([PlainBlock(cfg, r) for _ in range(cfg.num_hidden_layers)]).requires_grad_(False)
    lora = [p for n, p in blocks.named_parameters() if ".lora." in n]
    opt = torch.optim.AdamW(lora, lr=1e-4) if lora else None
    for p in lora:
        p.requires_grad_(True)
    emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    text_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False).requires_grad_(False)
    audio_head = nn.Linear(cfg.hidden_size, cfg.audio_num_codebooks * cfg.audio_num_classes,
                           bias=False).requires_grad_(False)
    B, L = batch["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    text_rows = torch.randperm(B * L, generator=g)[:n_text]
    audio_rows = torch.randperm(B * L, generator=g)[:n_audio]
    text_t = torch.randint(0, cfg.vocab_size, (n_text,), generator=g)
    audio_t = torch.randint(0, cfg.audio_num_classes, (n_audio * cfg.audio_num_codebooks,), generator=g)

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    f = torch.outer(torch.arange(L).float(), inv)
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()

    def step():
        x = emb(batch["input_ids"]).detach().requires_grad_(True)
        h = x
        for block in blocks:
            h = block(h, cos, sin)
        h = h.reshape(B * L, -1)
        loss = F.cross_entropy(text_head(h[text_rows]), text_t) + F.cross_entropy(
            audio_head(h[audio_rows]).view(-1, cfg.audio_num_classes), audio_t)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad()

    return step


def bench_mfu(quick=False):
    from higgs_min.bench.common import row
    from higgs_min.config import ModelConfig

    cfg = ModelConfig(**MID)
    B, L = 2, 512
    batch = audio_batch(cfg, B, L)
    ours, info = our_step(cfg, batch)
    ours()  # fills info
    plain = plain_step(cfg, batch, info["n_text"], info["n_audio"])
    plain_lora = plain_step(cfg, batch, info["n_text"], info["n_audio"], r=16)
    n_audio_rows = int(batch["audio_out_mask"].sum())
    threads = torch.get_num_threads()
    # One thread for both contestants and the peak: on a shared 2-core box a 2-thread parallel region waits at
    # every barrier for a descheduled thread, and that penalizes the stack with more ops, not more FLOPs.
    # Timed by this thread's CPU time (everything runs on it then): the time other jobs hold the core is not
    # counted, which on the shared box moved the wall-clock ratio by +-10% between runs. Wall times are kept too.
    torch.set_num_threads(1)
    wall = {}

    def walled(name, fn):
        def run():
            t0 = time.perf_counter()
            fn()
            wall.setdefault(name, []).append(time.perf_counter() - t0)
        return run

    try:
        load0 = load_avg()
        peak = peak_matmul_flops(clock=time.thread_time)
        t = alternate({"ours": walled("ours", ours), "plain": walled("plain", plain),
                       "plain_lora": walled("plain_lora", plain_lora)}, 2 if quick else 4, clock=time.thread_time)
        peak = max(peak, peak_matmul_flops(clock=time.thread_time))
        floor = lora_matmul_floor(cfg, [B * L - n_audio_rows, n_audio_rows], 16)
    finally:
        torch.set_num_threads(threads)
    wall = {name: min(times[1:]) for name, times in wall.items()}  # [0]: the warm-up
    f_ours = step_flops(cfg, B, L, info["n_text"], info["n_audio"], 16)
    f_plain = step_flops(cfg, B, L, info["n_text"], info["n_audio"], 0)
    audio_share = float(batch["audio_out_mask"].float().mean())
    shapes = (f"B={B} L={L} H=1024 layers=8 V=128256, {audio_share:.0%} audio positions (DualFFN routing), "
              f"{info['n_text']} text / {info['n_audio']} audio targets; peak {peak / 1e9:.0f} GFLOP/s, 1 thread, "
              f"thread CPU time")
    # The ceiling of the first ratio: the plain stack plus LoRA's thin matmuls and nothing else.
    ceiling = (f_ours / (t["plain"] + floor)) / (f_plain / t["plain"])
    common = dict(better="higher", tokens_per_s=B * L / t["ours"], ours_s=t["ours"], load_avg=(load0, load_avg()))
    return [row("LoRA step mid preset with audio: MFU ours vs plain PyTorch stack (no LoRA, no routing)",
                f_ours / t["ours"] / peak, f_plain / t["plain"] / peak, "MFU", shapes,
                target="ratio >= 0.95", time_ratio=t["plain"] / t["ours"], plain_s=t["plain"],
                lora_matmuls_s=floor, ceiling_ratio=ceiling, wall_time_ratio=wall["plain"] / wall["ours"], **common),
            row("same, ours vs the plain stack with a textbook LoRA on the same projections + AdamW (no routing)",
                f_ours / t["ours"] / peak, f_ours / t["plain_lora"] / peak, "MFU", shapes,
                target="ratio >= 0.95", time_ratio=t["plain_lora"] / t["ours"], plain_lora_s=t["plain_lora"],
                wall_time_ratio=wall["plain_lora"] / wall["ours"], **common)]

ACT_SNIPPET = r"""
import sys, time, torch
from higgs_min.config import ModelConfig
from higgs_min.bench.speed import MID, audio_batch, our_step
from higgs_min.bench.common import reset_peak_rss, peak_rss_bytes, rss_bytes
ckpt, B, L, reps = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)  # as bench_mfu: robust on a shared box
cfg = ModelConfig(**MID)
step, _ = our_step(cfg, audio_batch(cfg, B, L), activation_checkpointing=ckpt)
# Exact activation memory: bytes of the distinct non-parameter storages autograd keeps for backward.
held = {}
def pack(t):
    st = t.untyped_storage()
    held[st.data_ptr()] = st.nbytes()
    return t
params = set()
import gc
for o in gc.get_objects():
    if isinstance(o, torch.nn.Parameter):
        params.add(o.untyped_storage().data_ptr())
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    step()
saved = sum(n for p, n in held.items() if p not in params)
best = float("inf")
for i in range(reps + 1):
    reset_peak_rss(); base = rss_bytes()
    t = time.perf_counter(); step(); dt = time.perf_counter() - t
    if i == 0:
        peak = peak_rss_bytes() - base  # the first step allocates the AdamW state as well: measure it too
    else:
        best = min(best, dt); peak = max(peak, peak_rss_bytes() - base)
print(peak, best, saved)
"""


def bench_act_ckpt(quick=False):
    from higgs_min.bench.common import run_snippet, row

    rows = []
    for B, L in ((2, 512), (1, 2048 if quick else 4096)):
        load0 = load_avg()
        res = {}
        for ckpt in ("0", "1", "0", "1") if not quick else ("0", "1"):  # alternated, each a fresh process
            peak, t, saved = map(float, run_snippet(ACT_SNIPPET, ckpt, B, L, 1 if L > 1024 else 2).split())
            p0, t0, _ = res.get(ckpt, (0, float("inf"), 0))
            res[ckpt] = (max(p0, peak), min(t0, t), saved)
        (p_off, t_off, s_off), (p_on, t_on, s_on) = res["0"], res["1"]
        rows.append(row(f"activation checkpointing, mid preset B={B} L={L}: activations kept for backward, on vs off",
                        s_on / 2**20, s_off / 2**20, "MiB", f"H=1024 layers=8, half audio; time on {t_on:.2f} s "
                        f"vs off {t_off:.2f} s ({t_on / t_off:.2f}x); peak RSS of the step on {p_on / 2**20:.0f} "
                        f"vs off {p_off / 2**20:.0f} MiB", target="memory down, time <= 1.4x",
                        time_ratio=t_on / t_off, rss_on_mib=p_on / 2**20, rss_off_mib=p_off / 2**20,
                        load_avg=(load0, load_avg())))
    return rows
