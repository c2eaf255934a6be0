"""The Higgs Audio v3 sample (higgs_min/v3/layout.py): the served prompt, the delayed rows and the scored cells,
checked cell by cell on hand-built examples; the turns a conversation maps to; the packed corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_min.chat import ChatEncoder
from higgs_min.data import IGNORE_INDEX, collate
from higgs_min.schema import DataError
from higgs_min.loss import target_counts
from higgs_min.prepare.corpus import CorpusError, open_dataset
from higgs_min.prepare.pack import pack
from higgs_min.prepare.sanitize import chars_per_token, load_jsonl, read_jsonl
from higgs_min.v3.layout import V3Encoder, speech_turns

DATA = Path(__file__).resolve().parent.parent / "data"
K, C, V = 8, 1024, 1024
BOC, EOC = C, C + 1

# Delayed rows of a 3-frame clip, drawn by hand (row r, codebook c): a digit is frame t of codebook c (so the
# cell holds codes[c, t]), B is BOC (1024), E is EOC (1025). T + 7 = 10 rows, no BOS row.
ROWS = """
0 B B B B B B B
1 0 B B B B B B
2 1 0 B B B B B
E 2 1 0 B B B B
E E 2 1 0 B B B
E E E 2 1 0 B B
E E E E 2 1 0 B
E E E E E 2 1 0
E E E E E E 2 1
E E E E E E E 2
"""
# What is scored, drawn by hand from the rule (v3/layout.py LABELS): every cell the sampler samples (codes,
# codebook 0's EOC on row 3, the later EOCs of the wind-down), never a BOC cell (the sampler forces those).
SCORED = """
x . . . . . . .
x x . . . . . .
x x x . . . . .
x x x x . . . .
x x x x x . . .
x x x x x x . .
x x x x x x x .
x x x x x x x x
x x x x x x x x
x x x x x x x x
"""


def grid(picture: str) -> list[list[str]]:
    return [line.split() for line in picture.strip().splitlines()]


def cell(ch: str, c: int, codes: np.ndarray) -> int:
    return BOC if ch == "B" else EOC if ch == "E" else int(codes[c, int(ch)])


@pytest.fixture
def enc():
    return V3Encoder(DATA / "tokenizer_v3.json", K, C, V)


def write_codes(folder: Path, name: str, codes: np.ndarray) -> str:
    np.save(folder / name, codes.astype(np.int16))
    return name


def one_line(tmp_path: Path, messages: list, enc) -> tuple:
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    samples, _ = load_jsonl(tmp_path / "d.jsonl", enc, 10_000)
    return samples[0]


def test_rows_and_scored_cells_cell_by_cell(tmp_path, enc):
    codes = (np.arange(K)[:, None] * 100 + np.arange(3)[None, :] + 7)  # (K, T=3): codes[c, t] = 100c + t + 7
    s = one_line(tmp_path, [{"role": "user", "content": "Hello."},
                            {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "a.npy", codes)}]}], enc)
    sp = enc.ids
    a = len(enc.text("Hello.")) + 2  # <|tts|> <|text|> Hello. -> <|audio|> is at position a
    assert s.input_ids[:a + 1].tolist() == [sp["tts"], sp["text"]] + enc.text("Hello.") + [sp["audio"]]
    rows = slice(a + 1, a + 1 + 3 + K - 1)
    assert len(s.input_ids) == a + 1 + 10 and (s.input_ids[rows] == 0).all()  # placeholders: 0, as serving
    assert s.audio_out_mask[rows].all() and s.audio_out_mask.sum() == 10 and not s.audio_in_mask.any()
    assert (s.text_labels == IGNORE_INDEX).all()  # the TTS model is never asked for text
    want_rows = [[cell(ch, c, codes) for c, ch in enumerate(line)] for line in grid(ROWS)]
    want_labels = [[want_rows[r][c] if x == "x" else IGNORE_INDEX for c, x in enumerate(line)]
                   for r, line in enumerate(grid(SCORED))]
    assert s.audio_codes[rows].tolist() == want_rows
    assert s.audio_labels[rows].tolist() == want_labels
    assert (s.audio_labels[:a + 1] == IGNORE_INDEX).all()
    assert int((s.audio_labels != IGNORE_INDEX).sum()) == 3 * K + 28  # every code + 7 + 6 + ... + 1 EOCs

    # The one shift rule: the <|audio|> position (a text token) predicts row 0; row r predicts row r + 1;
    # the last row (T + 6) predicts nothing.
    b = collate([s], enc.pad_id)
    targets = b["audio_targets"][0]
    assert (targets != IGNORE_INDEX).any(-1).nonzero().squeeze(1).tolist() == list(range(a, a + 10))
    assert targets[a].tolist() == want_labels[0] and targets[a + 9].tolist() == want_labels[9]
    assert (targets[a + 10] == IGNORE_INDEX).all()
    assert target_counts(b["text_targets"], b["audio_targets"]).tolist() == [0] + [10, 9, 8, 7, 6, 5, 4, 3]


def test_reference_clip_is_delayed_input_with_its_transcript(tmp_path, enc):
    """v2's cloning layout: a user turn with the reference transcript, an assistant turn with the reference
    audio, then the user text and the assistant audio to learn."""
    g = np.random.default_rng(0)
    ref, tgt = g.integers(0, C, (K, 4)), g.integers(0, C, (K, 2))
    s = one_line(tmp_path, [
        {"role": "system", "content": "ignored: the v3 prompt has no system slot"},
        {"role": "user", "content": "Ref words."},
        {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "r.npy", ref)}]},
        {"role": "user", "content": "Say it."},
        {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "t.npy", tgt)}]}], enc)
    sp, R = enc.ids, 4 + K - 1
    head = [sp["tts"], sp["ref_text"]] + enc.text("Ref words.") + [sp["ref_audio"]]
    mid = [sp["text"]] + enc.text("Say it.") + [sp["audio"]]
    n, m = len(head), len(head) + R + len(mid)
    assert s.input_ids.tolist() == head + [0] * R + mid + [0] * (2 + K - 1)
    assert s.audio_in_mask[n:n + R].all() and s.audio_in_mask.sum() == R  # input only, no labels
    assert (s.audio_labels[n:n + R] == IGNORE_INDEX).all()
    for r in range(R):  # the reference's delayed rows with their BOC/EOC cells (serving's apply_delay_pattern)
        for c in range(K):
            want = BOC if r < c else (int(ref[c, r - c]) if r - c < 4 else EOC)
            assert int(s.audio_codes[n + r, c]) == want
    assert s.audio_out_mask[m:].all() and s.audio_out_mask.sum() == 2 + K - 1


def test_demo_maps_the_assistant_text_to_its_audio(enc):
    """The demo's assistant turns hold the answer's text and its speech: that text is spoken; the system prompt,
    the user's question and its speech (4 lines) are not part of the TTS sample."""
    samples, report = load_jsonl(DATA / "demo.jsonl", enc, 10_000)
    assert len(samples) == 32 and not report.skipped
    lines = [json.loads(x) for x in (DATA / "demo.jsonl").read_text().splitlines()]
    for s, line in zip(samples, lines):
        answer = next(i["text"] for i in line["messages"][-1]["content"] if i["type"] == "text")
        T = int(np.load(DATA / next(i["codes"] for i in line["messages"][-1]["content"] if i["type"] == "audio")).shape[1])
        assert s.input_ids[:-(T + K - 1)].tolist() == [enc.ids["tts"], enc.ids["text"]] + enc.text(answer) + [
            enc.ids["audio"]]
        assert s.stream_shapes == [("assistant", (K, T))] and not s.audio_in_mask.any()


def test_the_bound_is_a_lower_bound_and_refuses_early(tmp_path, enc):
    plans, _ = read_jsonl(DATA / "demo.jsonl", enc, 10_000)
    lines = [json.loads(x) for x in (DATA / "demo.jsonl").read_text().splitlines()]
    frames = lambda item: int(np.load(DATA / item["codes"]).shape[1])  # noqa: E731
    for p, line in zip(plans, lines):
        assert enc.min_length(line["messages"], frames, chars_per_token(enc)) <= p.length(enc.streams)
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "x" * 5000},
        {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "a.npy", np.zeros((K, 2)))}]}]}) + "\n")
    with pytest.raises(DataError, match="no usable sample.*longer than max length"):
        load_jsonl(tmp_path / "d.jsonl", enc, 100)


@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "audio", "codes": "a.npy"}] * 2}],
     r"messages\[1\].content: 2 audio clips in the target turn"),
    ([{"role": "assistant", "content": [{"type": "audio", "codes": "a.npy"}]}],
     r"messages\[0\]: no text to speak"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "audio", "codes": "a.npy"}]}] * 3,
     r"messages\[1, 3\] are 2 earlier assistant clips; a v3 prompt holds one reference clip"),
])
def test_conversations_v3_cannot_hold_are_named(messages, match):
    with pytest.raises(DataError, match=match):
        speech_turns(messages, "f.jsonl:1")


def test_no_assistant_audio_is_a_counted_skip(tmp_path, enc):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "text only"}]}) + "\n")
    with pytest.raises(DataError, match=r"no usable sample \(loaded 0, skipped 1 \(no supervised token: 1\)\)"):
        load_jsonl(tmp_path / "d.jsonl", enc, 1000)


def test_packed_v3_corpus_equals_the_jsonl_and_is_refused_by_v2(tmp_path, enc):
    pack([DATA / "demo.jsonl"], DATA / "tokenizer_v3.json", tmp_path / "c", K, C, shard_lines=10, layout="v3")
    packed = open_dataset(tmp_path / "c", enc, 10_000)
    jsonl = open_dataset(DATA / "demo.jsonl", enc, 10_000)
    assert packed.lengths.tolist() == jsonl.lengths.tolist() == [len(jsonl[i].input_ids) for i in range(32)]
    for i in (0, 3, 31):
        for f in ("input_ids", "text_labels", "audio_codes", "audio_labels", "audio_in_mask", "audio_out_mask"):
            assert torch.equal(getattr(packed[i], f), getattr(jsonl[i], f))
    with pytest.raises(CorpusError, match="packed in the higgs-v3-tts layout; this model reads higgs-v2-chatml"):
        open_dataset(tmp_path / "c", ChatEncoder(DATA / "tokenizer_v3.json", K, C, V), 10_000)


def test_a_tokenizer_without_the_v3_specials_is_refused():
    with pytest.raises(DataError, match=r"tokenizer.json: special token <\|tts\|> is not in the tokenizer"):
        V3Encoder(DATA / "tokenizer.json", K, C, V)


# ----------------------------------------------------------------------------- against the serving code

def test_scored_cells_are_exactly_the_cells_the_serving_sampler_samples(tmp_path, enc):
    """The wheel's sampler.step, teacher-forced along a training sample's rows: the model's choice is kept exactly
    where we score, overwritten (forced to BOC) exactly where we do not; the rows it emits are the sample's rows
    (utils.apply_delay_pattern's), and it stops after the last one (codebook 0's EOC, then the 6-row wind-down)."""
    from tests import v3_oracle as oracle

    w = oracle.load_wheel()
    T = 9  # >= 8: the sampler ignores an EOC in codebook 0 during its first 8 steps
    codes = np.random.default_rng(1).integers(0, C, (K, T))
    s = one_line(tmp_path, [{"role": "user", "content": "Hi."},
                            {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "a.npy", codes)}]}], enc)
    rows = s.audio_out_mask.nonzero().squeeze(1)
    assert torch.equal(s.audio_codes[rows], oracle.apply_delay_pattern(torch.from_numpy(codes).T))
    state = w.sampler.HiggsSamplerState(num_codebooks=K)
    for r, pos in enumerate(rows.tolist()):
        assert not state.generation_done
        want = s.audio_codes[pos]
        choice = torch.where(want == BOC, torch.zeros_like(want), want)  # the model never proposes BOC itself
        emitted = w.sampler.step(torch.nn.functional.one_hot(choice, C + 2).float() * 50, state, temperature=0.0)
        assert torch.equal(emitted, want), r
        assert torch.equal(emitted == choice, s.audio_labels[pos] != IGNORE_INDEX), r  # sampled == scored
    assert state.generation_done and r == T + K - 2


def test_prompt_equals_the_wheels(tmp_path, enc):
    """The prompt part of a training sample (with a reference clip) == text_tokenizer.build_prompt's ids (its -100
    placeholders are 0 here, as model_runner.build_prefill_input_embeds feeds them), the reference rows ==
    utils.apply_delay_pattern."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests import v3_oracle as oracle

    adapter = oracle.load_wheel().text_tokenizer.HiggsTokenizerAdapter(
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(DATA / "tokenizer_v3.json"))))
    ref = np.random.default_rng(2).integers(0, C, (K, 5))
    s = one_line(tmp_path, [
        {"role": "user", "content": "The reference."},
        {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "r.npy", ref)}]},
        {"role": "user", "content": "Say: <|emotion:happy|> good morning!"},
        {"role": "assistant", "content": [{"type": "audio", "codes": write_codes(tmp_path, "t.npy", ref[:, :3])}]}], enc)
    want = torch.tensor(adapter.build_prompt("Say: <|emotion:happy|> good morning!", num_ref_tokens=5 + K - 1,
                                             reference_text="The reference."))
    L = len(want)
    assert torch.equal(s.input_ids[:L], torch.where(want == -100, 0, want))
    assert torch.equal(s.audio_in_mask[:L], want == -100)
    assert torch.equal(s.audio_codes[:L][want == -100], oracle.apply_delay_pattern(torch.from_numpy(ref).T))
    p = enc.prompt("Say: <|emotion:happy|> good morning!", ref, "The reference.")  # generation's prompt: the same
    assert torch.equal(p.input_ids, s.input_ids[:L]) and torch.equal(p.audio_codes, s.audio_codes[:L])
    assert torch.equal(p.audio_in_mask, s.audio_in_mask[:L])
