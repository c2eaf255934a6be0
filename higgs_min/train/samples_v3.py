"""Listening to a Higgs Audio v3 run: train/samples.py's Family for v3 (V3), chosen by train/run.py listener().

A v3 training sample (v3/layout.py V3Encoder.plan) is one TTS request and its answer:

    <|tts|> [<|ref_text|> …] [<|ref_audio|> R reference rows] <|text|> tok(text) <|audio|> T + K - 1 target rows

Cut just before the target rows, it is the prompt the model is served with (V3Encoder.prompt, as `generate`
lays it out: generate/v3.py generate_codes), ending with <|audio|>, whose position predicts row 0. The target
rows are the clip delayed (BOC above the diagonal, EOC below it); reverted, they are the reference codes (K, T).
Generation is the serving sampler (v3/sampler.py generate_v3) with its defaults for speech, as the CLI's.
Decoding: with no decoder option, a released v3 --base-weights folder's bundled codec, as `generate` decodes
(train/options.py check_listening records it as --audio-tokenizer; generate/v3.py bundled_codec).
"""

from __future__ import annotations

import torch

from higgs_min.data import revert_delay_pattern
from higgs_min.train.samples import Family, Generated, Held
from higgs_min.v3.sampler import V3Prompt, generate_v3


def held_prompt_v3(sample, index: int, encoder) -> Held | None:
    """A v3 sample cut before its target rows (None when it has none: a conversation without assistant audio).
    The target is the sample's one assistant stream, its last positions (v3/layout.py)."""
    out = torch.nonzero(sample.audio_out_mask)[:, 0]
    if len(out) == 0:
        return None
    start, end = int(out[0]), int(out[-1]) + 1
    codes = revert_delay_pattern(sample.audio_codes[start:end].T)  # (K, T + K - 1) delayed rows -> (K, T)
    ids = sample.input_ids
    text_at = torch.nonzero(ids[:start] == encoder.ids["text"])[:, 0]  # <|text|> tok(text) <|audio|>
    text = encoder.tok.decode(ids[int(text_at[-1]) + 1:start - 1].tolist(), skip_special_tokens=True).strip()
    whole = V3Prompt.of(sample)  # the reference rows as input, as generation reads a prompt
    prompt = V3Prompt(whole.input_ids[:start].clone(), whole.audio_codes[:start].clone(),
                      whole.audio_mask[:start].clone())
    return Held(f"eval-{index:04d}", index, prompt, codes.long().clone(), text)


def generate_codes_v3(model, prompt: V3Prompt, limit: int, seed: int) -> Generated:
    """The serving sampler's rows, reverted to codes; "eos" when codebook 0's EOC ended the clip."""
    g = generate_v3(model, prompt, max_new_tokens=limit, seed=seed)
    return Generated(g.codes, "eos" if g.stopped == "eoc" else "limit", g.steps)


V3 = Family("v3", held_prompt_v3, generate_codes_v3)
