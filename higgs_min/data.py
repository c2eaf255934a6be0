"""Plan -> Sample -> batch: audio streams on the text's positions, the delay pattern, labels, next-token targets.

An encoder (chat.ChatEncoder for v2's ChatML, v3/layout.py V3Encoder) decides a conversation's tokens and puts
one placeholder position per audio stream (a Plan); `materialize` expands each placeholder into the stream's
positions, laid out by a StreamRule (the delay pattern, which cells are labels), and `collate` pads Samples into
a batch whose labels leave as next-token targets. The v2 layout, drawn: higgs_min/chat.py.

THE NEXT-TOKEN RULE (`next_token_targets`, the only place it is written): the logits at position i are
scored against the label at position i + 1, for text and audio alike. A test puts all mass on the label
at i + 1 and gets a loss near 0; the same logits scored unshifted give a loss far from 0.

Audio codes are stored per position (`audio_codes`, `audio_labels`: (B, L, K)) rather than as the batch's
streams concatenated with offsets: one shift then serves text and audio, and no offset bookkeeping can go
wrong. The cost is K integers per position, 258 KB at the seed's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from higgs_min.schema import ROLES

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- Plans
# Per-position flags of a Plan (uint8).
SUPERVISED = 1  # the text label at this position is its own id (else -100)
AUDIO = 2  # this position is one audio stream's placeholder, expanded by `materialize`


@dataclass
class Plan:
    """One conversation in compact form: what `ChatEncoder.plan` (chat.py) decides, before any expansion.

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


def plan_is_supervised(plan: Plan) -> bool:
    """Whether materialize(plan) has any text or audio label: a supervised text token, or an assistant stream."""
    return bool((plan.flags & SUPERVISED).any()) or bool((plan.segments[:, 1] == ROLES.index("assistant")).any())


# ----------------------------------------------------------------------------- one audio stream: the delay pattern
def stream_length(T: int, K: int, delay: bool = True, bookends: bool = True):
    """Positions of one audio stream of T frames (an int or an array): T + 2 with BOS/EOS bookends (v2), T without
    (v3); plus K - 1 with the delay pattern. v2: T + K + 1 (T + 2 undelayed); v3: T + K - 1."""
    return T + (2 if bookends else 0) + (K - 1 if delay else 0)


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


# ----------------------------------------------------------------------------- Plan -> Sample
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


# ----------------------------------------------------------------------------- Samples -> a batch: next-token targets
def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for the logits at each position: labels shifted left by one along dim 1.

    labels (B, L) or (B, L, K) -> same shape; target[:, i] = labels[:, i + 1], and the
    last position has no target (IGNORE_INDEX). Scoring logits at i against the
    label at i itself is the classic bug that keeps a loss at chance (ln V).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


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
