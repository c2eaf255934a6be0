"""higgs_min: a minimal, exact reference for LoRA fine-tuning of Boson AI's Higgs Audio models.

THE CORE, at the package top, in reading order (it imports nothing from the folders below):

    config.py        ModelConfig: the released shape, the presets, the released and transformers config.json
    model.py         the Llama decoder with the DualFFN audio path, KV cache, text and audio heads
    ops.py           two autograd functions that keep less for backward (SwiGLU; LoRA's A after it), bitwise equal
    lora.py          hand-written LoRA: a frozen linear + B·A·scale, merge, the adapter's files
    schema.py        the schema of a conversation, checked once (training lines, corpora, prompts)
    chat.py          a conversation -> Plan in the ChatML layout: tokenizer, special tokens, turns, labels
    data.py          Plan -> Sample -> batch: the delay pattern, audio labels, next-token targets, collate
    loss.py          text CE on the labelled rows only; the vectorized multi-codebook CE; target counts
    loop.py          one optimizer step: counts all-reduced, backward, clip, AdamW; log, eval, save
    distributed.py   torchrun's environment and the few collectives the loop uses
    checkpoint.py    folders that are complete or absent: temp folder, fsync, manifest of sha256, rename
    manifest.py      a checkpoint's manifest (sha256 per 32 MiB block) and every check of a folder against it
    atomic.py        the one atomic writer of every file and folder (temp name, fsync, 0644/0755, rename)
    train_state.py   what a checkpoint holds: adapter, AdamW moments, data position, every rank's RNG
    batches.py       which samples each rank trains on, resumable mid-epoch
    evaluate.py      held-out loss and accuracy, exact over ranks
    weights.py       base weights from disk (released names, transformers names), strictly
    runlog.py, errors.py, cli.py   what a run prints; one-line errors; the `higgs-min` command table

Follow one sample from a JSONL line to a gradient (one hop a line):

    higgs_min/prepare/sanitize.py:line_to_plan     the line parsed and checked (schema, codes headers)
    higgs_min/chat.py:ChatEncoder.plan             messages -> token ids, flags, codes segments (a Plan)
    higgs_min/data.py:materialize                  Plan -> Sample: delay pattern, text and audio labels
    higgs_min/data.py:collate                      Samples -> a right-padded batch (B, L) / (B, L, K)
    higgs_min/loop.py:train_step                   the step: micro-batches, counts, forward, backward, AdamW
    higgs_min/loss.py:target_counts                how many text and per-codebook audio targets, all ranks summed
    higgs_min/loop.py:Scorer.forward               model forward, heads on the scored rows only
    higgs_min/model.py:HiggsAudioModel.forward     embeddings (audio rows: summed codebooks), decoder layers
    higgs_min/lora.py:LoRALinear.forward           W x + (alpha / r) · B A dropout(x), inside every target
    higgs_min/loss.py:text_scores                  next-token text CE over labelled rows, in chunks
    higgs_min/loss.py:audio_scores                 next-token CE of all K codebooks in one call
    higgs_min/loss.py:weighted_loss                Σ losses / global counts (the objective and the logged loss)
    higgs_min/loop.py:save_everywhere              rank 0 writes; every rank learns the outcome
    higgs_min/checkpoint.py:save                   temp folder, fsync, manifest last, rename

THE FOLDERS (each imports the core, never the other way):

    train/      `python -m higgs_min.train`: options table, resume guard, data opening, building the run
    prepare/    the data pipeline: converters, wav -> codes, line checks, packed corpora
    audio/      the Higgs Audio v2 tokenizer (encode/decode), DAC, wav files
    generate/   generation with a KV cache and the official delay-pattern sampling
    export/     merged base folders, transformers' and PEFT's formats
    bench/      `make bench` and `make gpu-check`
"""
