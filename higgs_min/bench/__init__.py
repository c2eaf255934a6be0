"""`make bench`: every figure measured beside its alternative, and `make gpu-check`. Not imported by training.

    python -m higgs_min.bench ...     (= higgs-min bench; __main__.py -> rows.main)

The measured tables (moved here from the README) are at the end of this docstring. What lies behind them:

- Memory figures come from fresh subprocesses: peak RSS above the set-up, the peak reset through
  /proc/self/clear_refs (or RssAnon from /proc/self/status, corpus.py).
- Mid-preset MFU row: the trainer's own Scorer + objective + AdamW with half the positions audio (DualFFN
  norms + gather/scatter timed) vs a plain PyTorch Llama stack of the same shape (fused qkv, RoPE, SDPA, no
  LoRA, no routing, the same heads at the same rows); MFU against the best of 3 large fp32 matmuls in the same
  run, attention backward counted 2x forward. Save row (checkpoints.py): atomic (sha256 while writing, fsync
  each file, manifest, fsync folder, rename, fsync parent) vs the durability floor (save_file + fsync of each
  file and the folder).

- Tiny preset MFU (44%, target 70%, missed): at hidden 256 every matmul is small, so per-op overhead
  (attention, norms, the DualFFN gather/scatter, the optimizer) weighs as much as the arithmetic; at hidden
  1024 the same code was at the 70% line. The tiny preset exists to train in a minute, not to saturate a CPU.
  The first make bench's mid-size MFU row and its checkpoint save/load rows were replaced by speed.py's rows.
- Mid-preset MFU (speed.py): with 2 intra-op threads on a box at load 10, every parallel region waits at its
  barrier for a descheduled thread, so the stack with more (small) ops loses regardless of FLOPs (that measured
  0.46); one thread for both contestants and the peak measures the code. A profile of our step (1 thread, 2
  layers) has aten::mm at 79% of the time and the DualFFN routing ops (index_put, where, gathers) under 1%,
  so routing was left as it is. The remaining gap is LoRA (r=16 adds two thin matmuls and their weight
  gradients per target) and separate q/k/v projections.
- Activation checkpointing: recomputation costs one more forward of the layers (about 1.33x in FLOPs); the
  measured 1.43-1.63x is on a loaded box, one process per contestant. Peak RSS is printed too but is not a
  usable figure on CPU (glibc keeps freed arenas, so the step after the measured one starts from a high-water
  mark); the saved-tensor figure (saved-tensor hooks, distinct non-parameter storages) is exact. On a GPU
  `make gpu-check` prints torch.cuda.max_memory_allocated with and without it. The full row uses L=4096, not
  run on the 2-core machine for lack of CPU time (L=2048 was).
- Save: the writer streams each tensor's bytes straight from memory (no tobytes() copy, which save_file
  makes) while a second thread hashes the same buffer; 1.19x a bare save_file (0.69 s) on 2026-12-02. The
  re-read after writing is gone: it read the page cache, not the disk, so it caught nothing the in-memory hash
  does not; names, sizes and the manifest's canonical form are still checked before the rename, and every
  hash is checked at load and by `checkpoint verify`.
- Load: one pass (before: verify read and hashed everything, load_file read it again, and --resume auto
  verified every checkpoint). Each file is mapped copy-on-write, hashed page by page (files in parallel), and
  the tensors are built on that mapping once every hash matches. What remains is sha256 itself: hashing the
  same 473 MB already in memory takes 0.67 s, the floor of any sha256 verification; load_file + copy is memory
  bandwidth. Meeting 1.2x warm would take a cheaper checksum (CRC32C/xxHash), which this project does not
  use. Cold, the hashing overlaps the reads (madvise(WILLNEED)) and the ratio is 1.07.
- #27, save and resume: the files of a checkpoint are written in parallel threads (one sha256 per file cannot
  be split, the files can), chunks handed to the hasher in 8 MiB groups; the resume's choice keeps its verified
  mapping for the load (one hash per file on rank 0, was two). The floor of a verified resume is a plain load
  plus sha256 of every byte spread evenly over the cores; with one digest per file the largest file
  (optimizer.safetensors, 2/3 of the bytes) bounds the hashing. On the shared box at load ~14 (one process,
  alternated, medians of 5): save 2.83 -> 2.14 s against a floor of 1.28 s (hashing is CPU, the floor is
  mostly not: under CPU contention the 1.1x target is out of reach), resume 3.38 -> 1.79 s (1.03x its floor).
- #27, save (this session): the manifest (format 2, manifest.py) records one sha256 per 32 MiB block, so the
  blocks of every file are hashed in one pool, a thread per core, while each file's writer goes on; after each
  block the writer asks the disk to start writing it (posix_fadvise DONTNEED), so the final fsync waits for
  the last block only. Format-1 checkpoints (one sha256 per file) still verify and load. Before/after in one
  process, alternating, min (median) of 12, 2 cores at load 6.7 -> 8.4: save 2.04x (1.67x) -> 1.28x (1.49x)
  its durability floor; at load 5.1: 1.48x (2.01x) -> 0.87x (1.30x); resume 1.02x -> 1.03x its floor (unchanged); cold verified load 1.32 -> 0.94 s
  (plain load_file 0.57 s). What is left is CPU: sha256 runs at 1.42 GB/s per core (SHA-NI), 0.33 s of CPU
  for 473 MB, more than the floor's whole 0.21 s (save_file + fsync, which mostly waits on the disk): ours
  takes 0.51 s of CPU, so where other work holds the cores the ratio tends to 2.4x, and on an idle machine
  the hashing hides behind the disk (load 0.5: 1.08x before this change).
- #27, merge (merge.py): in place, one row block at a time, keeping only the bits the cast loses (~12% of
  W's bytes) for an exact unmerge.
- #27, corpus start (corpus.py): each shard is hashed before its first sample is used; the first batch hashes
  at most batch-size shards (in parallel). 1M samples tiled from 20k (100 shards of 58 MB): open + first batch
  37 s with every shard hashed first vs 3.4-4.2 s at load 12-13.
- #27, LoRA step (peer.py; ops.py; model.DecoderLayer; lora.shared_input): `--only peer_audio,saved` runs the
  trainer's step (Scorer + objective + AdamW) at the mid shape with half the positions audio (B=2, L=512,
  DualFFN in every layer, fp32, CPU, 1 thread, no activation checkpointing) beside transformers 5.24's
  HiggsAudioV2ForConditionalGeneration(use_text_head=True) + PEFT 0.21, r=16 on the same 80 projections
  (q,k,v,o and gate,up,down of mlp AND audio_mlp in each layer), each in a fresh process, alternated.
  Kept for backward (saved-tensor hooks, distinct storages): 645 -> 440 MiB. swiglu keeps g and u, not silu(g)
  (-88); down_proj's LoRA A rebuilds silu(g) * u from them in backward (-88); the DualFFN FFNs take their rows
  by one gather and give them back by another (index_copy kept its source, -32). Before, by kind: LoRA inputs
  156, mlp 132, audio_mlp 132, attention 81 (SDPA's q, k, v, out), norms 60, losses + final norm 53, routing 32.
  the norms' outputs for q,k,v and gate,up too reached 381 MiB but cost 2-3% of the step: not done. Extra peak
  RSS vs transformers+PEFT, min of 2 alternations at load ~3 (2026-12-07): 1,359 -> 1,079 MiB vs 2,780 MiB,
  **0.49 -> 0.39x** (2 threads, load ~5: 1,389 -> 1,087 vs 2,841). Tokens per CPU-second, 1 thread: 212 ->
  204 (within the box's noise) vs 103: **2.0x, the 2.5x target missed**. transformers computes (B*L, V) text
  logits and audio logits at every position (about twice our FLOPs) but its few large matmuls run as
  efficiently as ours; the issue's 2.86x was 2 threads on a quiet machine, where the peer's many small ops wait
  at barriers (at 2 threads here, load 5, wall: 187 vs 47 tok/s, too noisy to quote as a ratio).
  MFU (speed.py, now timed by the thread's CPU time, wall beside it): a profile (1 thread) had aten::mm at 66%
  of both steps with the same mm time; our excess was elementwise: the (N, out) LoRA scale multiplies, the
  DualFFN input norm computed twice over every row, the adds of each LoRA update, silu. Now the scale
  multiplies the (N, r) factor (the same numbers when alpha = 2r), the two input norms normalize once and weigh
  twice, and q,k,v's (and gate,up's) A factors run as one stacked matmul. Old and new step in one process with
  the plain stack, rotating order, 8 rounds at load ~3: min 5.04 -> 4.70 s (plain 4.42: MFU ratio 0.90 ->
  0.97), medians 5.30 -> 5.34 s (plain 4.62: 0.90 -> 0.89); `--only mfu` 0.93 before and 0.885-0.92 after in
  separate runs. **The 0.95 target is not shown**: the box's noise (+-7% between runs of the same code) is
  larger than what is left to find. Outputs, LoRA gradients and 20 `make train` steps' losses are equal
  (bitwise for every change but the stacked A factors: 6.4e-7 after 20 steps, equal to 4 decimals).
- #27, MFU profile (05:50; speed.bench_mfu shapes, torch.profiler, 1 thread, self CPU ms per step, 2 steps, quiet
  box): ours 4,743 vs plain 4,212, +531 ms. aten::mm +301 (465 calls vs 68: LoRA's rank-16 A and B products,
  about 6 thin matmuls per adapted linear forward and backward, the weight gradient xᵀ·da reading the whole
  (N, in) input for 16 columns; q,k,v and gate,up as separate matmuls where plain fuses them; each DualFFN FFN
  on half the rows): ~10% more mm time for the 3.5% more FLOPs that step_flops counts as useful for LoRA
  (both sides count the same formula, r=16 vs r=0; the heads at the same rows). add +44, add_ +11 (x's
  gradient summed over its consumers: q,k,v bases + the A factor, gate,up + A); silu +42, mul +29 (silu three
  times per FFN: forward, swiglu's backward, lora_in's rebuild, the memory trade of ops.py); DualFFN routing:
  where +26 (dual_input_norm), index +17, index_put +13; argmax +24 (logged accuracy: text (67, 128256) and
  audio logits, every step); Python/autograd overhead ~40; AdamW 21 ms in all. SDPA and the losses are equal
  or ours smaller (cat -57, log_softmax -14). Changed (bitwise: 20 `train --max-steps 20` steps' adapter and
  optimizer files identical, losses equal): LoRA's B product is added inside the matmul (lora.LoRALinear.
  base_plus_update: addmm_ into the 2-D base output; an in-place add on a view of it instead cost +198 ms of
  copy_ in backward through CopySlices), and one audio argmax serves predictions and accuracy (was two).
  Before that fix the profile had add +118 and fill_ (fresh (N, out) products). One LoRALinear 1024 -> 2816 on
  (2, 512) forward + backward: min 88.9 -> 83.5 ms, median 97.5 -> 87.0. Whole step, old and new in one process
  beside plain, min of 4-5 alternations (thread CPU s): 4.51 old / 4.53 new / 3.87 plain, then 4.90 / 4.58 /
  4.44: MFU ratio 0.887 -> 0.882 and 0.934 -> 1.00 (the box moves all three by ~10% between runs: the 0.95
  target is within reach but not shown reliably); `--only mfu` alone, quiet box: 0.83 before (5.54 vs 4.46 s),
  0.868 after (4.86 vs 4.09 s). Not done: text argmax only on log steps (API change in
  TextScores/evaluate, ~20 ms), fused q,k,v / gate,up base weights (the checkpoint's names), sharing silu(g)
  between swiglu's backward and lora_in's rebuild.
- #27, audio tokenizer (audio.py): against transformers' HiggsAudioV2TokenizerModel on the same random weights
  at the released shape (written once as transformers' folder, read by each side's own loader), fresh process
  per run, alternating; codes compared in the row (equal, and the decoded audio bitwise equal: same convs).
  Profile (10 s clip, thread CPU time, 1 thread): encode 3.7 s = DAC encoder convs 1.6 s (0.8 s of it the
  64-channel stage at 240k samples), Snake 0.5 s, HuBERT 1.1 s (matmuls 0.6, attention 0.3), the rest small;
  decode 1.8 s = convs 1.1 s, transposed convs 0.33 s, Snake 0.3 s. Resampling and the quantizer are ~1%.
  What changed, each bitwise equal (codes and audio hashed before/after): Snake runs slice by slice (128k
  elements) in one reused buffer, over its input where that input is a temporary (layers.snake_into, _Chain):
  at the encoder's first stage (64 x 240k) the old one's fresh 61 MB temporary (mapped anew by glibc on each
  call: a page fault per 4 KiB) and five full passes took 135 ms, the sliced one 42-59 ms; the
  transposed convs hand oneDNN channels-last tensors (layers._ConvTranspose1d: it computes in channels-last
  anyway, and PyTorch's strided copy back cost as much as the conv at the last stage). Before/after in one
  process, CPU time, 1 thread: decode 1.81 -> 1.62 s, encode 3.64-3.85 -> 3.61-3.67 s. Not done, because not
  bitwise: channels-last for the ordinary convs (other oneDNN kernels: 1e-6 relative differences, ~16% less
  conv time), im2col + GEMM. Both sides pay the same conv time (~60% of it), which bounds the ratio.
  2 threads on this shared 2-core box measure the scheduler, not the code: with one other busy process every
  parallel region waits at its barrier for a descheduled thread, and the same build gave 2.6 s and 20 s for one
  encode (transformers 10 s, 2x its own 1-thread time). Only the 1-thread rows below are figures.
  Batch encoding (AudioTokenizer.encode_batch, prepare --encode-batch, default 1): only clips of one length go
  together; padding cannot be exact (HuBERT's GroupNorm normalizes over the whole clip, its attention sees every
  frame, and each conv's zero padding would read the padded region's activations). With 1 thread it gains
  nothing (convs dominate and already fill the core); with 2 threads on the busy box it was 2.3x (fewer parallel
  regions per audio second to wait at: a figure of the contention as much as of the code). N clips take N times
  the memory, hence the default of 1.

`python -m higgs_min.bench --only audio_tokenizer` parts, 2026-12-07, 1 thread, load 2-3 (shared box), 10 s clip,
min of 3 alternating fresh processes:

| | higgs_min | transformers 5.24 | ratio | target | met |
|---|---|---|---|---|---|
| encode (codes equal) | 3.90 s | 5.40 s | 0.72 | <= 0.8 | yes (1 thread) |
| decode (audio bitwise equal) | 1.70 s | 1.89 s | 0.90 | <= 0.8 | no |
| corpus encoding, 8 clips x 5 s, batches of 4 vs one at a time (audio-s/s; both higgs_min, codes equal) | 2.00 | 2.06 | 0.97 | > 1 | no gain |
| same, 2 threads, load 2.2 -> 3.7 (one run each) | 0.92 | 0.40 | 2.3 | > 1 | yes, under contention |

Before/after (590f2d7 vs 5f9c690) beside transformers, 1 thread, load 4.8, fresh processes in turn old/new/theirs,
two rounds, min of 2 runs in each process: encode 3.73/3.88 -> 3.48/3.67 s (transformers 4.72/4.81: 0.79/0.81 ->
0.74/0.76); decode 1.62/1.74 -> 1.41/1.57 s (transformers 1.88/1.87: 0.86/0.93 -> 0.75/0.84). Codes equal and
audio bitwise equal in all three.

# ---- measured tables

#27's rows, all on one quiet machine (a fresh 2-core Intel Xeon, nothing else running, load 0.5-1.6 from the
bench itself), 2026-12-07, main at 4ff8429; each `--only` group alone, in this order:

| row (`--only`) | higgs_min | alternative | ratio | #27 target | met |
|---|---|---|---|---|---|
| audio tokenizer encode, 10 s, 2 threads (codes equal); three runs | 1.51 / 1.90 / 1.47 s | 2.38 / 2.65 / 2.92 s (transformers) | 0.63 / 0.71 / 0.50 | <= 0.8 | yes |
| audio tokenizer decode, 10 s, 2 threads (audio bitwise equal) | 0.64 / 1.01 / 0.71 s | 0.82 / 0.94 / 1.02 s | 0.78 / 1.07 / 0.70 | <= 0.8 | 2 of 3 (median 0.78) |
| same, 1 thread: encode | 2.74 / 2.93 / 3.17 s | 4.10 / 4.17 / 4.55 s | 0.67 / 0.70 / 0.70 | (2 threads) | |
| same, 1 thread: decode | 1.33 / 1.35 / 1.45 s | 1.64 / 1.63 / 1.69 s | 0.81 / 0.83 / 0.86 | (2 threads) | |
| corpus encoding, batches of 4 vs one at a time, 2 threads | 6.42 / 5.22 / 6.58 audio-s/s | 5.61 / 5.54 / 6.35 | 1.14 / 0.94 / 1.04 | > 1 | 2 of 3 |
| LoRA step with audio, tokens per CPU second (`peer_audio`) | 262 | 103 (transformers + PEFT) | 2.54x | >= 2.5x | yes |
| same, extra peak memory | 977 MiB | 2,546 MiB | 0.38 | <= 0.5 | yes |
| MFU, mid shape with audio (`mfu`), vs a plain stack without LoRA; three runs | 62.5 / 66.6 / 65.4% | 67.1 / 68.4 / 67.7% | 0.93 / 0.97 / 0.965 | >= 0.95 | yes by the median (ceiling 0.98-0.99) |
| same, vs the plain stack with a textbook LoRA + AdamW | | 60.5 / 62.8 / 62.8% | 1.03 / 1.06 / 1.04 | | |
| checkpoint save vs its durability floor (`checkpoint`) | 0.263 s | 0.437 s | 0.60 (median 0.61) | <= 1.1 | yes |
| resume, page cache warm, vs plain load + sha256 spread over cores | 0.271 s | 0.284 s | 0.95 | <= 1.1 | yes |
| same, cold | 0.466 s | 0.459 s | 1.02 | <= 1.2 | yes |
| merge of 2 3B-shape layers (bf16): peak above the weights (`merge`) | 137 MiB | 871 MiB (a kept copy) | 0.16 | copy-free | yes |
| 1M-sample corpus (70 shards): open + first batch with verification (`corpus`), each shard hashed before its first sample vs every shard first | 0.35 s | 4.61 s | 0.08 | < 5 s | yes |
| `prepare pack`, 2 workers, codes given, 100k samples | 6,248 samples/s | | | >= 2,000 | yes |

The MFU runs: the first right after the tokenizer rows, the other two back to back 35 minutes later (the peak
matmul rate measured in each run moves each MFU; the ratio is what counts). The ceiling: the plain stack's
time plus LoRA's rank-16 matmuls alone (0.15-0.18 s of thread CPU against 3.40-3.50 s; `lora_matmul_floor`)
gives 0.98-0.99, so "same matmuls, same FLOPs" does not hold against a stack without LoRA. A profile of the
two steps (2 steps, 1 thread) has aten::mm +194 ms (the thin LoRA products), the rest spread over elementwise
ops whose cost moves by 2-4x between profiles of the same code (log_softmax 16-115 ms, fill_ 23-106 ms: first
touches of fresh allocations above glibc's 32 MiB mmap threshold), so no single op is left to fix. Tried and
dropped: the decoder in channels-last (oneDNN's other kernels) was 15-25% slower.

The tokenizer runs: 12:29, 13:11 and 13:36 on the same box. In the second, 2-thread work scaled poorly (our
decode 1.33 s at 1 thread, 1.01 s at 2; in the first 1.33 and 0.64) with nothing else running in the VM: the
host, not the code (both contestants slowed, ours more; Snake pieces 8x larger did not change it). The 1-thread
decode, the steady figure, misses 0.8 by 1-6%. Profile (1 thread, self CPU ms): ours 1,172 vs theirs 1,450, of
which both pay the same oneDNN convolutions (~880: k=7 convs 649, transposed 130-155, 1x1 92-99); our Snake
210 vs their 419, our layout copies 73 vs 127. With ~880 ms shared, 0.8 needs our remaining ~290 ms at ~280.
Tried and dropped: Snake pieces of whole contiguous channel rows instead of time slices across channels
(bitwise equal; 16 alternations: 1.229 vs 1.236 s median, nothing), addcmul for the last two passes (not
bitwise), the first transposed conv without the channels-last copies (7-16 ms faster at that stage only).


One `make bench` (3 minutes), 2 cores (AMD EPYC), 24 GB, no GPU, torch 2.11.0, 2026-11-24; medians
after warm-up, memory from fresh subprocesses:

| benchmark | ours | alternative | ratio | target | met |
|---|---|---|---|---|---|
| audio loss fwd+bwd at [600, 8, 1026]: vectorized vs a per-codebook loop (max abs diff 0.0) | 8.26 ms | 29.7 ms | 3.6× faster | ≥ 3× | yes |
| text loss extra peak memory, fwd+bwd, B=8 L=504 H=3072 V=128256, 233 targets: labelled rows vs `[B, L, V]` logits | 328 MiB | 7,894 MiB | 4.2% | ≤ 5% | yes |
| LoRA step, `tiny` preset, demo batch (B=8, L=118): model FLOP/s ÷ fp32 matmul FLOP/s | 77 GFLOP/s | 177 GFLOP/s | 44% MFU, 4,546 tokens/s | ≥ 70% | no (per-op overhead at hidden 256) |
| mid-size shapes, text only, vs transformers 5.23 + PEFT 0.21 LoRA (r=16, same targets, fp32) | 304 tokens/s | 126 tokens/s | 2.4× | ≥ 1.5× | yes |
| extra peak memory of a training step, same | 1,458 MiB | 2,781 MiB | 0.52× | ≤ 0.7× | yes |
| data: tokenize + collate (demo set) vs the tiny training step's consumption | 1,025 samples/s | 45.6 samples/s | 22× | loader never the bottleneck | yes |

`python -m higgs_min.bench --only mfu,act_ckpt,checkpoint`, 2026-12-02, same machine **shared with six
other engineers' jobs (1-minute load average shown per row)**; contestants alternate, the minimum of the
repeats is kept, `os.sync()` before every save or load; the ratios are what the rows are for:

| benchmark | ours | theirs | ratio | target | met |
|---|---|---|---|---|---|
| LoRA step, mid preset (H=1024, 8 layers, V=128256, B=2, L=512), half the positions audio, vs a plain PyTorch Llama stack of the same shape; MFU against the best of 3 fp32 matmuls; 1 thread, `--quick`, load 11.2 → 8.5 | 64.8% MFU (32.5 s) | 74.8% MFU (27.2 s) | 0.87 (time 0.84) | ≥ 0.85 | yes, narrowly |
| checkpoint save, 39.5M LoRA params + AdamW moments (473 MB, 2 files), atomic vs `save_file` + fsyncs; load 5.9 → 6.3 | 0.82 s | 0.74 s | 1.10 | ≤ 1.1 | yes, at the line (0.77-0.88 in three earlier runs) |
| checkpoint load with sha256 (one pass) vs plain `load_file`, page cache warm | 0.94 s | 0.34 s | 2.75 | ≤ 1.2 | no: sha256 alone of the bytes takes 0.67 s |
| same, cold (`posix_fadvise(DONTNEED)` first: a resume after a restart) | 0.72 s | 0.67 s | 1.07 | ≤ 1.2 | yes |
| activation checkpointing, mid preset B=2 L=512, half audio: bytes kept for backward, on vs off; load 6.2 → 8.0 | 85 MiB | 645 MiB | 0.13 | memory down | yes; time 38.7 s vs 27.0 s (1.43×) |
| same at B=1 L=2048 | 161 MiB | 1,281 MiB | 0.13 | memory down | yes; time 98.3 s vs 60.2 s (1.63×) |

Generation (`--only generate`, 2026-12-02, load 6-9, `OMP_NUM_THREADS=1`; mid preset: H=1024, 8
layers, DualFFN, V=128256, 40-token prompt):

| benchmark | KV-cached | alternative | ratio | target | met |
|---|---|---|---|---|---|
| one step at audio frame 50 vs re-running all 91 positions | 580 ms | 4,355 ms | 7.5× faster | | |
| one step at audio frame 500 vs re-running all 541 positions | 579 ms | 14,520 ms | 25× faster | ≥ 10× | yes |
| cached step at frame 500 vs at frame 50 | 579 ms | 580 ms | 1.00× | ≤ 1.5× | yes |
| `generate`, forced audio, 150 steps, official sampling defaults | 2.45 frames/s | 25 frames/s (real time) | real-time factor 10.2 | | |

Audio tokenizer (`--only audio_tokenizer --quick`, 2026-12-02, load 13-15; random weights, fp32, a fresh
process per figure):

| | Higgs tokenizer | DAC 24 kHz | ratio |
|---|---|---|---|
| encode, 10 s clip (compute s per audio s) | 5.41 | 7.21 | 0.75 |
| decode, 10 s clip (compute s per audio s) | 2.12 | 9.90 | 0.21 |
| encode extra peak memory, 60 s clip | 1,790 MiB | 1,758 MiB | 1.02 |

Packed corpus (`--only corpus`, 12 minutes, 2026-12-02, load 6-10; ~420-position synthetic
conversations; the 1M corpus is the 100k one's 7 shards tiled ten times; RssAnon from a fresh process):

| | 10k | 100k | 1M (tiled) | target |
|---|---|---|---|---|
| `prepare pack`, 2 workers, codes given | | 1,100 samples/s (583 MB, 7 shards) | | ≥ 2,000 samples/s: **missed** under this load |
| packed: open + first batch | 0.036 s | 0.031 s | 0.081 s | open ≤ 1 s at 1M |
| packed: RssAnon added by opening | 0.4 B/sample | 5.1 B/sample | 6.7 B/sample (6.4 MiB; 14.2 MiB after the first batch) | ≤ 64 B/sample + O(batch) |
| packed: whole-process RssAnon after the first batch | 271 MiB | | 285 MiB (1M/10k = 1.05) | ratio ≤ 1.5 |
| JSONL path (every line planned and held): open + first batch | 7.1 s | 89.8 s | | |
| JSONL path: RssAnon added | 6,924 B/sample | 6,828 B/sample | | |
| old eager `load_jsonl` (every sample materialized up front) | 24.7 s | | | |
"""
