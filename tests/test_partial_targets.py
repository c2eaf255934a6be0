"""Runs whose conversations lack one kind of target (text-only or audio-only assistant turns) log the parts
they have: never NaN in metrics.jsonl (read by a parser that refuses NaN/Infinity), TensorBoard or the log."""
import json
import math

import pytest

from higgs_min.train.options import DATA
from tests.trainutil import run


def _strict(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"non-JSON constant {token} in {line!r}")
    return json.loads(line, parse_constant=refuse)


def _demo_without(tmp_path, drop: str):
    """The demo conversations with every assistant `drop` item ("text" or "audio") removed."""
    rows = []
    for line in (DATA / "demo.jsonl").read_text().splitlines():
        conv = json.loads(line)
        for m in conv["messages"]:
            if m["role"] == "assistant" and isinstance(m["content"], list):
                m["content"] = [item for item in m["content"] if item["type"] != drop]
        rows.append(json.dumps(conv))
    path = tmp_path / f"no_{drop}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    (tmp_path / "codes").symlink_to(DATA / "codes")
    return path


def _scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("drop,absent", [("audio", "audio_loss"), ("text", None)])
def test_text_only_and_audio_only_runs_log_no_nan(tmp_path, drop, absent):
    out = tmp_path / "out"
    assert run(out, "--data", _demo_without(tmp_path, drop), "--max-steps", 2, "--tensorboard",
               "--eval-split", 0.25, "--eval-every", 1) == 0
    rows = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train, evals = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]  # step 0: before training
    for r in train + evals:  # (samples rows, from listening, carry no losses; the strict parser read them too)
        present = [k for k in ("text_loss", "audio_loss") if k != absent]
        assert all(math.isfinite(r[k]) for k in ["loss"] + present), r
        if absent:  # text-only: no audio targets, so no audio figure, and the total is the text part
            assert r[absent] is None and all(v is None for v in r["audio_loss_per_codebook"])
            assert r["loss"] == pytest.approx(r["text_loss"])  # --text-weight 1: the objective optimized
    # an audio-only assistant turn still has text targets (<|audio_out_bos|>, <|audio_eos|>, <|eot_id|>)
    scalars = _scalars(out / "tensorboard")
    assert scalars and all(math.isfinite(v) for values in scalars.values() for v in values)
    assert ("audio_loss" in scalars) == (absent is None) and ("eval/audio_loss" in scalars) == (absent is None)
    assert "nan" not in (out / "train.log").read_text().lower().replace("nano", "")
