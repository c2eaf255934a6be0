"""Bench row for issue #24: the Higgs Audio v3 LoRA step at a mid shape, ours vs transformers + PEFT.

    python -m higgs_min.bench --only v3

Both sides train the same thing on the same batch: LoRA r=16 on q,k,v,o,gate,up,down of a Qwen3 stack (the
release's head_dim 128 and 2 query heads per kv head, 8 layers of hidden 1024), TTS positions (a text prompt,
then delayed audio rows whose inputs are the fused embedding's sum over 8 codebooks), the tied fused head at
the positions that predict an audio row, the codebook-mean cross-entropy, AdamW. Ours: HiggsV3Model + higgs_min
LoRA + loss.multi_codebook_cross_entropy (one cross-entropy over the 8 codebooks). Theirs: transformers'
Qwen3Model + PEFT, the fused embedding/head as one nn.Embedding matrix around it, and a loop of 8
cross-entropies (how the community trainers score codebooks). Each contestant runs in a fresh interpreter:
tokens/s (median of the steps after a warm-up) and the step's extra peak RSS above the set-up.
"""

from __future__ import annotations

import json

from higgs_min.bench.common import run_snippet, row

V3_MID = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=8, head_dim=128)

V3_SNIPPET = r"""
import json, statistics, sys, time, torch
import torch.nn.functional as F
which, B, L, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from higgs_min.bench.v3 import V3_MID
from higgs_min.v3.config import V3Config
cfg = V3Config(**V3_MID)
K, C2 = cfg.audio_num_codebooks, cfg.audio_num_classes
g = torch.Generator().manual_seed(0)
P = L // 8  # text prompt, then L - P audio rows
ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
codes = torch.randint(0, 1024, (B, L, K), generator=g)
audio = torch.zeros(B, L, dtype=torch.bool)
audio[:, P:] = True
ids[audio] = 0
rows = torch.zeros(B, L, dtype=torch.bool)
rows[:, P - 1:L - 1] = True  # <|audio|> predicts row 0, row r predicts row r + 1
targets = codes[:, P:].reshape(-1, K)
targets[::7, 5:] = -100  # some unscored cells, as the BOC cells are
targets_list = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.manual_seed(0)
if which == "ours":
    from higgs_min.lora import apply_lora
    from higgs_min.loss import multi_codebook_cross_entropy
    from higgs_min.v3.model import HiggsV3Model
    model = HiggsV3Model(cfg)
    apply_lora(model, targets_list, r=16, alpha=32)
    def loss_fn():
        h = model(ids, None, codes, audio)
        return multi_codebook_cross_entropy(model.audio_logits(h[rows]), targets)[0]
else:
    from transformers import Qwen3Config, Qwen3Model
    from peft import LoraConfig, get_peft_model
    hf = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                     rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True, attn_implementation="sdpa")
    model = get_peft_model(Qwen3Model(hf), LoraConfig(r=16, lora_alpha=32, target_modules=targets_list))
    fused = torch.nn.Embedding(K * C2, cfg.hidden_size).requires_grad_(False)
    torch.nn.init.normal_(fused.weight, std=cfg.initializer_range)  # as HiggsV3Model.init_weights
    offsets = torch.arange(K) * C2
    def loss_fn():
        x = model.get_input_embeddings()(ids)
        x = x.masked_scatter(audio[..., None], fused(codes[audio] + offsets).sum(-2))
        h = model(inputs_embeds=x).last_hidden_state
        logits = (h[rows] @ fused.weight.T).view(-1, K, C2)
        per_cb = [F.cross_entropy(logits[:, c], targets[:, c], ignore_index=-100) for c in range(K)]
        return sum(per_cb) / K
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
from higgs_min.bench.common import reset_peak_rss, peak_rss_bytes, rss_bytes
import gc; gc.collect(); reset_peak_rss(); base = rss_bytes()
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    loss = loss_fn()
    loss.backward(); opt.step(); opt.zero_grad()
    if i: times.append(time.perf_counter() - t)
print(json.dumps({"tokens_per_s": B * L / statistics.median(times), "extra_peak_bytes": peak_rss_bytes() - base,
                  "total_peak_bytes": peak_rss_bytes(), "loss0": float(loss)}))
"""


def bench_v3_step(quick=False):
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return [{"name": "v3 LoRA step vs transformers + PEFT", "skipped": "not installed: transformers, peft "
                                                                           "(requirements-test.txt)"}]
    B, L, steps = (1, 128, 2) if quick else (1, 256, 3)
    res = {which: json.loads(run_snippet(V3_SNIPPET, which, B, L, steps)) for which in ("ours", "peer")}
    shapes = (f"v3 mid shape (hidden 1024, 8 layers, 16/8 heads x 128, vocab 151936) B={B} L={L} "
              f"({L - L // 8} audio rows), LoRA r=16 on q,k,v,o,gate,up,down, fp32")
    return [
        row("v3 LoRA step tokens/s vs transformers Qwen3 + PEFT", res["ours"]["tokens_per_s"],
            res["peer"]["tokens_per_s"], "tokens/s", shapes, better="higher"),
        row("v3 LoRA step extra peak memory vs transformers Qwen3 + PEFT", res["ours"]["extra_peak_bytes"] / 2**20,
            res["peer"]["extra_peak_bytes"] / 2**20, "MiB", shapes,
            total_peak_mib={k: v["total_peak_bytes"] / 2**20 for k, v in res.items()}),
    ]
