"""Audio tokenizer rows (`--only audio_tokenizer`): higgs_min's Higgs Audio v2 tokenizer beside transformers'
HiggsAudioV2TokenizerModel on the same weights, beside the 24 kHz DAC, and batched vs one-at-a-time encoding.

Same weights: one seeded random model at the released shape is written once as transformers' folder
(save_pretrained); higgs_min reads it with its own loader (audio/tokenizer_files.py, transformers layout),
transformers with from_pretrained. Every contestant runs in a fresh process (its own allocator state and
oneDNN caches), the contestants alternate and the order flips each repeat, the minimum is kept, and each
row prints the 1-minute load average before and after (the box is shared). The codes of both are compared
in the bench: a row whose codes differ says so.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from higgs_min.bench.common import row, run_snippet

# ---- the same random weights in both ----------------------------------------------------------------


def random_released_model(seed: int = 0):
    """higgs_min's model at the released shape with seeded random weights, fan-in scaled (as
    tests/audiotok_util.py tiny_model: activations stay O(1) through the deep stacks, so the codes are
    diverse) and positive Snake alphas."""
    import torch
    from higgs_min.audio import tokenizer as at
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = at.HiggsAudioTokenizerModel(at.AudioTokenizerConfig())
    model.to_empty(device="cpu").eval().requires_grad_(False)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("alpha"):
            p.copy_(1 + 0.2 * torch.rand(p.shape, generator=g))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif name.endswith("embed"):  # codebooks
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def write_transformers_folder(folder: Path, seed: int = 0) -> Path:
    """random_released_model's weights as HiggsAudioV2TokenizerModel.save_pretrained writes them (names
    through tokenizer_files.transformers_name; its training-only heads keep transformers' own init)."""
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel
    from higgs_min.audio import tokenizer_files as tf
    import torch
    state = {tf.transformers_name(k): v for k, v in random_released_model(seed).state_dict().items()}
    pos = "semantic_model.encoder.pos_conv_embed.conv."  # transformers keeps its weight norm (dim 2) unfolded
    v = state.pop(pos + "weight")
    state[pos + "parametrizations.weight.original0"] = torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True)
    state[pos + "parametrizations.weight.original1"] = v
    theirs = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig(**json.loads(json.dumps(tf.RELEASED)))).eval()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    missing = [k for k in missing if not re.match(r"decoder_semantic\.|fc1\.|quantizer.*(inited|cluster_size|embed_avg)",
                                                  k)]  # training-only
    if missing or unexpected:
        raise RuntimeError(f"name table does not fit transformers' model: {missing[:5]} {unexpected[:5]}")
    theirs.save_pretrained(folder)
    return folder


def bench_clip(seconds: float, seed: int = 1):
    """A sine plus noise at 24 kHz, (N,) float32: the same input for every contestant."""
    import torch
    n = int(seconds * 24000)
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.sin(torch.arange(n) * 0.05) + 0.05 * torch.randn(n, generator=g)


# ---- one contestant, in a fresh process ----------------------------------------------------------------
# argv: who (ours|theirs) folder seconds threads out.  Warm-up on the same clip (oneDNN builds its kernels
# per shape), then one timed encode and one timed decode; codes and audio saved to out (npz) for the parent.
VS_TRANSFORMERS_SNIPPET = r"""
import sys, time, json, numpy as np, torch
who, folder, seconds, threads, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
from higgs_min.bench.audio import bench_clip
x = bench_clip(seconds)
if who == "ours":
    from higgs_min.audio import tokenizer as at
    tok = at.load(folder)
    enc, dec = tok.encode, tok.decode
else:
    from transformers import HiggsAudioV2TokenizerModel
    model = HiggsAudioV2TokenizerModel.from_pretrained(folder).eval()
    def enc(x):
        with torch.inference_mode():
            return model.encode(x[None, None], return_dict=False)[0]
    def dec(c):
        with torch.inference_mode():
            return model.decode(c[None], return_dict=False)[0, 0]
dec(enc(x))
t = time.perf_counter(); codes = enc(x); t_enc = time.perf_counter() - t
t = time.perf_counter(); y = dec(codes); t_dec = time.perf_counter() - t
np.savez(out, codes=codes.numpy(), audio=y.float().numpy())
print(json.dumps({"encode": t_enc, "decode": t_dec}))
"""


def _load() -> float:
    return os.getloadavg()[0]


def bench_vs_transformers(folder: Path, seconds: float = 10.0, repeats: int = 3, threads=(2, 1)) -> list:
    """Encode and decode time, ours vs transformers', per thread count: alternating fresh processes,
    the order flipped each repeat, minimum of the repeats. Codes compared exactly, audio to float rounding."""
    import numpy as np
    shapes = (f"released shape (D 256, ratios 8,5,4,2,3, HuBERT-base, 8x1024), same random weights, {seconds:g} s "
              "clip, fp32 CPU; fresh process per run, alternating, min of {n}")
    rows = []
    for th in threads:
        best = {"ours": {}, "theirs": {}}
        load = [_load()]
        outs = {}
        for r in range(repeats):
            for who in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                outs[who] = Path(folder) / f"{who}.npz"
                t = json.loads(run_snippet(VS_TRANSFORMERS_SNIPPET, who, folder, seconds, th, outs[who]))
                for k, v in t.items():
                    best[who][k] = min(v, best[who].get(k, float("inf")))
        load.append(_load())
        a, b = np.load(outs["ours"]), np.load(outs["theirs"])
        same = bool(np.array_equal(a["codes"], b["codes"]))
        diff = float(np.abs(a["audio"] - b["audio"]).max()) if a["audio"].shape == b["audio"].shape else float("nan")
        for k in ("encode", "decode"):
            rows.append(row(f"audio tokenizer {k}, {seconds:g} s clip, {th} thread(s), vs transformers", best["ours"][k],
                            best["theirs"][k], "s", shapes.format(n=repeats) + f"; codes equal: {same}", target="<= 0.8",
                            load_avg=load, codes_equal=same, max_abs_diff=diff))
    return rows


# ---- batched vs one at a time (prepare --encode-batch) ---------------------------------------------------
# argv: folder clips seconds batch threads. The clips share one length (the case batching serves: a corpus cut
# into fixed windows); prints audio seconds encoded per second, and a hash of all codes for the parent.
BATCH_SNIPPET = r"""
import sys, time, json, hashlib, torch
folder, n, seconds, batch, threads = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
from higgs_min.audio import tokenizer as at
from higgs_min.bench.audio import bench_clip
tok = at.load(folder)
clips = [bench_clip(seconds, seed=i) for i in range(n)]
tok.encode_batch(clips[:batch], max_batch=batch)  # warm-up at the timed shapes
t = time.perf_counter()
codes = tok.encode_batch(clips, max_batch=batch)
elapsed = time.perf_counter() - t
print(json.dumps({"rate": n * seconds / elapsed, "codes": hashlib.sha256(torch.stack(codes).numpy().tobytes()).hexdigest()}))
"""


def bench_batch(folder: Path, clips: int = 8, seconds: float = 5.0, batch: int = 4, repeats: int = 2,
                threads: int = 2) -> list:
    """Corpus throughput (audio seconds per second) of encode_batch with max_batch `batch` vs 1, fresh processes
    alternating, best of the repeats; the codes of both must be identical."""
    best, codes, load = {}, {}, [_load()]
    for r in range(repeats):
        for b in ((batch, 1) if r % 2 == 0 else (1, batch)):
            got = json.loads(run_snippet(BATCH_SNIPPET, folder, clips, seconds, b, threads))
            best[b], codes[b] = max(got["rate"], best.get(b, 0.0)), got["codes"]
    load.append(_load())
    return [row(f"audio tokenizer corpus encoding, batches of {batch} vs one at a time, {threads} threads",
                best[batch], best[1], "audio-s/s", f"{clips} clips of {seconds:g} s (one length), released shape, "
                f"random weights; fresh process per run, alternating, best of {repeats}; codes equal: {codes[batch] == codes[1]}",
                target="> 1 (higher)",
                better="higher", load_avg=load, codes_equal=codes[batch] == codes[1])]


# ---- beside DAC (a fresh process per figure) -------------------------------------------------------------

# The released Higgs Audio v2 tokenizer's shape (random weights: speed and memory do not depend on them)
# beside the 24 kHz DAC's published shape (descript-audio-codec 24khz: 32 codebooks, hop 320).
AUDIO_TOK_SNIPPET = r"""
import sys, time, torch
mode, which, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
if which == "higgs":
    from higgs_min.audio import tokenizer as at
    model = at.HiggsAudioTokenizerModel(at.AudioTokenizerConfig()).eval()
    for layer in model.quantizer.vq.layers:
        layer._codebook.embed.normal_()
    tok = at.AudioTokenizer(model, "random")
    enc, dec = tok.encode, tok.decode
else:
    import dac
    model = dac.DAC(encoder_dim=64, encoder_rates=[2, 4, 5, 8], decoder_dim=1536, decoder_rates=[8, 5, 4, 2],
                    n_codebooks=32, codebook_size=1024, sample_rate=24000).eval()
    def enc(x):
        with torch.inference_mode():
            return model.encode(model.preprocess(x.view(1, 1, -1), 24000))[1][0]
    def dec(c):
        with torch.inference_mode():
            return model.decode(model.quantizer.from_codes(c[None])[0])[0, 0]
x = 0.3 * torch.sin(torch.arange(int(24000 * seconds)) * 0.05)
from higgs_min.bench.common import reset_peak_rss, peak_rss_bytes, rss_bytes
codes = enc(x[:24000])
if mode == "memory":
    reset_peak_rss(); base = rss_bytes()
    codes = enc(x)
    print(peak_rss_bytes() - base)
else:
    t = time.perf_counter(); codes = enc(x); t_enc = time.perf_counter() - t
    t = time.perf_counter(); y = dec(codes); t_dec = time.perf_counter() - t
    print(t_enc / seconds, t_dec / seconds)
"""


def bench_vs_dac(quick=False):
    """Encode/decode real-time factor (compute s per audio s, 10 s clip) and encode peak memory
    (60 s clip), each in a fresh process, Higgs tokenizer (ours) beside DAC 24 kHz (theirs)."""
    shapes = ("Higgs Audio v2 tokenizer released shape (D 256, ratios 8,5,4,2,3, HuBERT-base, 8x1024) vs "
              "DAC 24 kHz (64, rates 2,4,5,8, decoder 1536, 32x1024); random weights, fp32, CPU")
    runs = 1 if quick else 2
    rtf = {w: min((tuple(map(float, run_snippet(AUDIO_TOK_SNIPPET, "time", w, 10).split())) for _ in range(runs)),
                  key=lambda r: r[0] + r[1]) for w in ("higgs", "dac")}
    mem = {w: int(run_snippet(AUDIO_TOK_SNIPPET, "memory", w, 60)) for w in ("higgs", "dac")}
    return [row("audio tokenizer encode real-time factor, 10 s clip (Higgs vs DAC)", rtf["higgs"][0],
                rtf["dac"][0], "s/s", shapes, target="< 1 (faster than real time)"),
            row("audio tokenizer decode real-time factor, 10 s clip (Higgs vs DAC)", rtf["higgs"][1],
                rtf["dac"][1], "s/s", shapes, target="< 1"),
            row("audio tokenizer encode extra peak memory, 60 s clip (Higgs vs DAC)", mem["higgs"] / 2**20,
                mem["dac"] / 2**20, "MiB", shapes, target="fits a laptop (< 4 GiB)")]


# ---- the suite ------------------------------------------------------------------------------------------

def bench_audio_tokenizer(quick=False):
    """All audio tokenizer rows. The transformers folder (800 MB) lives in a temporary folder for the run."""
    with tempfile.TemporaryDirectory(prefix="higgs_min_bench_tok_") as tmp:
        folder = write_transformers_folder(Path(tmp) / "hf")
        rows = bench_vs_transformers(folder, 10.0, repeats=1 if quick else 3)
        rows += bench_batch(folder, repeats=1 if quick else 2)
    return rows + bench_vs_dac(quick)
