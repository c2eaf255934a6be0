"""`make bench`: every figure measured beside its alternative, and `make gpu-check`. Not imported by training.

    python -m higgs_min.bench ...     (= higgs-min bench; __main__.py -> rows.main)

The measured tables are in README "Benchmarks". What lies behind the figures there:

- Memory figures come from fresh subprocesses: peak RSS above the set-up, the peak reset through
  /proc/self/clear_refs (or RssAnon from /proc/self/status, corpus.py).
- Mid-preset MFU row: the trainer's own Scorer + objective + AdamW with half the positions audio (DualFFN
  norms + gather/scatter timed) vs a plain PyTorch Llama stack of the same shape (fused qkv, RoPE, SDPA, no
  LoRA, no routing, the same heads at the same rows); MFU against the best of 3 large fp32 matmuls in the same
  run, attention backward counted 2x forward. Save row: atomic (sha256 while writing, fsync each file,
  manifest, fsync folder, rename, fsync parent) vs the durability floor (save_file + fsync of each file and
  the folder).

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
"""
