"""`make bench`: each figure measured beside the alternative, in one run, on this machine.

    python -m higgs_min.bench [--out bench/results.json] [--only audio_loss,text_memory,...] [--quick]

Rows: name, ours, theirs, ratio, units, shapes. Times are medians of repeats
after a warm-up. Memory figures come from fresh subprocesses (peak RSS above
the set-up), so one measurement cannot inherit another's allocations.
Nothing here is asserted: tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from higgs_min.bench.common import MID, ROOT, median_time, row, run_snippet

PEER_REQUIREMENTS = ROOT / "requirements-test.txt"


def bench_audio_loss(quick=False):
    from higgs_min.loss import multi_codebook_cross_entropy

    N, K, C = 600, 8, 1026
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, K, C, generator=g, requires_grad=True)
    targets = torch.randint(0, C, (N, K), generator=g)
    targets[torch.rand(N, K, generator=g) < 0.1] = -100

    def ours():
        logits.grad = None
        loss, _ = multi_codebook_cross_entropy(logits, targets)
        loss.backward()
        return loss

    def loop():  # one cross_entropy per codebook, as audiocraft's MusicGen solver computes it
        logits.grad = None
        losses = []
        for k in range(K):
            losses.append(F.cross_entropy(logits[:, k], targets[:, k], ignore_index=-100))
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss

    diff = (ours().detach() - loop().detach()).abs().item()
    # Interleaved, so both see the same allocator state: a fresh 20 MB buffer costs page
    # faults that can dwarf the arithmetic, and which one pays them depends on the order.
    t_ours, t_loop = [], []
    for i in range(10 if quick else 40):
        for fn, times in ((ours, t_ours), (loop, t_loop)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    t_ours, t_loop = statistics.median(t_ours[2:]), statistics.median(t_loop[2:])
    return [row("audio loss fwd+bwd (vectorized vs per-codebook loop)", t_ours * 1e3, t_loop * 1e3, "ms",
                f"[{N}, {K}, {C}]", target="ratio <= 1/3 (>= 3x faster)", max_abs_diff=diff)]


# --------------------------------------------------------------------------- 2. text loss memory

TEXT_MEM_SNIPPET = r"""
import sys, torch, torch.nn as nn, torch.nn.functional as F
from higgs_min.loss import text_scores
torch.manual_seed(0)
mode, B, L, H, V, N = sys.argv[1], *map(int, sys.argv[2:])
head = nn.Linear(H, V, bias=False).requires_grad_(False)
hidden = torch.randn(B, L, H, requires_grad=True)
labels = torch.full((B, L), -100)
flat = torch.randperm(B * L)[:N]
labels.view(-1)[flat] = torch.randint(0, V, (N,))
from higgs_min.bench.common import reset_peak_rss, peak_rss_bytes, rss_bytes
reset_peak_rss(); base = rss_bytes()
if mode == "ours":
    s = text_scores(hidden, labels, head)
    (s.loss_sum / s.count).backward()
else:
    logits = head(hidden)  # (B, L, V): the full-logits way
    F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100).backward()
print(peak_rss_bytes() - base)
"""


def bench_text_memory(quick=False):
    B, L, H, V, N = 8, 504, 3072, 128256, 233
    ours = int(run_snippet(TEXT_MEM_SNIPPET, "ours", B, L, H, V, N))
    full = int(run_snippet(TEXT_MEM_SNIPPET, "full", B, L, H, V, N))
    return [row("text loss extra peak memory (labelled rows vs full logits), fwd+bwd", ours / 2**20,
                full / 2**20, "MiB", f"B={B} L={L} H={H} V={V}, {N} targets", target="ratio <= 0.05")]


# --------------------------------------------------------------------------- 3-4. training step

def _tiny_step():
    """The trainer's own step (Scorer + objective + AdamW) on a demo batch of 8, tiny preset."""
    from higgs_min.bench.speed import our_step
    from higgs_min.config import ModelConfig
    from higgs_min.chat import ChatEncoder
    from higgs_min.data import collate
    from higgs_min.prepare.sanitize import load_jsonl

    cfg = ModelConfig.from_preset("tiny")
    enc = ChatEncoder(ROOT / "data" / "tokenizer.json", 8, 1024, cfg.vocab_size)
    samples, _ = load_jsonl(ROOT / "data" / "demo.jsonl", enc, 2048)
    batch = collate(samples[:8], enc.ids["end_of_text"])
    step, info = our_step(cfg, batch, r=16)
    return step, cfg, batch, info, samples


def bench_train_step(quick=False):
    from higgs_min.bench.speed import peak_matmul_flops, step_flops

    peak = peak_matmul_flops()
    rows = []
    tiny_step, cfg, batch, info, _ = _tiny_step()  # tiny preset on the demo set (text + audio)
    dt = median_time(tiny_step, 3 if quick else 10, 2)
    B, L = batch["input_ids"].shape
    flops = step_flops(cfg, B, L, info["n_text"], info["n_audio"], 16)
    rows.append(row("training step, tiny preset, demo batch (MFU vs best fp32 matmul)", flops / dt / 1e9,
                    peak / 1e9, "GFLOP/s", f"B={B} L={L} H={cfg.hidden_size} layers={cfg.num_hidden_layers}",
                    target="ratio >= 0.70", better="higher", tokens_per_s=B * L / dt))
    # the mid-size row, with audio routing and a plain-stack comparison: bench_speed.bench_mfu (--only mfu)
    return rows


PEER_SNIPPET = r"""
import json, statistics, sys, time, torch
which, B, L, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from higgs_min.bench.common import MID, text_batch
from higgs_min.config import ModelConfig
cfg = ModelConfig(**MID)
ids, labels, n = text_batch(cfg, B, L)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.manual_seed(0)
if which == "ours":
    from higgs_min.model import HiggsAudioModel
    from higgs_min.lora import apply_lora
    from higgs_min.loss import text_scores
    model = HiggsAudioModel(cfg)
    apply_lora(model, targets, r=16, alpha=32)
    def loss_fn():
        h = model(ids)
        t = text_scores(h, labels, model.audio_decoder_proj.text_lm_head)
        return t.loss_sum / t.count
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, tie_word_embeddings=False,
                     attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(hf), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    hf_labels = torch.full_like(labels, -100)
    hf_labels[:, 1:] = labels[:, 1:]  # HF shifts inside; same targets as ours
    def loss_fn():
        return model(input_ids=ids, labels=hf_labels).loss
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
from higgs_min.bench.common import reset_peak_rss, peak_rss_bytes, rss_bytes
import gc; gc.collect(); reset_peak_rss(); base = rss_bytes()
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    loss_fn().backward(); opt.step(); opt.zero_grad()
    if i: times.append(time.perf_counter() - t)
print(json.dumps({"tokens_per_s": B * L / statistics.median(times), "extra_peak_bytes": peak_rss_bytes() - base,
                  "total_peak_bytes": peak_rss_bytes()}))
"""


def bench_peer(quick=False):
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return [{"name": "peer (transformers + PEFT)", "skipped": f"not installed: pip install -r {PEER_REQUIREMENTS}"}]
    steps = 2 if quick else 4
    res = {}
    for which in ("ours", "peer"):
        res[which] = json.loads(run_snippet(PEER_SNIPPET, which, 2, 512, steps))
    shapes = "mid-size text-only B=2 L=512, LoRA r=16 on q,k,v,o,gate,up,down, fp32"
    return [
        row("tokens/s vs transformers+PEFT", res["ours"]["tokens_per_s"], res["peer"]["tokens_per_s"], "tokens/s",
            shapes, target="ratio >= 1.5", better="higher"),
        row("extra peak memory of a step vs transformers+PEFT", res["ours"]["extra_peak_bytes"] / 2**20,
            res["peer"]["extra_peak_bytes"] / 2**20, "MiB", shapes, target="ratio <= 0.7",
            total_peak_mib={k: v["total_peak_bytes"] / 2**20 for k, v in res.items()}),
    ]


# --------------------------------------------------------------------------- 5. checkpoint: checkpoints.bench_checkpoint


# --------------------------------------------------------------------------- 6. data: see bench_data_rows


def bench_generate(quick=False):
    """Generation on the mid-size model: a cached step vs re-running the whole sequence, at 50 and 500
    audio frames; then frames/s and the real-time factor of `generate` (25 frames = 1 s of audio)."""
    from higgs_min.config import ModelConfig
    from higgs_min.generate.sampling import Prompt, generate
    from higgs_min.model import HiggsAudioModel, KVCache

    cfg = ModelConfig(**MID)
    torch.manual_seed(0)
    model = HiggsAudioModel(cfg).eval()
    K, P = cfg.audio_num_codebooks, 40  # a 40-token text prompt before the audio
    sp = {"audio_out_bos": 1, "audio_out": 2, "audio_eos": 3, "eot": 4, "end_of_text": 5}
    g = torch.Generator().manual_seed(0)

    def sequence(frames):
        L = P + frames
        ids = torch.randint(10, 1000, (1, L), generator=g)
        ids[0, P:] = sp["audio_out"]
        codes = torch.randint(0, cfg.audio_codebook_size, (1, L, K), generator=g)
        amask = torch.zeros(1, L, dtype=torch.bool)
        amask[0, P:] = True
        return ids, codes, amask

    def step_times(frames):
        ids, codes, amask = sequence(frames + 1)
        n = ids.shape[1] - 1
        cache = KVCache(cfg, n + 1)
        with torch.no_grad():
            model(ids[:, :n], None, codes[:, :n], amask[:, :n], cache=cache)  # the prefix, once

            def cached():
                cache.length = n  # the same step again: overwrite position n
                h = model(ids[:, n:], None, codes[:, n:], amask[:, n:], cache=cache)[0, -1:]
                model.audio_logits(h)

            def full():
                h = model(ids, None, codes, amask)[0, -1:]
                model.audio_logits(h)

            return (median_time(cached, 5 if quick else 20, 2),
                    median_time(full, 2 if quick else (3 if frames > 100 else 5), 1))

    c50, f50 = step_times(50)
    c500, f500 = step_times(500)
    shapes = f"mid preset (H=1024, 8 layers, DualFFN), batch 1, {P}-token prompt"
    rows = [row("generation step at frame 50: KV-cached vs full re-forward", c50 * 1e3, f50 * 1e3, "ms",
                shapes + ", 91 positions"),
            row("generation step at frame 500: KV-cached vs full re-forward", c500 * 1e3, f500 * 1e3, "ms",
                shapes + ", 541 positions", target="ratio <= 0.1"),
            row("KV-cached step cost: frame 500 vs frame 50", c500 * 1e3, c50 * 1e3, "ms", shapes,
                target="ratio <= 1.5")]
    steps = 40 if quick else 150
    ids = torch.randint(10, 1000, (P,), generator=g)
    ids[-1] = sp["audio_out_bos"]
    prompt = Prompt(ids, torch.zeros(P, K, dtype=torch.long), torch.zeros(P, dtype=torch.bool),
                    torch.zeros(P, dtype=torch.bool), sp)
    t = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=steps, seed=0)  # the official example's sampling defaults
    wall = time.perf_counter() - t
    cols = sum(a.shape[1] for a in out.audio)
    fps = cols / wall
    rows.append(row("generate: audio frames/s, mid preset, forced audio (vs real time 25 frames/s)", fps, 25.0,
                    "frames/s", f"{shapes}, {steps} steps incl. prefill, {cols} columns, temperature 0.3 "
                    f"top-k 50 top-p 0.95 RAS 7/2", target="ratio >= 1 (RTF <= 1)", better="higher",
                    rtf=25.0 / fps))
    return rows

def bench_corpus_rows(quick=False):
    """Packed corpus vs the JSONL path at 10k/100k/1M samples (higgs_min/bench_corpus.py)."""
    from higgs_min.bench.corpus import bench_corpus
    return bench_corpus(quick)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json", help="where to write the rows")
    ap.add_argument("--only", default="", help="comma-separated subset: audio_loss,text_memory,train_step,mfu,"
                                               "act_ckpt,peer,peer_audio,saved,checkpoint,data,audio_tokenizer,"
                                               "generate,corpus,v3,merge")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from higgs_min.bench.audio import bench_audio_tokenizer
    from higgs_min.bench.merge import bench_merge
    from higgs_min.bench.peer import bench_peer_audio, bench_saved
    from higgs_min.bench.checkpoints import bench_checkpoint
    from higgs_min.bench.speed import bench_act_ckpt, bench_mfu
    from higgs_min.bench.v3 import bench_v3_step
    suites = {"audio_loss": bench_audio_loss, "text_memory": bench_text_memory, "train_step": bench_train_step,
              "mfu": bench_mfu, "act_ckpt": bench_act_ckpt, "peer": bench_peer, "peer_audio": bench_peer_audio,
              "saved": bench_saved, "checkpoint": bench_checkpoint,
              "data": bench_data_rows, "audio_tokenizer": bench_audio_tokenizer, "generate": bench_generate,
              "corpus": bench_corpus_rows, "v3": bench_v3_step, "merge": bench_merge}
    chosen = [s for s in (args.only.split(",") if args.only else suites) if s]
    rows = []
    t0 = time.time()
    for name in chosen:
        if name not in suites:
            ap.error(f"unknown benchmark {name!r}; known: {sorted(suites)}")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(suites[name](args.quick))
    machine = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "platform": platform.platform(),
               "processor": _cpu_name(), "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(format_table(rows, machine))
    print(f"\nwritten to {args.out}")
    return 0


def bench_data_rows(quick=False):
    from higgs_min.chat import ChatEncoder
    from higgs_min.data import collate
    from higgs_min.prepare.sanitize import load_jsonl

    step, cfg, _, _, samples = _tiny_step()
    enc = ChatEncoder(ROOT / "data" / "tokenizer.json", 8, 1024, cfg.vocab_size)
    path = ROOT / "data" / "demo.jsonl"
    t_load = median_time(lambda: load_jsonl(path, enc, 2048), 3, 1)
    t_coll = median_time(lambda: [collate(samples[i:i + 8], 0) for i in range(0, len(samples), 8)], 5, 1)
    loader = len(samples) / (t_load + t_coll)
    consume = 8 / median_time(step, 5, 1)
    return [row("data: tokenize+collate samples/s vs tiny training step consumption", loader, consume,
                "samples/s", f"demo set, {len(samples)} conversations, batch 8", target="ratio >> 1",
                better="higher")]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(rows, machine) -> str:
    lines = [f"machine: {machine['processor']}, {machine['cpu_cores']} cores, torch {machine['torch']}, "
             f"{machine['date']}", ""]
    lines.append(f"{'benchmark':<72} {'ours':>12} {'theirs':>12} {'ratio':>8}  units      target")
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['name']:<72} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['name']:<72} {r['ours']:>12.4g} {r['theirs']:>12.4g} {r['ratio']:>8.3f}  "
                     f"{r['units']:<10} {r['target'] or ''}")
        lines.append(f"{'':<6}shapes: {r['shapes']}" + (f"; max abs diff {r['max_abs_diff']:.2e}"
                                                          if "max_abs_diff" in r else "")
                     + (f"; {r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r else "")
                     + (f"; real-time factor {r['rtf']:.2f}" if "rtf" in r else "")
                     + (f"; load average {r['load_avg'][0]:.2f} -> {r['load_avg'][1]:.2f}" if "load_avg" in r else "")
                     + "".join(f"; {k} {v:.3g}" for k, v in r.items()
                               if k.endswith(("_s", "_ratio", "to_bare")) and isinstance(v, (int, float))))
    return "\n".join(lines)
