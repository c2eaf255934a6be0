"""A conversation -> Plan in the released model's ChatML layout: the tokenizer, its special tokens, the turns.

One conversation (a JSONL line) becomes one Plan (`ChatEncoder.plan`); `data.materialize` expands its audio
placeholders into streams laid out on the same positions as the text, so one rule scores both streams:

    position     0            1 …              a-1             a … a+S-1      a+S          a+S+1
    input_ids    <|b_o_t|>    header, text …   <|audio_out_bos|>  <|AUDIO_OUT|>×S  <|audio_eos|>  <|eot_id|>
    text_labels  -100 (prompt, headers)   own id (assistant text)  own id  -100 ×S   own id  own id
    audio_codes  ·            ·                 ·               delay([BOS|codes|EOS])  (K columns each)
    audio_labels -100         -100              -100            delay([-100|codes|EOS])

Each turn is `<|start_header_id|>role<|end_header_id|>\\n\\n … <|eot_id|>`. S = T + K + 1 for codes (K, T)
(T + 2 when use_delay_pattern is false). User (and system) audio is input only:
`<|audio_bos|><|AUDIO|>×S<|audio_eos|>`, every label -100. Text labels are the assistant's text,
`<|audio_out_bos|>`, `<|audio_eos|>` and its `<|eot_id|>`; everything else is -100.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from higgs_min.data import AUDIO, SUPERVISED, Plan, Sample, StreamRule, materialize
from higgs_min.schema import ROLES, DataError, check_messages

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
