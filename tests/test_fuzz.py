"""The fuzz suite (fixed seed): 1,200 damaged lines, outcomes decided by tests/fuzzgen.py, not by the loader.

`make fuzz N=100000` runs the same check over a longer randomized search.
"""
import json

import pytest

from higgs_min.schema import DataError
from higgs_min.prepare.sanitize import FILTERED, load_jsonl, read_jsonl
from tests import fuzzgen

N, SEED = 1200, 19


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    cases = fuzzgen.generate(folder, N, SEED)
    return folder, cases, fuzzgen.write_lines(folder / "d.jsonl", cases), fuzzgen.encoder()


def test_generator_covers_every_outcome_and_is_seeded(corpus, tmp_path):
    folder, cases, _, _ = corpus
    expects = [c.expect for c in cases]
    assert all(expects.count(e) >= 20 for e in ("valid", "reject", "either", "blank"))
    assert len({c.kind for c in cases}) > 35
    again = fuzzgen.generate(tmp_path, N, SEED)
    assert [c.raw for c in again] == [c.raw for c in cases]


def test_no_exception_escapes_and_every_outcome_is_as_decided(corpus):
    folder, cases, _, enc = corpus
    stats = fuzzgen.check(folder, cases, enc)
    assert stats["crashed"] == 0 and stats["unforeseen"] == 0, stats["failures"][:10]
    assert stats["wrong"] == 0, stats["failures"][:10]
    assert stats["tried"] >= 1000 and stats["rejected"] > 300


def test_the_check_can_fail(corpus, monkeypatch):
    """The oracle is not vacuous: a loader without the integer or surrogate rule, or one that rejects a valid
    line, is caught."""
    folder, cases, _, enc = corpus
    cases = cases[:500]
    import higgs_min.prepare.sanitize as sanitize
    monkeypatch.setattr(sanitize, "_bad_int", int)
    stats = fuzzgen.check(folder, cases, enc)
    assert stats["wrong"] > 0 and stats["unforeseen"] > 0  # accepted huge ints; int() past 4300 digits
    monkeypatch.setattr(sanitize, "_lone_surrogate", lambda obj: None)
    assert fuzzgen.check(folder, cases, enc)["unforeseen"] > 0  # the tokenizer's TypeError
    monkeypatch.undo()
    valid = next(i for i, c in enumerate(cases) if c.expect == "valid")
    broken = list(cases)
    broken[valid] = fuzzgen.Case(cases[valid].raw, "valid", "x", b'{"messages": [{"role": "assistant", "content": "b"}]}')
    assert fuzzgen.check(folder, broken, enc)["wrong"] == 1


def test_one_pass_names_every_must_reject_line_and_skip_mode_loads_exactly_the_valid_ones(corpus, tmp_path):
    folder, cases, path, enc = corpus
    report = folder / "rejected.jsonl"
    samples, rep = load_jsonl(path, enc, fuzzgen.MAX_LENGTH, skip_bad=True, max_bad_fraction=1.0, report_path=report)
    loaded = {s.index for s in samples}
    named = {json.loads(x)["line"] for x in report.read_text().splitlines()}
    lines = {e: {i for i, c in enumerate(cases, 1) if c.expect == e} for e in ("valid", "reject", "either", "blank")}
    assert lines["valid"] <= loaded and not (lines["reject"] & loaded)
    assert lines["reject"] <= named and not (lines["valid"] & named)
    assert loaded | named == lines["valid"] | lines["reject"] | lines["either"] and not (loaded & named)
    # strict: the same pass, every bad line counted in one error
    n_bad = sum(n for reason, n in rep.skipped.items() if reason not in FILTERED)
    with pytest.raises(DataError, match=f"{n_bad} bad line\\(s\\) of {N - len(lines['blank'])}"):
        read_jsonl(path, enc, fuzzgen.MAX_LENGTH)
    # the trainer's loader gave exactly those samples, in order; every batch collates
    assert [s.index for s in samples] == sorted(loaded) and sum(rep.skipped.values()) == len(named)
    from higgs_min.data import collate
    for i in range(0, len(samples), 64):
        collate(samples[i:i + 64], enc.ids["end_of_text"])

