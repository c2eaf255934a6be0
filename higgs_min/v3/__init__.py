"""Higgs Audio v3 TTS (bosonai/higgs-audio-v3-tts-4b): a Qwen3 decoder with one fused, tied audio matrix.

config.py (shape, presets, the released config.json), model.py (HiggsV3Model), weights.py (the released folder),
sampler.py (the serving sampler and the generation loop); the data layout (prompt + delayed rows + labels) is in
layout.py.
The core package never imports this folder; train/, generate/ and export/ do.
"""
