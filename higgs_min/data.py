"""Conversations to tokens and labels, in the released model's ChatML layout.

One conversation (a JSONL line) becomes one sample whose audio is laid out on
the same positions as the text, so one rule scores both streams:

    position     0            1 …              a-1             a … a+S-1      a+S          a+S+1
    input_ids    <|b_o_t|>    header, text …   <|audio_out_bos|>  <|AUDIO_OUT|>×S  <|audio_eos|>  <|eot_id|>
    text_labels  -100 (prompt, headers)   own id (assistant text)  own id  -100 ×S   own id  own id
    audio_codes  ·            ·                 ·               delay([BOS|codes|EOS])  (K columns each)
    audio_labels -100         -100              -100            delay([-100|codes|EOS])

Each turn is `<|start_header_id|>role<|end_header_id|>\\n\\n … <|eot_id|>`. S = T + K + 1 for codes (K, T)
(T + 2 when use_delay_pattern is false). User (and system) audio is input only:
`<|audio_bos|><|AUDIO|>×S<|audio_eos|>`, every label -100. Text labels are the assistant's text,
`<|audio_out_bos|>`, `<|audio_eos|>` and its `<|eot_id|>`; everything else is -100.

THE NEXT-TOKEN RULE (`next_token_targets`, the only place it is written): the logits at position i are
scored against the label at position i + 1, for text and audio alike. A test puts all mass on the label
at i + 1 and gets a loss near 0; the same logits scored unshifted give a loss far from 0.

Audio codes are stored per position (`audio_codes`, `audio_labels`: (B, L, K)) rather than as the batch's
streams concatenated with offsets: one shift then serves text and audio, and no offset bookkeeping can go
wrong. The cost is K integers per position, 258 KB at the seed's batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from higgs_min.schema import ROLES, DataError, check_messages  # (DataError, ROLES: also imported from here)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The system message of the official single-speaker TTS prompt (boson-ai/higgs-audio examples/generation.py
# `prepare_generation_context`, no scene): what converters write and generate uses when a run records none.
DEFAULT_SYSTEM = "Generate audio following instruction."
SPECIAL_TOKENS = {
    "begin_of_text": "<|begin_of_text|>",
    "end_of_text": "<|end_of_text|>",  # the released config's pad_token_id
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
    "audio_out_bos": "<|audio_out_bos|>",
    "audio_out": "<|AUDIO_OUT|>",
    "audio_eos": "<|audio_eos|>",
    "audio_bos": "<|audio_bos|>",
    "audio_in": "<|AUDIO|>",
}
# Needed only by a conversation with an assistant message followed by another one (looked up then, so a
# tokenizer without it still serves every other conversation).
EOM = "<|eom_id|>"


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for the logits at each position: labels shifted left by one along dim 1.

    labels (B, L) or (B, L, K) -> same shape; target[:, i] = labels[:, i + 1], and the
    last position has no target (IGNORE_INDEX). Scoring logits at i against the
    label at i itself is the classic bug that keeps a loss at chance (ln V).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def delay_pattern(codes: torch.Tensor, bos: int, pad: int) -> torch.Tensor:
    """Shift codebook row k right by k: (K, T) -> (K, T + K - 1).

    Row k's first k columns are `bos`, its last K - 1 - k columns are `pad`. At
    column t the model thus sees code t of book 0, t-1 of book 1, …, t-K+1 of book K-1.
    """
    K, T = codes.shape
    out = codes.new_full((K, T + K - 1), pad)
    for k in range(K):
        out[k, :k] = bos
        out[k, k:k + T] = codes[k]
    return out


def revert_delay_pattern(delayed: torch.Tensor) -> torch.Tensor:
    """Inverse of `delay_pattern` on its valid region: (K, T + K - 1) -> (K, T)."""
    K, TK = delayed.shape
    T = TK - K + 1
    return torch.stack([delayed[k, k:k + T] for k in range(K)])


def stream_length(T: int, K: int, delay: bool = True, bookends: bool = True):
    """Positions of one audio stream of T frames (an int or an array): T + 2 with BOS/EOS bookends (v2), T without
    (v3); plus K - 1 with the delay pattern. v2: T + K + 1 (T + 2 undelayed); v3: T + K - 1."""
    return T + (2 if bookends else 0) + (K - 1 if delay else 0)


def audio_stream(codes: torch.Tensor, bos: int, eos: int, delay: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (K, T) -> (input, labels), each (K, stream_length(T, K, delay)).

    input  = delay([BOS | codes | EOS]) with BOS in front and EOS in the tail;
    labels = delay([-100 | codes | EOS]) with -100 in front and in the tail.
    Without `delay` (use_delay_pattern false) the same columns, unshifted: official
    HiggsAudioSampleCollator.__call__ (data_collator/higgs_audio_collator.py) applies
    build_delay_pattern_mask only `if self.use_delay_pattern`.
    """
    K = codes.shape[0]
    col = lambda v: codes.new_full((K, 1), v)  # noqa: E731
    inp = torch.cat([col(bos), codes, col(eos)], 1)
    lab = torch.cat([col(IGNORE_INDEX), codes, col(eos)], 1)
    if not delay:
        return inp, lab
    return (delay_pattern(inp, bos=bos, pad=eos),
            delay_pattern(lab, bos=IGNORE_INDEX, pad=IGNORE_INDEX))


@dataclass
class Sample:
    """One conversation. L positions, K codebooks."""
    index: int  # line number in the JSONL file (1-based)
    input_ids: torch.Tensor  # (L,)
    text_labels: torch.Tensor  # (L,)
    audio_codes: torch.Tensor  # (L, K) stream ids at audio positions, 0 elsewhere
    audio_labels: torch.Tensor  # (L, K) -100 except at assistant audio positions
    audio_in_mask: torch.Tensor  # (L,) bool: audio given as input (system/user)
    audio_out_mask: torch.Tensor  # (L,) bool: audio the model generates (assistant)
    stream_shapes: list  # [(role, (K, T)), …] as read from the codes files

    def stats(self) -> str:
        L = len(self.input_ids)
        t_on = int((self.text_labels != IGNORE_INDEX).sum())
        a_on = int((self.audio_labels != IGNORE_INDEX).sum())
        a_total = int(self.audio_out_mask.sum()) * self.audio_labels.shape[1]
        shapes = ", ".join(f"{r}:{list(s)}" for r, s in self.stream_shapes) or "none"
        return (f"sample line {self.index}: input length {L}, label length {len(self.text_labels)}; "
                f"text labels {L - t_on} masked / {t_on} unmasked / {L} total; "
                f"audio labels {a_total - a_on} masked / {a_on} unmasked / {a_total} total; "
                f"audio codes {shapes}")


# Per-position flags of a Plan (uint8).
SUPERVISED = 1  # the text label at this position is its own id (else -100)
AUDIO = 2  # this position is one audio stream's placeholder, expanded by `materialize`


@dataclass
class Plan:
    """One conversation in compact form: what `ChatEncoder.plan` decides, before any expansion.

    tokens   (N,) int32   token ids; each audio stream is ONE placeholder position (<|AUDIO_OUT|>/<|AUDIO|>)
    flags    (N,) uint8   SUPERVISED | AUDIO per position
    codes    (F, K) int16 every stream's raw codes, frame-major, in order, BEFORE the delay pattern
    segments (S, 2) int32 per audio stream, in placeholder order: (frames T, role index in ROLES)
    index    line number in the source file (1-based); codecs: the codec ids the items recorded

    The packed corpus stores exactly these arrays; `materialize` turns them into a Sample.
    """
    index: int
    tokens: np.ndarray
    flags: np.ndarray
    codes: np.ndarray
    segments: np.ndarray
    codecs: tuple = ()

    def length(self, rule: "StreamRule") -> int:
        """Positions after materialize: each placeholder becomes rule.length(T) positions."""
        return len(self.tokens) - len(self.segments) + int(rule.length(self.segments[:, 0]).sum())


@dataclass(frozen=True)
class StreamRule:
    """How each audio stream of a Plan becomes positions and labels: the one home of the delay pattern.

    K codebooks of C codes; ids C and C + 1 are BOS/BOC and EOS/EOC. A stream of T frames is laid out as
    frames F = [BOS | codes | EOS] (bookends: v2) or F = codes (no bookends: v3), then with `delay`
    codebook k at stream position s reads F[s - k]: BOS before F, EOS after it (without delay, F[s]).
    Labels of an assistant stream: every code cell and v2's EOS frame (each codebook's first EOS); with
    `score_pads` also every EOS cell after F (v3, whose sampler samples them: higgs_min/v3/layout.py);
    never a BOS cell. Streams of other roles are input only (audio_in_mask), unlabelled.

        v2: StreamRule(K, C)                                           T + K + 1 positions
        v3: StreamRule(K, C, bookends=False, score_pads=True)           T + K - 1 positions
    """
    K: int
    C: int
    delay: bool = True
    bookends: bool = True
    score_pads: bool = False

    def length(self, T):
        """Positions of a stream of T frames (an int or an integer array)."""
        return stream_length(T, self.K, self.delay, self.bookends)


def materialize(plan: Plan, rule: StreamRule) -> Sample:
    """Expand a Plan into a Sample: each placeholder becomes S = rule.length(T) positions carrying the stream's
    codes laid out by `rule` (v2: delay([BOS | codes | EOS]), labels delay([-100 | codes | EOS]) for assistant
    streams).

    The delay is computed by index arithmetic, position-major: at stream position s, codebook k reads
    frame s - k of F (BOS before it, EOS after it) -- `audio_stream`'s definition, which the tests check this
    against, vectorized because this runs once per sample per epoch. Without the delay, codebook k reads frame s."""
    K, bos, eos, e = rule.K, rule.C, rule.C + 1, int(rule.bookends)
    tokens = plan.tokens.astype(np.int64)
    is_audio = (plan.flags & AUDIO) != 0
    T, role = plan.segments[:, 0].astype(np.int64), plan.segments[:, 1]
    reps = np.ones(len(tokens), dtype=np.int64)
    reps[is_audio] = rule.length(T)
    input_ids = np.repeat(tokens, reps)
    sup = np.repeat((plan.flags & SUPERVISED) != 0, reps)
    text_labels = np.where(sup, input_ids, IGNORE_INDEX)
    L = len(input_ids)
    audio_codes = np.zeros((L, K), dtype=np.int64)
    audio_labels = np.full((L, K), IGNORE_INDEX, dtype=np.int64)
    audio_in = np.zeros(L, dtype=bool)
    audio_out = np.zeros(L, dtype=bool)
    starts = (np.cumsum(reps) - reps)[is_audio]
    frame0 = np.concatenate([[0], np.cumsum(T)])
    k = np.arange(K)[None, :]
    shapes = []
    for s, (start, t, r) in enumerate(zip(starts.tolist(), T.tolist(), role.tolist())):
        S, n = rule.length(t), t + 2 * e  # positions; frames of F
        src = np.arange(S)[:, None] - (k if rule.delay else 0)  # frame of F at (position, codebook)
        inside = (src >= 0) & (src < n)
        frames = np.full((max(n, 1), K), bos, dtype=np.int64)  # F (one dummy row when empty: never read)
        frames[e:e + t] = plan.codes[frame0[s]:frame0[s] + t]
        if e:
            frames[n - 1] = eos
        got = np.where(inside, frames[np.clip(src, 0, max(n - 1, 0)), k], np.where(src < 0, bos, eos))
        span = slice(start, start + S)
        audio_codes[span] = got
        out = ROLES[r] == "assistant"
        if out:  # BOS cells (src < 0, and v2's BOS frame) never; EOS pads (src >= n) only with score_pads
            scored = (inside & (src >= e)) | ((src >= n) if rule.score_pads else False)
            audio_labels[span] = np.where(scored, got, IGNORE_INDEX)
        (audio_out if out else audio_in)[span] = True
        shapes.append((ROLES[r], (K, t)))
    return Sample(plan.index, torch.from_numpy(input_ids), torch.from_numpy(text_labels),
                  torch.from_numpy(audio_codes), torch.from_numpy(audio_labels), torch.from_numpy(audio_in),
                  torch.from_numpy(audio_out), shapes)


class TokenEncoder:
    """A tokenizer file and the special tokens a layout needs, looked up by name and checked against the model's
    vocabulary; the base of each family's encoder (ChatEncoder here, higgs_min/v3/layout.py V3Encoder).

    An encoder's interface (what sanitize, the corpus, the trainer and eval use): tokenizer_path, tok, ids,
    K, C, streams (StreamRule), pad_id, layout (a name the packed corpus records), text(), decode(),
    plan(messages, codes_of, where, index) -> Plan, min_length(messages, frames_of, chars_per_token, where)."""

    def __init__(self, tokenizer_path: str | Path, specials: dict[str, str], vocab_size: int):
        from tokenizers import Tokenizer

        self.tokenizer_path = Path(tokenizer_path)
        try:
            self.tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise DataError(f"{tokenizer_path}: cannot load tokenizer: {e}") from e
        if self.tok.get_vocab_size() > vocab_size:  # checked first: it names both sizes
            raise DataError(f"{tokenizer_path}: tokenizer has {self.tok.get_vocab_size()} tokens, "
                            f"model vocab_size is {vocab_size}")
        self.vocab_size = vocab_size
        self.ids = {key: self.special_id(name, required=True) for key, name in specials.items()}
        # The longest token, in characters: a text of n characters is at least n / this many tokens,
        # a bound checked before tokenizing (a 300,000-character line is refused without encoding it).
        self.max_token_chars = max(1, max(len(t) for t in self.tok.get_vocab(with_added_tokens=False)))

    def special_id(self, name: str, required: bool) -> int | None:
        """The id of special token `name`; None when absent and not required (a DataError when required)."""
        tid = self.tok.token_to_id(name)
        if tid is None and required:
            raise DataError(f"{self.tokenizer_path}: special token {name} is not in the tokenizer")
        if tid is not None and tid >= self.vocab_size:
            raise DataError(f"{self.tokenizer_path}: {name} has id {tid} >= model vocab_size {self.vocab_size}")
        return tid

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, skipping ids the tokenizer lacks (the model's padded vocabulary beyond it), as the
        official serve_engine's tokenizer.decode does; said here rather than left to the tokenizers library."""
        size = self.tok.get_vocab_size()
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < size], skip_special_tokens=False)


class ChatEncoder(TokenEncoder):
    """Turns one parsed conversation into a Plan (and a Sample) in v2's ChatML layout."""

    layout = "higgs-v2-chatml"

    def __init__(self, tokenizer_path: str | Path, num_codebooks: int, codebook_size: int, vocab_size: int,
                 delay: bool = True):
        super().__init__(tokenizer_path, SPECIAL_TOKENS, vocab_size)
        if codebook_size + 2 > np.iinfo(np.int16).max:
            raise DataError(f"codebook size {codebook_size}: plans store codes as int16")
        self.K, self.C, self.delay = num_codebooks, codebook_size, delay
        self.streams = StreamRule(num_codebooks, codebook_size, delay)
        self.pad_id = self.ids["end_of_text"]
        self._headers = {}  # role -> its header ids, tokenized once (the same ids every turn)
        self.eom = self.special_id(EOM, required=False)  # None: refused when a conversation needs it

    def min_length(self, messages: list, frames_of, chars_per_token: int | None, where: str = "") -> int:
        """A lower bound on the positions of this conversation's sample, known without tokenizing or reading any
        codes data (frames_of(audio item) -> T from its file's header; a header claiming 10^6 frames costs
        nothing): <|begin_of_text|>, 3 specials per message, (T + K + 1) + 2 per audio stream, and the texts at
        the most characters one token can cover (none when chars_per_token is None)."""
        n, K = 1 + 3 * len(messages), self.K
        for msg in messages:
            content = msg["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for item in items:
                if item["type"] == "audio":
                    n += frames_of(item) + K + 3
                elif chars_per_token is not None:
                    n += -(-len(item["text"]) // chars_per_token)
        return n

    def plan(self, messages: list[dict], codes_of, where: str, index: int) -> Plan:
        """The layout decision for one conversation, whose messages passed check_messages. `codes_of(item,
        field_where)` returns (K, T) integer codes for an audio item (already checked for range)."""
        sp = self.ids
        tokens, flags, streams, segments, codecs = [], [], [], [], []

        def add(ids, supervised):
            tokens.extend(ids)
            flags.extend([SUPERVISED if supervised else 0] * len(ids))

        add([sp["begin_of_text"]], False)
        for m_i, msg in enumerate(messages):  # checked by check_messages (sanitize, prompt, encode)
            mw = f"{where}: messages[{m_i}]"
            role, content = msg["role"], msg["content"]
            sup = role == "assistant"
            add(self.header(role), False)
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for i_i, item in enumerate(items):
                iw = f"{mw}.content[{i_i}]"
                if item["type"] == "text":
                    add(self.text(item["text"]), sup)
                else:  # audio
                    c = np.asarray(codes_of(item, iw))
                    codecs.append(item.get("codec"))
                    streams.append(c.T.astype(np.int16))
                    segments.append((c.shape[1], ROLES.index(role)))
                    add([sp["audio_out_bos" if sup else "audio_bos"]], sup)
                    tokens.append(sp["audio_out" if sup else "audio_in"])
                    flags.append(AUDIO)
                    add([sp["audio_eos"]], sup)
            # Official prepare_chatml_sample (dataset/chatml_dataset.py, eom_postfix): an assistant message
            # followed by another assistant message ends with <|eom_id|> (supervised like <|eot_id|>).
            nxt = messages[m_i + 1] if m_i + 1 < len(messages) else None
            if sup and isinstance(nxt, dict) and nxt.get("role") == "assistant":
                if self.eom is None:
                    raise DataError(f"{mw}: an assistant message followed by another one ends with {EOM}, "
                                    f"which {self.tokenizer_path} does not have")
                add([self.eom], sup)
            else:
                add([sp["eot"]], sup)
        return Plan(index, np.asarray(tokens, dtype=np.int32), np.asarray(flags, dtype=np.uint8),
                    np.concatenate(streams) if streams else np.zeros((0, self.K), dtype=np.int16),
                    np.asarray(segments, dtype=np.int32).reshape(-1, 2), tuple(codecs))

    def header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\n\n`: opens every turn, and the generation prompt."""
        if role not in self._headers:
            self._headers[role] = [self.ids["start_header"]] + self.text(role) + [self.ids["end_header"]] + (
                self.text("\n\n"))
        return list(self._headers[role])

    def prompt(self, messages: list[dict], codes_of, force_audio: bool = False, where: str = "prompt") -> Sample:
        """A generation prompt: the conversation so far, then the assistant header (and `<|audio_out_bos|>`
        when `force_audio`), as the official serve_engine `_prepare_inputs` appends it. Laid out exactly as
        training lays out the same turns; assistant audio (voice cloning) is audio-out, user/system audio audio-in."""
        check_messages(messages, where, arrays=True)
        plan = self.plan(messages, codes_of, where, 0)
        tail = self.header("assistant") + ([self.ids["audio_out_bos"]] if force_audio else [])
        plan.tokens = np.concatenate([plan.tokens, np.asarray(tail, dtype=np.int32)])
        plan.flags = np.concatenate([plan.flags, np.zeros(len(tail), dtype=np.uint8)])
        return materialize(plan, self.streams)

    def encode(self, messages: list[dict], codes_of, where: str, index: int) -> Sample:
        """check_messages, then materialize(plan(...)): the one path from a conversation to a Sample."""
        check_messages(messages, where, arrays=True)
        return materialize(self.plan(messages, codes_of, where, index), self.streams)


@dataclass
class LoadReport:
    loaded: int
    skipped: dict  # reason -> count

    def summary(self) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())) or "none"
        return f"loaded {self.loaded}, skipped {total} ({reasons})"


def targets_of(text_labels: torch.Tensor, audio_labels: torch.Tensor):
    """The scored targets of a batch, made once (collate calls this; the losses and eval only read them):

        text_targets  (B, L)      next_token_targets(text_labels): what the logits at i are scored against
        audio_targets (B, L, K)   next_token_targets(audio_labels): the audio head scores every position whose
                                  next position holds an audio label. In v2 those are the assistant's audio-out
                                  rows (its BOS row predicts the first codes); in v3 also the `<|audio|>` text
                                  token, whose position predicts delayed row 0 (v3 has no BOS row).
    """
    return next_token_targets(text_labels), next_token_targets(audio_labels)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. Returns (B, L) and (B, L, K) tensors; the labels of the samples leave
    as targets (targets_of): the next-token shift is applied here and nowhere else."""
    B, L, K = len(samples), max(len(s.input_ids) for s in samples), samples[0].audio_codes.shape[1]
    out = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, L, dtype=torch.long),
        "text_targets": torch.full((B, L), IGNORE_INDEX, dtype=torch.long),  # labels until targets_of below
        "audio_codes": torch.zeros(B, L, K, dtype=torch.long),
        "audio_targets": torch.full((B, L, K), IGNORE_INDEX, dtype=torch.long),
        "audio_in_mask": torch.zeros(B, L, dtype=torch.bool),
        "audio_out_mask": torch.zeros(B, L, dtype=torch.bool),
        "sample_index": torch.tensor([s.index for s in samples]),
    }
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        out["input_ids"][b, :n] = s.input_ids
        out["attention_mask"][b, :n] = 1
        out["text_targets"][b, :n] = s.text_labels
        out["audio_codes"][b, :n] = s.audio_codes
        out["audio_targets"][b, :n] = s.audio_labels
        out["audio_in_mask"][b, :n] = s.audio_in_mask
        out["audio_out_mask"][b, :n] = s.audio_out_mask
    out["text_targets"], out["audio_targets"] = targets_of(out["text_targets"], out["audio_targets"])
    return out


def plan_is_supervised(plan: Plan) -> bool:
    """Whether materialize(plan) has any text or audio label: a supervised text token, or an assistant stream."""
    return bool((plan.flags & SUPERVISED).any()) or bool((plan.segments[:, 1] == ROLES.index("assistant")).any())
