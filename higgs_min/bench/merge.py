"""Bench row for issue #27: the memory a LoRA merge takes, in place (lora.merge_in_place) vs keeping a copy.

    python -m higgs_min.bench --only merge

Each contestant runs in a fresh interpreter (its own peak RSS), alternated ours, copy, ours, copy. "copy" is the
merge as it was before #27 (lora.merged_weight into a new tensor, a clone of W kept for an exact unmerge).
"""

from __future__ import annotations

import os

MERGE_SNIPPET = r"""
import sys, time, torch
from higgs_min import lora
from higgs_min.bench.common import reset_peak_rss, peak_rss_bytes, rss_bytes
how, layers = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
H, I, kv = 3072, 8192, 1024  # higgs-v2-3b: the default targets of one layer (q, k, v, o, gate, up, down)
shapes = [(H, H), (kv, H), (kv, H), (H, H), (I, H), (I, H), (H, I)] * layers
g = torch.Generator().manual_seed(0)
ws = [(torch.randn(o, i, generator=g) * 0.02).bfloat16() for o, i in shapes]  # the released dtype
ab = [(torch.randn(16, i, generator=g) * 0.01, torch.randn(o, 16, generator=g) * 0.01) for o, i in shapes]
kept = []
reset_peak_rss(); base = rss_bytes()
t = time.perf_counter()
for w, (a, b) in zip(ws, ab):
    if how == "ours":
        kept.append(lora.merge_in_place(w, a, b, 2.0, "w"))
    else:  # before #27: LoRALinear.merge kept a clone of W and copied merged_weight's new tensor in
        m = lora.merged_weight(w, a, b, 2.0, "w")
        kept.append(w.clone())
        w.copy_(m)
        del m
dt = time.perf_counter() - t
held = sum(sum(x.numel() * x.element_size() for x in k) if isinstance(k, tuple) else k.numel() * k.element_size()
           for k in kept)
print(peak_rss_bytes() - base, held, dt, sum(w.numel() * w.element_size() for w in ws))
"""


def bench_merge(quick=False):
    from higgs_min.bench.common import row, run_snippet

    layers = 1 if quick else 2
    res = {}
    load0 = os.getloadavg()[0]
    for how in ("ours", "copy") * (1 if quick else 2):
        peak, held, dt, weights = map(float, run_snippet(MERGE_SNIPPET, how, layers).split())
        p0, h0, t0, _ = res.get(how, (0, 0, float("inf"), 0))
        res[how] = (max(p0, peak), max(h0, held), min(t0, dt), weights)
    (p_ours, h_ours, t_ours, weights), (p_copy, h_copy, t_copy, _) = res["ours"], res["copy"]
    return [row(f"LoRA merge of {layers} higgs-v2-3b layers' default targets (bf16): peak memory above the weights, "
                "in place vs keeping a copy", p_ours / 2**20, p_copy / 2**20, "MiB",
                f"{weights / 2**20:.0f} MiB of targeted weights; kept for unmerge: in place {h_ours / 2**20:.0f} MiB "
                f"(undo record) vs {h_copy / 2**20:.0f} MiB (clone); time {t_ours:.2f} s vs {t_copy:.2f} s",
                target="ratio <= 0.25", held_ours_mib=h_ours / 2**20, held_copy_mib=h_copy / 2**20,
                ours_s=t_ours, copy_s=t_copy, load_avg=(load0, os.getloadavg()[0]))]
