"""Audio <-> codes: the Higgs Audio v2 tokenizer (tokenizer, layers, hubert) and DAC (codec), with wav io.

    tok = higgs_min.audio.tokenizer.load("hat/")   # any layout of tokenizer_files.py (original, transformers, v3)
    tok.encode(wav)          1-D float waveform at tok.sample_rate (24000) -> (8, T) int64 codes in [0, 1023]
    tok.decode(codes)        (8, T) -> 960·T samples
    tok.encode_file(path)    any integer-PCM wav (8/16/24/32-bit; channels averaged, resampled to 24 kHz)
    tok.identity             "higgs-audio-v2-tokenizer:<sha16>", the sha256 of the folded weights (the same for
                             model.pth and the converted model.safetensors); `prepare` writes it into every audio
                             item as "codec" (the DAC path writes "dac:<sha16 of the weights file>" or
                             "dac-random-seed:N"). Training logs it when it opens the data and refuses a data set
                             whose items mix codecs (a JSONL at start, a corpus already at `prepare pack`).

Loading is strict: every tensor is used or is on a named list of training-only tensors (fc_post1,
decoder_semantic, semantic_model.masked_spec_embed, the codebooks' inited/cluster_size/embed_avg); quantizer
layers past n_q are dropped with a warning, as the official forward never reads them; anything else is one
error naming the tensors. What is bit-exact and what is not: tests/test_audio_tokenizer.py.
"""
