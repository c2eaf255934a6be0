"""Bench rows for issue #27's LoRA step: ours vs transformers' HiggsAudioV2 + PEFT with audio, and what our step
keeps for backward, by kind.

    python -m higgs_min.bench --only peer_audio,saved

peer_audio: the LoRA training step (forward + backward + AdamW) at the mid shape with about half the positions
audio (B=2 x L=512, DualFFN in every layer, fp32, CPU, no activation checkpointing), the trainer's own step
(speed.our_step: Scorer + objective + AdamW) beside transformers' HiggsAudioV2ForConditionalGeneration
(use_text_head=True, so both train text and audio) under peft.get_peft_model with the same LoRA (r=16,
alpha 32, targets q,k,v,o,gate,up,down: in both models the patterns match the attention projections and the
projections of BOTH FFNs, mlp and audio_mlp; the snippet checks the counts are equal). Each contestant runs in
a fresh process (its own peak RSS), alternated ours, theirs, ours, theirs; times are the minimum of the
measured steps (CPU time of the process; wall time too), memory the extra peak RSS above the set-up (the
first step's AdamW state included).

saved: bytes of the distinct non-parameter storages autograd keeps for backward in one step of ours, each
attributed to the innermost module kind that saved it first (attention, mlp, audio_mlp, norms, heads, LoRA).
"""

from __future__ import annotations

import json

from higgs_min.bench.common import row, run_snippet
from higgs_min.bench.speed import load_avg

# One thread per contestant (as bench_mfu): on the shared 2-core box a 2-thread region waits at every barrier
# for a descheduled thread, which penalizes whichever stack has more ops rather than more FLOPs.
PEER_AUDIO_SNIPPET = r"""
import json, sys, time, torch
which, B, L, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)
from higgs_min.bench.common import MID, reset_peak_rss, peak_rss_bytes, rss_bytes
from higgs_min.bench.speed import audio_batch, our_step
from higgs_min.config import ModelConfig
cfg = ModelConfig(**MID)
batch = audio_batch(cfg, B, L)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if which == "ours":
    from higgs_min.lora import lora_layers
    step, info = our_step(cfg, batch, r=16)
    wrapped = len(lora_layers(info.pop("model")))
else:
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    hf = HiggsAudioV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_codebooks=cfg.audio_num_codebooks,
        codebook_size=cfg.audio_num_classes, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = get_peft_model(HiggsAudioV2ForConditionalGeneration(hf, use_text_head=True),
                           LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    model.train()
    wrapped = sum(isinstance(m, LoraLayer) for m in model.modules())
    # transformers' inputs: audio positions hold audio_token_id; their frames go in as audio_input_ids (B, F, K)
    amask = batch["audio_out_mask"]  # (B, L), the same number of audio positions in every row here
    F_ = int(amask[0].sum())
    ids = batch["input_ids"].masked_fill(amask, hf.audio_token_id)
    frames = batch["audio_codes"][amask].view(B, F_, -1)  # (B, F, K)
    fmask = torch.ones(B, F_, dtype=torch.bool)
    # transformers shifts inside (ForCausalLMLoss): the label at t + 1 is what position t is scored against
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = batch["text_targets"][:, :-1]
    shifted = torch.full_like(batch["audio_codes"], -100)
    shifted[:, 1:] = batch["audio_targets"][:, :-1]
    audio_labels = shifted[amask].view(B, F_, -1)  # (B, F, K)
    def loss_fn():
        return model(input_ids=ids, audio_input_ids=frames, audio_input_ids_mask=fmask, labels=labels,
                     audio_labels=audio_labels, use_cache=False).loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    def step():
        loss_fn().backward(); opt.step(); opt.zero_grad()
import gc; gc.collect(); reset_peak_rss(); base = rss_bytes()
times, cpu = [], []
for i in range(steps + 1):
    t, c = time.perf_counter(), time.process_time(); step()
    if i: times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
print(json.dumps({"step_s": min(times), "cpu_s": min(cpu), "extra_peak_bytes": peak_rss_bytes() - base,
                  "lora_layers": wrapped}))
"""


def bench_peer_audio(quick=False, repeats=None, threads=1):
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return [{"name": "peer with audio (transformers HiggsAudioV2 + PEFT)", "skipped": "not installed"}]
    B, L = 2, 512
    steps, repeats = (1, 1) if quick else (2, repeats or 2)
    load0 = load_avg()
    res = {"ours": [], "peer": []}
    for _ in range(repeats):
        for which in res:
            res[which].append(json.loads(run_snippet(PEER_AUDIO_SNIPPET, which, B, L, steps, threads)))
    n = {w: {r["lora_layers"] for r in rs} for w, rs in res.items()}
    if len(n["ours"] | n["peer"]) != 1:
        raise RuntimeError(f"LoRA layer counts differ: ours {n['ours']}, transformers+PEFT {n['peer']}")
    # Timed by the process's CPU time (the time other jobs hold the cores is not counted); wall time beside it.
    step_s = {w: min(r["cpu_s"] for r in rs) for w, rs in res.items()}
    wall_s = {w: min(r["step_s"] for r in rs) for w, rs in res.items()}
    mem = {w: min(r["extra_peak_bytes"] for r in rs) / 2**20 for w, rs in res.items()}
    shapes = (f"mid shape (H=1024, 8 layers, V=128256) B={B} L={L}, half the positions audio (DualFFN every layer), "
              f"LoRA r=16 on q,k,v,o,gate,up,down of both FFNs ({n['ours'].pop()} layers each), fp32, "
              f"{threads} thread(s), fresh process per contestant, {repeats} alternations")
    return [row("LoRA step with audio: tokens per CPU second vs transformers HiggsAudioV2 + PEFT",
                B * L / step_s["ours"], B * L / step_s["peer"], "tokens/s", shapes, target="ratio >= 2.5",
                better="higher", wall_ratio=wall_s["peer"] / wall_s["ours"], load_avg=(load0, load_avg())),
            row("LoRA step with audio: extra peak memory vs transformers HiggsAudioV2 + PEFT", mem["ours"],
                mem["peer"], "MiB", shapes, target="ratio <= 0.5", load_avg=(load0, load_avg()),
                all_mib={w: [r["extra_peak_bytes"] / 2**20 for r in rs] for w, rs in res.items()})]


# --------------------------------------------------------------------------- what one step keeps for backward

def _kind(path: str) -> str:
    """A module path of the trainer's Scorer -> the kind its saved tensors are counted under."""
    if ".lora_" in path:  # (A's input is kept, or rebuilt, under its layer: lora.first_factor)
        return "LoRA B inputs"
    for part, kind in (("audio_mlp", "audio_mlp"), ("mlp", "mlp"), ("self_attn", "attention"),
                       ("layernorm", "norms"), ("audio_decoder_proj", "heads"),
                       ("layers.", "layer (input norms, routing)")):
        if part in path:
            return kind
    return "model (embedding, final norm, heads' gathers)"


def saved_by_kind(step, model) -> dict[str, int]:
    """Run `step` once with a saved-tensors hook; returns kind -> bytes of the distinct non-parameter storages
    autograd keeps, each storage counted once, under the innermost module running when it was first saved."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    where, held = ["model"], {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in held:
            held[st.data_ptr()] = (_kind(where[-1]), st.nbytes())
        return t

    def enter(path):
        def hook(module, args):
            where.append(path)
        return hook

    def leave(module, args, out):  # returns None: the output stays as it is
        where.pop()

    handles = []
    for path, m in model.named_modules():
        handles += [m.register_forward_pre_hook(enter(path)), m.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for kind, n in held.values():
        out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


SAVED_SNIPPET = r"""
import json, sys, torch
B, L = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
from higgs_min.bench.common import MID
from higgs_min.bench.peer import saved_by_kind
from higgs_min.bench.speed import audio_batch, our_step
from higgs_min.config import ModelConfig
cfg = ModelConfig(**MID)
step, info = our_step(cfg, audio_batch(cfg, B, L))
step()  # AdamW's state exists before the measured step, as in every step after the first
print(json.dumps(saved_by_kind(step, info["model"])))
"""


def bench_saved(quick=False):
    B, L = 2, 512
    kinds = json.loads(run_snippet(SAVED_SNIPPET, B, L))
    total = sum(kinds.values())
    detail = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in kinds.items())
    return [row("LoRA step with audio: activations kept for backward (MiB, distinct storages) by kind",
                total / 2**20, float("nan"), "MiB", f"mid shape B={B} L={L}, half audio: {detail}",
                by_kind_mib={k: v / 2**20 for k, v in kinds.items()})]
