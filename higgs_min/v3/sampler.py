"""Higgs Audio v3 generation: the serving sampler's rules, with the KV cache, batch size 1.

Computes what sglang-omni 0.1.9 serves (sglang_omni/models/higgs_tts/): sampler.py `step` and
`sample_independent` per step, on fp32 logits of the tied audio head (model.py `decode_codebooks_batch`), the
emitted row fed back through the fused embedding (model.py `decode_step_embeds_cg`), and the delayed rows
reverted to codes as the vocoder does (vocoder_scheduler.py `decode_delayed_rows`).

    step s:  codes (K,) = each codebook sampled on its own (temperature, top-k, top-p; argmax at t <= 1e-5)
             s < K      : codebooks > s forced to BOC; an EOC in codebook 0 is ignored (so >= K frames)
             countdown  : set to K - 2 by the first EOC in codebook 0 after that, then one less per step;
                          the step that brings it to 0 ends generation (its row is kept)
    output:  the emitted rows (R, K) = the delayed layout (R = T + K - 1 after a normal stop)
             -> codes (K, T): codebook c = rows c .. c + T - 1 of column c; BOC/EOC (>= C) -> 0

Unlike v2 (generate/sampling.py): no text mode, no BOS column (the prompt's <|audio|> token predicts the first
row), no repetition-aware resampling, and the stop is the countdown, not a forced EOS per codebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from higgs_min.data import revert_delay_pattern
from higgs_min.generate.sampling import choose, extend, last_hidden, warp
from higgs_min.model import KVCache

GREEDY_TEMPERATURE = 1e-5  # sampler.py _GREEDY_TEMP_THRESHOLD
# stages.py SPEECH_SAMPLING_DEFAULTS and config.py's max_new_tokens: the serving defaults for speech
DEFAULTS = {"temperature": 0.8, "top_k": 30, "top_p": 0.8, "max_new_tokens": 2048}


@dataclass
class V3Prompt:
    """What generation starts from (v3/layout.py V3Encoder.prompt, the training layout's prompt): L positions."""
    input_ids: torch.Tensor  # (L,) long; 0 at audio positions (ignored there)
    audio_codes: torch.Tensor  # (L, K) long: the delayed reference rows at audio positions, 0 elsewhere
    audio_mask: torch.Tensor  # (L,) bool

    @classmethod
    def of(cls, sample) -> "V3Prompt":
        """From a data.Sample (the reference rows are its audio-in positions)."""
        return cls(sample.input_ids.long(), sample.audio_codes.long(), sample.audio_in_mask | sample.audio_out_mask)


# ----------------------------------------------------------------------------- one step

def top_p_filter(scores: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """scores (N, V) -> (N, V) with the nucleus kept (sample_independent): sorted descending, a token is removed
    when the softmax mass up to and including the one before it exceeds top_p (the top token always stays).
    (v2's `warp` keeps the same set except at exact ties of the cumulative mass with top_p.)"""
    if top_p is None or top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
    remove = sorted_scores.softmax(-1).cumsum(-1) > top_p
    remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], -1)  # shift right: keep the first
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def sample_codes(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (K, C + 2) fp32 -> codes (K,): sampler.py `sample_independent`, each codebook on its own.
    Temperature and top-k are v2's `warp` (same rules: divide, keep >= the k-th); one multinomial draw per row."""
    if temperature <= GREEDY_TEMPERATURE:
        return logits.argmax(-1)
    scores = top_p_filter(warp(logits, temperature, top_k if top_k and top_k > 0 else None, None), top_p)
    return choose(scores, False, generator)


@dataclass
class SamplerState:
    """sampler.py HiggsSamplerState for one request."""
    num_codebooks: int
    delay_count: int = 0  # steps taken so far, counted up to K (the delay window)
    countdown: int | None = None  # steps left after codebook 0's EOC; None before it
    done: bool = False


def apply_rules(codes: torch.Tensor, state: SamplerState, boc: int, eoc: int) -> torch.Tensor:
    """sampler.py `step` after sampling: codes (K,) -> the emitted row (K,); advances `state`."""
    K = state.num_codebooks
    codes = codes.clone()
    if state.delay_count < K:
        codes[state.delay_count + 1:] = boc  # empty slice at the window's last step
        state.delay_count += 1  # an EOC in codebook 0 is not looked at inside the window
    elif state.countdown is not None:
        state.countdown -= 1
        state.done = state.countdown <= 0
    elif int(codes[0]) == eoc:
        state.countdown = K - 2
    return codes


def rows_to_codes(rows: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Emitted rows (R, K) -> codes (K, R - K + 1) (none when R < K), BOC/EOC cells -> 0 as the vocoder does."""
    R, K = rows.shape
    if R < K:
        return rows.new_zeros((K, 0))
    codes = revert_delay_pattern(rows.T)  # (K, T)
    return torch.where(codes >= codebook_size, torch.zeros_like(codes), codes)


# ----------------------------------------------------------------------------- the loop

@dataclass
class V3Generation:
    rows: torch.Tensor  # (R, K) the emitted delayed rows, in order
    codes: torch.Tensor  # (K, T)
    steps: int
    stopped: str  # "eoc" (the countdown ended) or "max_new_tokens"
    frames: int = field(init=False)

    def __post_init__(self):
        self.frames = int(self.codes.shape[1])


@torch.no_grad()
def generate_v3(model, prompt: V3Prompt, *, max_new_tokens: int = DEFAULTS["max_new_tokens"],
                temperature: float = DEFAULTS["temperature"], top_k: int | None = DEFAULTS["top_k"],
                top_p: float | None = DEFAULTS["top_p"], seed: int | None = None, use_cache: bool = True,
                on_step: Callable | None = None) -> V3Generation:
    """Generate audio rows from `prompt` (batch 1). temperature <= 1e-5 is greedy. seed: a torch.Generator on
    the model's device (None: torch's global generator, as serving without a seed). use_cache=False re-runs the
    whole sequence each step (same rows; tests). on_step(step, rows) after each step."""
    cfg = model.config
    K, C = cfg.audio_num_codebooks, cfg.audio_codebook_size
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    param = next(model.parameters())
    dev = param.device
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    ids, codes, mask = (prompt.input_ids.to(dev), prompt.audio_codes.to(dev), prompt.audio_mask.to(dev))
    if len(ids) == 0:
        raise ValueError("empty prompt")
    cache = KVCache(cfg, len(ids) + max_new_tokens, device=dev, dtype=param.dtype) if use_cache else None
    state, rows, stopped, step = SamplerState(K), [], "max_new_tokens", 0
    feed = (ids, codes, mask)  # the prompt first (the prefill), then one row a step
    seq = feed if cache is None else None  # without the cache: everything fed so far
    was_training = model.training
    model.eval()
    try:
        for step in range(1, max_new_tokens + 1):
            h = last_hidden(model, feed, seq, cache)
            raw = model.audio_logits(h[None])[0].float()  # (K, C + 2), fp32 as served
            row = apply_rules(sample_codes(raw, temperature, top_k, top_p, gen), state, C, C + 1)
            rows.append(row)
            if on_step is not None:
                on_step(step, len(rows))
            if state.done:
                stopped = "eoc"
                break
            # the row becomes the next input: one audio position (its input id is ignored)
            feed = (ids.new_zeros(1), row[None], mask.new_ones(1))
            if seq is not None:
                seq = extend(seq, feed)
    finally:
        model.train(was_training)
    out = torch.stack(rows).cpu()  # (R, K)
    return V3Generation(out, rows_to_codes(out, C), step, stopped)
