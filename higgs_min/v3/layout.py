"""Higgs Audio v3 TTS: one conversation -> the prompt the model is served with, then its delayed audio rows.

The prompt (sglang-omni 0.1.9 higgs_tts/text_tokenizer.py HiggsTokenizerAdapter.build_prompt; no chat template,
no BOS) and the training sample built on it, in v2's Plan / Sample structure (so `prepare pack`, the loss, eval
and the batches serve both families):

    <|tts|> [<|ref_text|> tok(ref transcript)] [<|ref_audio|> R ref rows] <|text|> tok(text) <|audio|> T+7 rows

    position      <|tts|> …  <|ref_audio|>  ref row 0..R-1   <|text|> …  <|audio|>   row 0 … row T+6
    input_ids     ids        id             0 (placeholder)  ids         id          0 (placeholder)
    audio_codes   ·          ·              delayed ref      ·           ·           delayed target
    audio_labels  -100       -100           -100             -100        -100        scored cells (LABELS)
    text_labels   -100 everywhere: the TTS model never generates text

Delay (higgs_tts/utils.py apply_delay_pattern): row r, codebook c holds BOC (1024) if r < c, code[c][r - c] if
c <= r < c + T, EOC (1025) if r >= c + T; T + 7 rows, no BOS input row (unlike v2): the `<|audio|>` token's
position predicts row 0, row r's position predicts row r + 1 (data.next_token_targets, the one shift rule).
The reference clip is laid out the same way (R = T_ref + 7 rows, BOC/EOC cells included: serving's
stages.py applies apply_delay_pattern to the reference codes) and is input only. Audio positions hold input id
0, as serving turns its -100 placeholder into 0 before the text embedding (model_runner.py
build_prefill_input_embeds); the model reads audio_codes there.

LABELS: score exactly the cells the sampler samples, never a cell it forces (sampler.py `step`).
  - BOC cells (r < c): never scored. In its first 8 steps the sampler overwrites codebooks above the step
    index with BOC, whatever the model says: a loss there would train nothing generation uses.
  - code cells (c <= r < c + T): scored.
  - codebook 0's EOC (row T): scored. It is the stop: after it the sampler counts down 6 more rows and ends.
  - the later EOC cells (r >= c + T, r <= T + 6; 27 cells for K = 8): scored. Unlike v2's generation (which
    forces EOS once a codebook has ended, so v2 scores only each codebook's first EOS), v3's sampler forces
    nothing after the delay window: the 6 wind-down rows are sampled like any row and each is fed back as
    the next step's input, while the last real codes of codebooks 1..7 are still being predicted (codebook 7's
    last code is on row T + 6). Training gives EOC at those input cells; scoring them teaches the model to
    emit the EOC it will then be conditioned on, so the wind-down rows it sees at generation are the ones it
    was trained on. Their values are dropped by the revert (reverse_delay_pattern reads rows c..c+T-1).
  - the last row (T + 6) predicts nothing: the sampler stops after emitting it (no target past the end).
  (Boson's own utils.delay_pattern_action_mask marks the code cells only; it serves rollout log-probs.)
  Note: the sampler ignores an EOC in codebook 0 during its first 8 steps, so a target shorter than 8
  frames (0.32 s) teaches a stop at row T that generation cannot take; such clips are trained as they are.

WHICH TURNS (the project's JSONL, as the converters and `prepare` write it):
  - target: the audio of the LAST assistant turn holding audio (exactly one clip in that turn);
  - the text to speak: that turn's own text, when it has any (the demo's assistant turns hold the answer's text
    and its speech: the text is the audio's transcript); else the user turn right before it (the converters'
    TTS layout: user text, assistant audio; a converter --user-prefix would be spoken, so use none for v3).
    Never the user's question beside an assistant text: the audio does not say it, and a model trained to
    read words it then skips learns to skip words;
  - reference (optional): v2's cloning layout, an earlier assistant turn holding one clip, its transcript
    taken by the same rule (its own text, else the user turn before it; none: `<|tts|> <|ref_audio|> …`).
    More than one earlier assistant clip is an error (the prompt has one reference slot);
  - everything else is not part of a v3 TTS sample: system turns (the prompt has no system slot), other text
    turns, and user/system audio (speech the model would hear; a user's voice is not the voice to speak in).
A conversation without assistant audio has nothing to learn: a Plan with no audio stream, which sanitize
counts as "no supervised token".
"""

from __future__ import annotations

import numpy as np

from higgs_min.chat import TokenEncoder
from higgs_min.data import AUDIO, Plan, Sample, StreamRule, materialize
from higgs_min.schema import ROLES, DataError

LAYOUT = "higgs-v3-tts"
V3_SPECIAL_TOKENS = {"tts": "<|tts|>", "ref_audio": "<|ref_audio|>", "text": "<|text|>", "audio": "<|audio|>",
                     "pad": "<|endoftext|>"}  # Qwen3's pad token: fills batches (attention-masked)
REF_TEXT = "<|ref_text|>"  # optional, as in serving: older checkpoints clone from the reference audio only
PLACEHOLDER = 0  # input id at audio positions (serving: -100 -> 0)
USER, ASSISTANT = ROLES.index("user"), ROLES.index("assistant")  # segment roles: reference in, target out


def _turn(msg, mw: str) -> tuple[str, list[str], list[tuple[str, dict]]]:
    """(role, texts, [(field, audio item)]) of one message, or DataError naming the field."""
    if not isinstance(msg, dict) or msg.get("role") not in ROLES:
        raise DataError(f"{mw}: expected an object with a role in {ROLES}")
    content = msg.get("content")
    items = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(items, list):
        raise DataError(f"{mw}.content: expected a string or a list, got {type(content).__name__}")
    texts, audio = [], []
    for i, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif kind == "audio":
            audio.append((f"{mw}.content[{i}]", item))
        else:
            raise DataError(f"{mw}.content[{i}]: expected a text item with a string or an audio item")
    return msg["role"], texts, audio


def speech_turns(messages: list, where: str):
    """The turns a v3 sample is made of (see WHICH TURNS): (target, reference) where each is
    (field, audio item, text or None); target is None when no assistant turn holds audio."""
    turns = [_turn(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
    spoken = [i for i, (role, _, audio) in enumerate(turns) if role == "assistant" and audio]

    def clip(i: int, what: str):
        role, texts, audio = turns[i]
        if len(audio) != 1:
            raise DataError(f"{where}: messages[{i}].content: {len(audio)} audio clips in the {what} turn; a v3 "
                            f"sample speaks one clip per turn (split the conversation)")
        text = "".join(texts)
        if not text.strip() and i > 0 and turns[i - 1][0] == "user":
            text = "".join(turns[i - 1][1])
        return audio[0][0], audio[0][1], text if text.strip() else None

    if not spoken:
        return None, None
    if len(spoken) > 2:
        raise DataError(f"{where}: messages{spoken[:-1]} are {len(spoken) - 1} earlier assistant clips; a v3 prompt "
                        f"holds one reference clip (messages[{spoken[-2]}]), so split the conversation")
    target = clip(spoken[-1], "target")
    if target[2] is None:
        raise DataError(f"{where}: messages[{spoken[-1]}]: no text to speak: neither the assistant turn nor a "
                        f"user turn right before it holds text")
    return target, (clip(spoken[0], "reference") if len(spoken) == 2 else None)


class V3Encoder(TokenEncoder):
    """Conversations -> Plans in the v3 TTS layout; the same interface as chat.ChatEncoder."""

    layout = LAYOUT

    def __init__(self, tokenizer_path, num_codebooks: int, codebook_size: int, vocab_size: int):
        super().__init__(tokenizer_path, V3_SPECIAL_TOKENS, vocab_size)
        self.K, self.C, self.delay = num_codebooks, codebook_size, True
        self.streams = StreamRule(num_codebooks, codebook_size, delay=True, bookends=False, score_pads=True)
        self.pad_id = self.ids["pad"]
        self.ids["ref_text"] = self.special_id(REF_TEXT, required=False)

    def tokens(self, text: str, ref_text: str | None, ref_frames: int | None):
        """(tokens, flags) of the prompt up to and including <|audio|>; each clip is one AUDIO placeholder."""
        sp, tokens, flags = self.ids, [self.ids["tts"]], [0]
        if ref_frames is not None:
            if ref_text is not None:
                if sp["ref_text"] is None:  # serving would drop the transcript; training and generation refuse
                    raise DataError(f"{self.tokenizer_path} has no {REF_TEXT} (an older v3 tokenizer): it clones "
                                    f"from the reference audio only; drop the reference transcript")
                tokens += [sp["ref_text"]] + self.text(ref_text)
            tokens += [sp["ref_audio"], PLACEHOLDER]
        tokens += [sp["text"]] + self.text(text) + [sp["audio"]]
        flags = [0] * len(tokens)
        if ref_frames is not None:
            flags[tokens.index(sp["ref_audio"]) + 1] = AUDIO
        return tokens, flags

    def plan(self, messages: list, codes_of, where: str, index: int) -> Plan:
        """The layout decision for one conversation (module docstring); codes_of(item, field) -> (K, T) codes."""
        target, ref = speech_turns(messages, where)
        if target is None:  # nothing to learn from: no stream, counted by sanitize
            return Plan(index, np.asarray([self.ids["tts"]], np.int32), np.zeros(1, np.uint8),
                        np.zeros((0, self.K), np.int16), np.zeros((0, 2), np.int32))
        clips = ([ref] if ref else []) + [target]
        codes = [np.asarray(codes_of(item, field)) for field, item, _ in clips]
        tokens, flags = self.tokens(target[2], ref[2] if ref else None, codes[0].shape[1] if ref else None)
        tokens.append(PLACEHOLDER)
        flags.append(AUDIO)
        roles = ([USER] if ref else []) + [ASSISTANT]
        return Plan(index, np.asarray(tokens, np.int32), np.asarray(flags, np.uint8),
                    np.concatenate([c.T.astype(np.int16) for c in codes]),
                    np.asarray([(c.shape[1], r) for c, r in zip(codes, roles)], np.int32).reshape(-1, 2),
                    tuple(item.get("codec") for _, item, _ in clips))

    def prompt(self, text: str, reference_codes=None, reference_text: str | None = None) -> Sample:
        """A generation prompt: the layout up to <|audio|> (whose position predicts row 0); reference_codes
        (K, T_ref) laid out as delayed input rows. Same code path as training's samples."""
        ref = None if reference_codes is None else np.asarray(reference_codes)
        tokens, flags = self.tokens(text, reference_text, None if ref is None else ref.shape[1])
        codes = np.zeros((0, self.K), np.int16) if ref is None else ref.T.astype(np.int16)
        segments = np.zeros((0, 2), np.int32) if ref is None else np.asarray([(ref.shape[1], USER)], np.int32)
        return materialize(Plan(0, np.asarray(tokens, np.int32), np.asarray(flags, np.uint8), codes, segments),
                           self.streams)

    def min_length(self, messages: list, frames_of, chars_per_token: int | None, where: str = "") -> int:
        """A lower bound on the positions of this conversation's sample, from the codes headers (frames_of(item)
        -> T) and the texts' lengths, before tokenizing or reading codes (sanitize's early refusal)."""
        target, ref = speech_turns(messages, where)
        if target is None:
            return 0
        n = 3 + frames_of(target[1]) + self.K - 1  # <|tts|> <|text|> <|audio|>, the target rows
        if ref is not None:
            n += 1 + frames_of(ref[1]) + self.K - 1 + (1 if ref[2] is not None else 0)
        if chars_per_token:
            n += sum(-(-len(t) // chars_per_token) for t in (target[2], ref and ref[2]) if t)
        return n
