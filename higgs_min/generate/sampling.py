"""Generation: text and audio from a chat prompt, with a KV cache and the official delay-pattern sampling.

Computes what boson-ai/higgs-audio does in boson_multimodal/model/higgs_audio/modeling_higgs_audio.py
(`HiggsAudioModel._sample`, `_sample_text_tokens`, `_sample_audio_tokens`) as called by
boson_multimodal/serve/serve_engine.py (`HiggsAudioServeEngine.generate`), batch size 1 as there.

One step adds one text token or one audio column (K codes); the mode comes from the last token fed:

    <|audio_out_bos|>  start a segment: its first column is all BOS (nothing is sampled)
    <|AUDIO_OUT|>      feed the last column as one audio-out position, sample K codes from the
                       audio head (codebooks independent), apply the delay rules (`delay_rules`);
                       when the segment ends the text token <|audio_eos|> is fed instead
    anything else      sample the text head; a stop id ends generation

Every step counts against `max_new_tokens`. Per segment, `audio` keeps the delayed columns
(K, cols) including the BOS column (the official `audio_sequences`); `codes` reverts the delay,
clips to [0, C-1] and drops the first (BOS) and last (EOS) frame as serve_engine does, segments
concatenated along time.

Prompt: `ChatEncoder.prompt` = the training layout of the turns, then
`<|start_header_id|>assistant<|end_header_id|>\\n\\n` (+ `<|audio_out_bos|>` with --force-audio). Column j of a
segment forces codebooks >= j to BOS; the first codebook that emits EOS forces those before it to EOS and the
EOS prefix grows one codebook per step until the last; then <|audio_eos|> is fed (the final column is kept,
not fed). A segment cut short with fewer than K columns yields no codes (the official crashes there);
<|AUDIO_OUT|> sampled in text mode is an error naming the step. Stop ids: <|eot_id|>, <|end_of_text|>.

Sampling: temperature -> top-k -> top-p (transformers' warpers, checked against them) -> multinomial, each
codebook on its own; temperature 0 is argmax. Repetition-aware sampling (RAS): a codebook whose candidate
occurs >= ras_max_repeat times in its last ras_win_len audio-out columns (prompt audio included) is redrawn
from the raw softmax; as in the official this also applies at temperature 0 (ras_win_len 0 turns it off).
A seed seeds one torch.Generator: a run repeats exactly on CPU.

KV cache (model.KVCache): tests check that any chunking of the prefill equals the full forward (hidden states
and both heads, 1e-5), that greedy decoding with and without the cache gives the same tokens, and that a
model overfit on one demo conversation regenerates its text and codes exactly.

The CLI (`python -m higgs_min.generate`, see `main`) lives in generate/cli.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from higgs_min.chat import DEFAULT_SYSTEM
from higgs_min.data import revert_delay_pattern
from higgs_min.schema import DataError
from higgs_min.prepare.codes_file import load_codes
from higgs_min.model import KVCache


class GenerationError(RuntimeError):
    """The model produced something generation cannot continue from (named, with the step)."""


def system_message(scene: str | None = None) -> str:
    """The official default system message, with the scene block when a scene is given."""
    parts = [DEFAULT_SYSTEM]
    if scene:
        parts.append(f"<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>")
    return "\n\n".join(parts)


def build_messages(text: str, system: str | None = None, scene: str | None = None,
                   reference_text: str | None = None, reference_audio: dict | None = None) -> list[dict]:
    """Messages for one generation, as examples/generation.py `prepare_generation_context` builds them.

    Voice cloning (reference_text + reference_audio, an audio item {"type": "audio", "codes": ...}):
    a user turn with the reference transcript and an assistant turn whose content is the reference
    audio, before the target text. As the official, a reference without a scene gets no system message.
    system "" means no system turn (what a run trained without one records).
    """
    if (reference_text is None) != (reference_audio is None):
        raise ValueError("voice cloning needs both the reference audio and its transcript (--reference-text)")
    messages = []
    if system is not None:
        if system:
            messages.append({"role": "system", "content": system})
    elif reference_audio is None or scene:
        messages.append({"role": "system", "content": system_message(scene)})
    if reference_audio is not None:
        messages.append({"role": "user", "content": reference_text})
        messages.append({"role": "assistant", "content": [reference_audio]})
    messages.append({"role": "user", "content": text})
    return messages


def codes_loader(K: int, C: int, root: str | Path = ".") -> Callable:
    """`codes_of(item, where)` for ChatEncoder: an item's "codes" is a (K, T) array or a .npy/.safetensors path."""
    def codes_of(item, where):
        c = item.get("codes")
        if isinstance(c, (str, Path)):
            return load_codes(Path(root) / c, f"{where}.codes", K, C)
        if isinstance(c, (np.ndarray, torch.Tensor)):
            c = torch.as_tensor(np.asarray(c)).long()
            if c.ndim != 2 or c.shape[0] != K or c.shape[1] == 0:
                raise DataError(f"{where}.codes: shape {list(c.shape)}, expected [{K}, T] with T > 0")
            if int(c.min()) < 0 or int(c.max()) >= C:
                raise DataError(f"{where}.codes: values in [{int(c.min())}, {int(c.max())}], expected [0, {C})")
            return c
        raise DataError(f"{where}: an audio item needs 'codes' (an array or a path)")
    return codes_of


@dataclass
class Prompt:
    """What generation starts from. L positions, K codebooks; the layout of data.materialize."""
    input_ids: torch.Tensor  # (L,)
    audio_codes: torch.Tensor  # (L, K) stream ids at audio positions
    audio_mask: torch.Tensor  # (L,) bool: audio in or out (codebook embeddings, audio FFN)
    audio_out_mask: torch.Tensor  # (L,) bool: audio-out positions (their columns start the RAS history)
    special: dict  # special-token ids by name (ChatEncoder.ids)
    vocab_size: int | None = None  # tokenizer size; sampled ids >= it are kept (decode skips them)


def make_prompt(encoder, messages: list[dict], force_audio: bool = False, codes_root: str | Path = ".") -> Prompt:
    """The chat encoder's generation prompt (ChatEncoder.prompt) for `messages`."""
    s = encoder.prompt(messages, codes_loader(encoder.K, encoder.C, codes_root), force_audio=force_audio)
    return Prompt(s.input_ids, s.audio_codes, s.audio_in_mask | s.audio_out_mask, s.audio_out_mask,
                  dict(encoder.ids), encoder.tok.get_vocab_size())


# --------------------------------------------------------------------------- sampling pieces

def warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (N, V) -> scores (N, V): temperature, then top-k, then top-p, each row independently.

    The order and the rules of transformers' TemperatureLogitsWarper, TopKLogitsWarper (keeps ties
    with the k-th) and TopPLogitsWarper (drops the low tail whose mass <= 1 - top_p, keeps >= 1 token).
    """
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def choose(scores: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """scores (N, V) -> ids (N,): argmax, or one multinomial draw per row."""
    if greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), num_samples=1, generator=generator).squeeze(1)


def repetition_aware(tokens: torch.Tensor, history: torch.Tensor, raw_logits: torch.Tensor, win_len: int | None,
                     max_repeat: int, resample: Callable) -> torch.Tensor:
    """Repetition-aware sampling (official `_sample_audio_tokens`): tokens (K,), history (K, n) of every
    audio-out column so far, raw_logits (K, C+2) before any warping.

    A codebook whose candidate occurs >= max_repeat times in its last `win_len` history columns is
    redrawn by `resample(raw_logits[rows]) -> (len(rows),)` (the official: softmax of the raw logits,
    multinomial). Off when win_len is None or <= 0. Applies in greedy mode too, as in the official.
    """
    if win_len is None or win_len <= 0:
        return tokens
    repeats = (history[:, -win_len:] == tokens[:, None]).sum(1)  # (K,)
    rows = torch.nonzero(repeats >= max_repeat).squeeze(1)
    tokens = tokens.clone()
    tokens[rows] = resample(raw_logits[rows])
    return tokens


@dataclass
class DelayState:
    """Where the current segment is in the delay pattern."""
    num_delay: int = 0  # columns sampled so far in this segment, capped at K - 1
    remaining: int | None = None  # columns left after the first EOS; None before any


def delay_rules(col: torch.Tensor, state: DelayState, bos: int, eos: int) -> tuple[torch.Tensor, bool]:
    """The official delay-pattern rules on one sampled column (K,). Returns (column, segment ended).

    Column j of a segment (j = 1 .. K-1) has codebooks >= j forced to BOS. The first EOS at codebook e
    forces codebooks < e to EOS and leaves K - e - 1 more columns, each forcing one more codebook to EOS;
    the segment ends with the column after which none is left (EOS at the last codebook: at once).
    """
    K = col.shape[0]
    col = col.clone()
    if state.num_delay + 1 < K:
        col[state.num_delay + 1:] = bos
        state.num_delay += 1
    if state.remaining is not None:
        col[:K - state.remaining] = eos
        state.remaining -= 1
    else:
        at = torch.nonzero(col == eos)
        if at.numel() > 0:
            # The official names this `last_eos_idx` but computes nonzero()[0][-1]: the FIRST EOS codebook.
            first = int(at[0, 0])
            col[:first] = eos
            state.remaining = K - first - 1
    if state.remaining is not None and state.remaining <= 0:
        state.num_delay, state.remaining = 0, None
        return col, True
    return col, False


def segment_codes(delayed: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """One segment's delayed columns (K, cols), BOS column first -> codes (K, T).

    serve_engine: revert_delay_pattern(...).clip(0, C - 1)[:, 1:-1]. With fewer than K columns (a segment
    cut short by max_new_tokens) the official revert fails; this returns (K, 0) instead.
    """
    K, cols = delayed.shape
    if cols < K:
        return delayed.new_zeros((K, 0))
    return revert_delay_pattern(delayed).clamp(0, codebook_size - 1)[:, 1:-1]


# --------------------------------------------------------------------------- one forward (both families)

def last_hidden(model, feed: tuple, seq: tuple | None, cache: KVCache | None) -> torch.Tensor:
    """The last position's hidden state (H,) once `feed` = (ids (n,), codes (n, K), audio mask (n,)) is added.

    With the KV cache only `feed` runs (the cache holds everything before it); without it (use_cache=False)
    `seq`, the whole sequence so far with `feed` at its end, runs again: the full forward that cached decoding
    is tested against. Both families decode through it (v3/sampler.py `generate_v3`)."""
    ids, codes, mask = feed if cache is not None else seq
    return model(ids[None], None, codes[None], mask[None], cache=cache)[0, -1]


def extend(seq: tuple, feed: tuple) -> tuple:
    """`seq` with `feed` appended, position-wise (the uncached forward's input)."""
    return tuple(torch.cat([s, f]) for s, f in zip(seq, feed, strict=True))


# --------------------------------------------------------------------------- one step

@dataclass
class Sampling:
    """How a step draws from logits: warp (temperature -> top-k -> top-p) then `choose`, or argmax at
    temperature 0; `sampler(scores, greedy) -> ids` replaces `choose` (tests). RAS settings as `repetition_aware`."""
    temperature: float
    top_k: int | None
    top_p: float | None
    ras_win_len: int | None
    ras_max_repeat: int
    generator: torch.Generator | None = None
    sampler: Callable | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draw(self, raw: torch.Tensor) -> torch.Tensor:
        """raw logits (N, V) -> ids (N,)."""
        scores = raw if self.greedy else warp(raw, self.temperature, self.top_k, self.top_p)
        if self.sampler is not None:
            return self.sampler(scores, self.greedy)
        return choose(scores, self.greedy, self.generator)

    def redraw(self, raw: torch.Tensor) -> torch.Tensor:
        """The official RAS redraw: raw logits (N, V) -> ids (N,) from the raw softmax, one multinomial draw each."""
        return raw.softmax(-1).multinomial(1, replacement=True, generator=self.generator).squeeze(1)


@dataclass
class Decoding:
    """What the loop carries from step to step (batch 1)."""
    last: int  # the last token fed: it picks the next step's mode
    history: torch.Tensor  # (K, n) every audio-out column so far, prompt included: the RAS window's source
    text_ids: list = field(default_factory=list)  # as Generation.text_ids
    segments: list = field(default_factory=list)  # per segment: its columns (K,), BOS column first
    delay: DelayState = field(default_factory=DelayState)


def decode_step(model, h: torch.Tensor, d: Decoding, s: Sampling, sp: dict, step: int, stop: set,
                max_segments: int | None) -> tuple[int, torch.Tensor | None, str | None]:
    """One step from the last position's hidden state h (H,), in the mode of the last token fed (module docstring;
    the official `_sample` with `_sample_audio_tokens` / `_sample_text_tokens`). Records the step in `d` and returns
    (the token to feed next, its audio column (K,) or None at a text position, why generation stops here or None).
    A segment's final column is kept but not fed: <|audio_eos|> is fed instead."""
    cfg = model.config
    K, bos, eos = cfg.audio_num_codebooks, cfg.audio_stream_bos_id, cfg.audio_stream_eos_id
    if d.last == sp["audio_out"]:  # AUDIO_IN_PROGRESS
        raw = model.audio_logits(h[None])[0].float()  # (K, C+2)
        col = repetition_aware(s.draw(raw), d.history, raw, s.ras_win_len, s.ras_max_repeat, s.redraw)
        col, ended = delay_rules(col, d.delay, bos, eos)
        d.segments[-1].append(col)
        d.history = torch.cat([d.history, col[:, None]], 1)
        if ended:
            d.text_ids.append(sp["audio_eos"])
            done = max_segments is not None and len(d.segments) >= max_segments
            return sp["audio_eos"], None, "audio segments" if done else None
        return sp["audio_out"], col, None
    if d.last == sp["audio_out_bos"]:  # AUDIO_INIT: nothing sampled
        col = torch.full((K,), bos, dtype=torch.long, device=h.device)
        d.segments.append([col])
        d.history = torch.cat([d.history, col[:, None]], 1)
        d.text_ids.append(sp["audio_out"])
        return sp["audio_out"], col, None
    # TEXT
    tok = int(s.draw(model.text_logits(h[None]).float())[0])  # from (1, V)
    # An id in the model's padded vocabulary but beyond the tokenizer is kept and fed back, as the official
    # _sample does (no check there); ChatEncoder.decode skips it, as the official decode.
    if tok == sp["audio_out"]:
        raise GenerationError(f"step {step}: the model sampled <|AUDIO_OUT|> in text mode; an audio segment can "
                              "only start with <|audio_out_bos|> (use --force-audio, or check that the adapter "
                              "matches the base)")
    d.text_ids.append(tok)
    return tok, None, "stop id" if tok in stop else None


# --------------------------------------------------------------------------- the loop

@dataclass
class Generation:
    text_ids: list  # generated text ids: one <|AUDIO_OUT|> per audio segment, stop id included
    audio: list  # per segment: delayed columns (K, cols), BOS column first
    codes: torch.Tensor  # (K, T): every segment's codes, concatenated
    steps: int  # steps taken (<= max_new_tokens)
    stopped: str  # "stop id", "audio segments" (max_segments ended) or "max_new_tokens"
    frames: int = field(init=False)

    def __post_init__(self):
        self.frames = int(self.codes.shape[1])


def check_request(cfg, prompt: Prompt, max_new_tokens: int, temperature: float) -> None:
    """What generation refuses before the first forward (one ValueError / GenerationError naming it)."""
    if not cfg.use_delay_pattern:
        # the official sampler (_sample_audio_tokens) is written for the delay pattern; no-delay decoding
        # is not implemented here, so refuse rather than apply delay rules to a model trained without them
        raise GenerationError("generation needs use_delay_pattern true; this model's config sets it false")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if len(prompt.input_ids) == 0:
        raise ValueError("empty prompt")
    if int(prompt.input_ids[-1]) == prompt.special["audio_out"]:
        raise ValueError("the prompt ends inside an audio segment (<|AUDIO_OUT|>): not supported; "
                         "end it with the assistant header, or <|audio_out_bos|> to force audio")


@torch.no_grad()
def generate(model, prompt: Prompt, *, max_new_tokens: int = 2048, temperature: float = 0.3,
             top_k: int | None = 50, top_p: float | None = 0.95, ras_win_len: int | None = 7,
             ras_max_repeat: int = 2, seed: int | None = None, stop_ids=None, use_cache: bool = True,
             on_step: Callable | None = None, sampler: Callable | None = None,
             max_segments: int | None = None) -> Generation:
    """Generate from `prompt` (batch 1). temperature 0 is greedy. seed: a torch.Generator on the model's
    device (None: torch's global generator, as the official). stop_ids: default <|eot_id|>, <|end_of_text|>
    (serve_engine's stop strings). use_cache=False re-runs the whole sequence each step (same tokens;
    for tests and the benchmark). on_step(step, frames) is called after each step. `sampler(scores,
    greedy) -> ids` replaces `choose` (tests). max_segments: stop once that many audio segments have ended by
    EOS (the training-time samples: one clip, no text after it)."""
    cfg = model.config
    K, C = cfg.audio_num_codebooks, cfg.audio_codebook_size
    check_request(cfg, prompt, max_new_tokens, temperature)
    sp = prompt.special
    param = next(model.parameters())
    dev = param.device
    stop = {int(i) for i in (stop_ids if stop_ids is not None else (sp["eot"], sp["end_of_text"]))}
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    s = Sampling(temperature, top_k, top_p, ras_win_len, ras_max_repeat, gen, sampler)

    # the prompt is the first feed (the prefill); every later feed is one position
    feed = (prompt.input_ids.to(dev).long(), prompt.audio_codes.to(dev).long(), prompt.audio_mask.to(dev).bool())
    cache = KVCache(cfg, len(feed[0]) + max_new_tokens, device=dev, dtype=param.dtype) if use_cache else None
    seq = feed if cache is None else None  # without the cache: everything fed so far
    d = Decoding(last=int(feed[0][-1]), history=feed[1][prompt.audio_out_mask.to(dev)].T)  # history (K, n)
    stopped, step = "max_new_tokens", 0
    zero_col = feed[1].new_zeros(K)
    was_training = model.training
    model.eval()
    try:
        for step in range(1, max_new_tokens + 1):
            h = last_hidden(model, feed, seq, cache)
            tok, col, why = decode_step(model, h, d, s, sp, step, stop, max_segments)
            if why is not None:
                stopped = why
                break
            d.last = tok
            feed = (feed[0].new_tensor([tok]), (zero_col if col is None else col)[None],
                    feed[2].new_tensor([col is not None]))
            if seq is not None:
                seq = extend(seq, feed)
            if on_step is not None:
                on_step(step, sum(len(seg) for seg in d.segments))
    finally:
        model.train(was_training)
    audio = [torch.stack(seg, 1) for seg in d.segments]  # (K, cols) each
    per = [segment_codes(a, C) for a in audio]
    codes_out = torch.cat(per, 1) if per else torch.zeros(K, 0, dtype=torch.long, device=dev)
    return Generation(d.text_ids, audio, codes_out.cpu(), step, stopped)
