"""Listening to a Higgs Audio v3 run (train/samples_v3.py through train/samples.py's Listener): the prompt is the
TTS layout `generate` builds, cut from the training sample; a v3-tiny run writes the same folders and metrics rows
as a v2 run; the codes it writes are the v3 generate path's for that prompt, seed and adapter; training is
unchanged by listening."""
import json

import numpy as np
import pytest
import torch

from higgs_min.data import materialize
from higgs_min.generate.sampling import codes_loader
from higgs_min.train.runs import load_trained
from higgs_min.train.samples_v3 import held_prompt_v3
from higgs_min.v3.layout import V3Encoder
from higgs_min.v3.sampler import V3Prompt, generate_v3
from tests.test_samples import TEXTS, check_report, short_set
from tests.trainutil import ROOT, adapter, metrics, run

TOKENIZER = ROOT / "data" / "tokenizer_v3.json"
# v3-tiny on 8 short conversations, 2 held out; 2 steps, a save (and an evaluation) after each, and step 0's
LISTEN = ["--preset", "v3-tiny", "--eval-split", "0.25", "--eval-samples", "2", "--random-codec-seed", "0",
          "--max-steps", "2", "--save-steps", "1", "--lora-dropout", "0.1"]  # dropout: training draws from torch's RNG


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return short_set(tmp_path_factory.mktemp("short"))


def encoder() -> V3Encoder:
    return V3Encoder(TOKENIZER, 8, 1024, 1024)  # v3-tiny: K = 8, C = 1024, vocab 1024


def conversation(data, line: int) -> dict:
    return json.loads(data.read_text().splitlines()[line - 1])


def generation_prompt(data, line: int) -> V3Prompt:
    """Independently of the cut: the prompt `generate --text` builds (V3Encoder.prompt) for that line's text."""
    return V3Prompt.of(encoder().prompt(TEXTS[line - 1]))


# ----------------------------------------------------------------------------- the prompt

def test_the_v3_prompt_is_the_generation_prompt_cut_from_the_training_sample(tmp_path):
    enc = encoder()
    rng = np.random.default_rng(0)
    ref, target = (rng.integers(0, 1024, (8, t)).astype(np.int16) for t in (6, 9))
    messages = [{"role": "user", "content": "Say it."},
                {"role": "assistant", "content": [{"type": "text", "text": "A voice to copy."},
                                                  {"type": "audio", "codes": ref}]},
                {"role": "user", "content": "Now say this."},
                {"role": "assistant", "content": [{"type": "text", "text": "The sky is blue."},
                                                  {"type": "audio", "codes": target}]}]
    sample = materialize(enc.plan(messages, codes_loader(8, 1024), "line 4", 4), enc.streams)
    h = held_prompt_v3(sample, 3, enc)
    assert h.id == "eval-0003" and h.number == 3 and h.text == "The sky is blue."
    assert torch.equal(h.reference, torch.from_numpy(target).long())
    want = V3Prompt.of(enc.prompt("The sky is blue.", ref, "A voice to copy."))  # generate's cloning prompt
    assert int(want.audio_mask.sum()) == 6 + 7  # the reference rows are in it
    for name in ("input_ids", "audio_codes", "audio_mask"):
        assert torch.equal(getattr(h.prompt, name), getattr(want, name)), name
    text_only = materialize(enc.plan(messages[:1] + [{"role": "assistant", "content": "no audio"}],
                                     codes_loader(8, 1024), "x", 1), enc.streams)
    assert held_prompt_v3(text_only, 0, enc) is None


# ----------------------------------------------------------------------------- a run

def test_a_v3_run_listens_at_every_evaluation_as_generate_would(tmp_path, data):
    out, quiet = tmp_path / "out", tmp_path / "quiet"
    assert run(out, "--data", data, *LISTEN) == 0
    lines = [int(w.rsplit(":", 1)[1]) for w in (out / "eval_split.txt").read_text().splitlines()[1:]]
    ids = ["eval-0000", "eval-0001"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["reference", "step-0", "step-1", "step-2"]
    for i, line in zip(ids, lines):  # the references: the held-out lines' own clips and texts
        row = json.loads((out / "samples" / "reference" / f"{i}.json").read_text())
        codes = np.load(data.parent / "codes" / f"{line - 1}.npy")
        assert row["text"] == TEXTS[line - 1] and row["frames"] == codes.shape[1]
        assert np.array_equal(np.load(out / "samples" / "reference" / f"{i}.npy"), codes)
        assert (out / "samples" / "reference" / f"{i}.wav").stat().st_size > 44
    for step in (0, 1, 2):
        folder = out / "samples" / f"step-{step}"
        for i in ids:
            row = json.loads((folder / f"{i}.json").read_text())
            assert row["step"] == step and row["stopped"] in ("eos", "limit") and row["frames"] >= 0
            assert sorted(p.name for p in folder.glob(f"{i}.*")) == sorted(row["files"])
            assert row["limit"] == 2 * (row["reference_frames"] + 7)  # twice the reference's delayed rows
            assert row["stopped"] == "eos" or row["steps"] == row["limit"]
            assert np.load(folder / f"{i}.npy").shape == (8, row["frames"])
    assert not [p for p in out.rglob(".*")]  # no temp file or folder left behind
    check_report(out)  # report.html: a player per wav, links only to files that exist
    rows = [r for r in metrics(out) if r["split"] == "samples"]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["samples"] == 2 for r in rows)
    assert all(0 <= r["eos_rate"] <= 1 and 0 <= r["silence_fraction"] <= 1 for r in rows)
    evals = [r for r in metrics(out) if r["split"] == "eval"]  # the eval loss as usual: audio only, no text
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all(r["text_loss"] is None and r["audio_loss"] > 0 and r["samples"] == 2 for r in evals)
    # the codes written at steps 1 and 2 are generate_v3's for generate's prompt, the sample's seed (--seed 0 +
    # its number) and the checkpoint's adapter, rebuilt from the files
    for step in (1, 2):
        model = load_trained(out / f"checkpoint-{step}").model
        for n, (i, line) in enumerate(zip(ids, lines)):
            T = np.load(data.parent / "codes" / f"{line - 1}.npy").shape[1]
            want = generate_v3(model, generation_prompt(data, line), max_new_tokens=2 * (T + 7), seed=n)
            assert np.array_equal(np.load(out / "samples" / f"step-{step}" / f"{i}.npy"), want.codes.numpy())
    # training is the same without listening: generation draws from its own generator, the codec under fork_rng
    assert run(quiet, "--data", data, *LISTEN, "--eval-samples", "0") == 0
    assert not (quiet / "samples").exists()
    loud, calm = ([r for r in metrics(o) if r["split"] != "samples"] for o in (out, quiet))
    assert [(r["split"], r["step"], r["loss"]) for r in loud] == [(r["split"], r["step"], r["loss"]) for r in calm]
    for name, t in adapter(out / "checkpoint-2").items():
        assert torch.equal(t, adapter(quiet / "checkpoint-2")[name]), name


def test_a_released_v3_folder_decodes_the_samples_with_its_bundled_codec(tmp_path, monkeypatch):
    """--base-weights a released v3 folder (tests/v3_oracle's tiny one, with tests/audiotok_util's seeded tiny
    codec under the v3 prefix) and no decoder option: the samples are decoded by that codec, as `generate`
    decodes (tests/test_v3_generate.py), so the run writes wavs of 960 samples a frame at 24 kHz."""
    import wave

    from tests.helpers import write_jsonl
    from tests.v3_oracle import write_released_with_codec

    folder = write_released_with_codec(tmp_path / "release", tmp_path, monkeypatch)
    rows = []
    for i in range(4):  # the tiny tokenizer's words: w1, w2, ...
        codes = np.random.default_rng(i).integers(0, 1024, size=(8, 3 + i)).astype(np.int16)
        (tmp_path / "codes").mkdir(exist_ok=True)
        np.save(tmp_path / "codes" / f"{i}.npy", codes)
        rows.append({"messages": [{"role": "user", "content": f"w{i + 1}"}, {"role": "assistant", "content": [
            {"type": "text", "text": f"w{i + 2} w{i + 3}"}, {"type": "audio", "codes": f"codes/{i}.npy"}]}]})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    assert run(out, "--data", data, "--base-weights", folder, "--eval-split", "0.5", "--eval-samples", "1",
               "--max-steps", "1", "--save-steps", "1") == 0
    for sub in ("reference", "step-1"):
        frames = json.loads((out / "samples" / sub / "eval-0000.json").read_text())["frames"]
        with wave.open(str(out / "samples" / sub / "eval-0000.wav")) as w:
            assert frames > 0 and w.getframerate() == 24000 and w.getnframes() == frames * 960
    settings = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["config"]
    assert settings["audio_tokenizer"] == str(folder)  # the default is recorded (and logged) as the option
