"""Listening at every evaluation (train/samples.py, train/report.py): the prompt is the training layout cut
before the clip, samples are written whole for every evaluation and repeat exactly with the same seed, a resumed
run continues the series, training is unchanged by them, --best-by follows the sample figures, and report.html
links only files that exist (and, in headless Chromium where installed, every player loads)."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_min import checkpoint
from higgs_min.chat import ChatEncoder
from higgs_min.generate.sampling import codes_loader
from higgs_min.train import report
from higgs_min.train.samples import choose_prompts, held_prompt
from tests.helpers import write_jsonl
from tests.trainutil import ROOT, adapter, metrics, run

TOKENIZER = ROOT / "data" / "tokenizer.json"
TEXTS = ["The sky is blue.", "A week has seven days.", "Good morning to you.", "The sun rises in the east.",
         "Seven is a number.", "Winter is the cold season.", "Cats like milk.", "Paris is in France."]


def short_set(folder: Path) -> Path:
    """8 demo-style conversations with 3-5 frame clips (K=8, C=1024: the tiny preset), so that a sample is
    generated in a few dozen steps."""
    rows = []
    for i, text in enumerate(TEXTS):
        codes = np.random.default_rng(i).integers(0, 1024, size=(8, 3 + i % 3)).astype(np.int16)
        (folder / "codes").mkdir(parents=True, exist_ok=True)
        np.save(folder / "codes" / f"{i}.npy", codes)
        rows.append({"messages": [{"role": "system", "content": "You are a helpful voice assistant."},
                                  {"role": "user", "content": f"Say line {i}."},
                                  {"role": "assistant", "content": [{"type": "text", "text": text},
                                                                    {"type": "audio", "codes": f"codes/{i}.npy"}]}]})
    return write_jsonl(folder / "short.jsonl", rows)


# 2 steps, a save (and an evaluation) after each, and the step-0 evaluation: three evaluations
LISTEN = ["--eval-split", "0.25", "--eval-samples", "1", "--random-codec-seed", "0", "--max-steps", "2",
          "--save-steps", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return short_set(tmp_path_factory.mktemp("short"))


def _sample_files(out: Path) -> dict[str, bytes]:
    """Every file under samples/ by relative path; JSON rows without the wall-clock figures."""
    files = {}
    for p in sorted((out / "samples").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".json":
                row = json.loads(data)
                data = json.dumps({k: v for k, v in row.items() if k not in ("generation_s", "rtf")}).encode()
            files[str(p.relative_to(out / "samples"))] = data
    return files


# ----------------------------------------------------------------------------- the prompt

def test_the_prompt_is_the_training_layout_cut_before_the_clip(data):
    enc = ChatEncoder(TOKENIZER, 8, 1024, 1024)
    conv = json.loads(data.read_text().splitlines()[1])
    sample = enc.encode(conv["messages"], codes_loader(8, 1024, data.parent), "line 2", 2)
    h = held_prompt(sample, 7, enc)
    assert h.id == "eval-0007" and h.text == TEXTS[1]
    assert torch.equal(h.reference, torch.from_numpy(np.load(data.parent / "codes" / "1.npy")).long())
    # independently: the generation prompt of the turns before, then the assistant's text and <|audio_out_bos|>
    before = enc.prompt(conv["messages"][:-1], codes_loader(8, 1024, data.parent))
    expected = torch.cat([before.input_ids, torch.tensor(enc.text(TEXTS[1]) + [enc.ids["audio_out_bos"]])])
    assert torch.equal(h.prompt.input_ids, expected)
    assert not h.prompt.audio_mask.any() and h.prompt.special == enc.ids
    text_only = {"messages": conv["messages"][:2] + [{"role": "assistant", "content": "no audio"}]}
    assert held_prompt(enc.encode(text_only["messages"], codes_loader(8, 1024), "x", 1), 0, enc) is None
    assert [x.id for x in choose_prompts([enc.encode(text_only["messages"], codes_loader(8, 1024), "x", 1),
                                          sample, sample], 1, enc)] == ["eval-0001"]


# ----------------------------------------------------------------------------- runs

def test_samples_every_evaluation_repeat_with_the_seed_and_resume_continues_the_series(tmp_path, data):
    a, c, quiet = tmp_path / "a", tmp_path / "c", tmp_path / "quiet"
    dropout = ["--lora-dropout", "0.1"]  # training draws from torch's RNG: samples must not move it
    assert run(a, "--data", data, *LISTEN, *dropout, "--tensorboard") == 0
    ids = ["eval-0000"]
    for step in (0, 1, 2):  # every evaluation: the untrained adapter, the save steps, the last
        folder = a / "samples" / f"step-{step}"
        for i in ids:
            row = json.loads((folder / f"{i}.json").read_text())
            assert row["step"] == step and row["stopped"] in ("eos", "limit") and row["frames"] >= 0
            assert sorted(p.name for p in folder.glob(f"{i}.*")) == sorted(row["files"])
            assert row["duration_ratio"] == row["frames"] / row["reference_frames"]
            assert np.load(folder / f"{i}.npy").shape == (8, row["frames"])
        for i in ids:
            assert (a / "samples" / "reference" / f"{i}.wav").stat().st_size > 44
    assert not [p for p in a.rglob(".*")]  # no temp file or folder left behind
    rows = [r for r in metrics(a) if r["split"] == "samples"]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["samples"] == 1 for r in rows)
    assert 0 <= rows[-1]["eos_rate"] <= 1 and 0 <= rows[-1]["silence_fraction"] <= 1
    ev = json.loads((a / "checkpoint-2" / "trainer_state.json").read_text())["eval"]
    assert ev["eos_rate"] == rows[-1]["eos_rate"]  # the figures travel with the checkpoint (--best-by)
    check_report(a)
    # a second run with the same seed, stopped at step 1 and resumed to 2: the same samples byte for byte,
    # and the series continues
    assert run(c, "--data", data, *LISTEN, *dropout, "--max-steps", 1) == 0
    assert sorted(p.name for p in (c / "samples").iterdir()) == ["reference", "step-0", "step-1"]
    assert run(c, "--data", data, *LISTEN, *dropout) == 0
    assert _sample_files(c) == _sample_files(a)
    assert [r["step"] for r in metrics(c) if r["split"] == "samples"] == [0, 1, 2]
    # training is the same without samples: generation draws from its own generator, the codec under fork_rng
    assert run(quiet, "--data", data, *LISTEN[:2], *LISTEN[6:], *dropout, "--eval-samples", "0") == 0
    assert not (quiet / "samples").exists()
    for name, t in adapter(a / "checkpoint-2").items():
        assert torch.equal(t, adapter(quiet / "checkpoint-2")[name]), name


def test_best_by_speaker_similarity_and_wer_with_tiny_models(tmp_path, data):
    from tests.test_audio_metrics import save_tiny_whisper, save_tiny_xvector

    whisper, xvector = save_tiny_whisper(tmp_path / "whisper"), save_tiny_xvector(tmp_path / "xvector")
    out = tmp_path / "out"
    assert run(out, "--data", data, *LISTEN, "--eval-asr", whisper, "--eval-speaker", xvector,
               "--best-by", "speaker_similarity") == 0
    rows = {r["step"]: r for r in metrics(out) if r["split"] == "samples"}
    for r in rows.values():
        assert -1 <= r["speaker_similarity"] <= 1 and r["wer"] >= 0 and r["cer"] >= 0
        for s in r["per_sample"]:
            assert isinstance(s["transcript"], str)
    best = max(rows, key=lambda s: rows[s]["speaker_similarity"])
    assert checkpoint.read_pointer(out, "best") == f"checkpoint-{best}"
    row = json.loads((out / "samples" / "step-2" / "eval-0000.json").read_text())
    assert row["words"] == len(row["text"].split()) and "speaker_similarity" in row
    check_report(out)


def test_update_best_by_a_higher_or_lower_figure(tmp_path):
    for step, ev in ((1, {"loss": 2.0, "speaker_similarity": 0.5}), (2, {"loss": 1.0, "speaker_similarity": 0.2}),
                     (3, {"loss": 3.0})):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"eval": ev}))
    assert checkpoint.update_best(tmp_path, "checkpoint-1", 0.5, "speaker_similarity", higher=True)
    assert not checkpoint.update_best(tmp_path, "checkpoint-2", 0.2, "speaker_similarity", higher=True)
    assert checkpoint.read_pointer(tmp_path, "best") == "checkpoint-1"
    assert checkpoint.update_best(tmp_path, "checkpoint-2", 1.0)  # by loss: 1.0 < 2.0
    assert checkpoint.update_best(tmp_path, "checkpoint-3", 0.9, "wer")  # the current best has no WER: replaced


@pytest.mark.parametrize("extra,message", [
    (["--eval-samples", "2"], "held-out prompts"),
    (["--eval-split", "0.25", "--best-by", "wer"], "--best-by wer needs --eval-asr"),
    (["--eval-split", "0.25", "--eval-speaker", "x"], "needs --eval-samples > 0 and a decoder"),
    (["--eval-split", "0.25", "--random-codec-seed", "0", "--codec-weights", "w.pth"], "choose one decoder"),
    (["--eval-split", "0.25", "--eval-samples", "-1"], "0 or more"),
])
def test_listening_options_are_checked_before_anything_runs(tmp_path, capsys, extra, message):
    assert run(tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the page

class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.audio = [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.audio += tag == "audio"
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])


def check_report(out: Path) -> None:
    """report.html links only files that exist, relatively, and has a player per wav (and loss.png)."""
    page = (out / "report.html").read_text()
    p = Links()
    p.feed(page)
    assert "loss.png" in p.links and p.audio == len(list((out / "samples").rglob("*.wav"))) > 0
    for link in p.links:
        assert not re.match(r"^[a-z]+:|^/", link), link  # nothing absolute, nothing fetched
        assert (out / link).is_file(), link
    assert "<script" not in page


def test_report_links_only_what_exists(tmp_path):
    out = tmp_path / "run"
    (out / "samples" / "reference").mkdir(parents=True)
    (out / "samples" / "step-3").mkdir()
    (out / "samples" / "reference" / "eval-0000.json").write_text(json.dumps({"id": "eval-0000", "text": "a <b>",
                                                                              "frames": 4}))
    (out / "samples" / "step-3" / "eval-0000.json").write_text(json.dumps({"id": "eval-0000", "frames": 2,
                                                                           "stopped": "limit", "limit": 9}))
    (out / "samples" / "step-3" / "eval-0000.wav").write_bytes(b"RIFF")
    (out / "metrics.jsonl").write_text(json.dumps({"split": "samples", "step": 3, "samples": 1, "wer": 0.5}) + "\n")
    page = report.write(out).read_text()
    assert "a &lt;b&gt;" in page and "cut at the limit (9 steps)" in page and "0.500" in page
    p = Links()
    p.feed(page)
    assert p.links == ["samples/step-3/eval-0000.wav"]  # no loss.png, no reference wav: neither exists


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def synthetic_run(out: Path) -> None:
    """A run folder as train/samples.py leaves it, without training: metrics rows, loss.png, real wavs."""
    from higgs_min.audio import codec
    from higgs_min.train import plot

    rows = [{"split": "train", "step": s, "loss": 3.0 / s, "text_loss": 1.0, "audio_loss": 2.0 / s} for s in (1, 2)]
    rows += [{"split": "eval", "step": s, "loss": 3.0 / s, "text_loss": 1.0, "audio_loss": 2.0 / s} for s in (1, 2)]
    rows += [{"split": "samples", "step": s, "samples": 1, "duration_ratio": 1.0, "eos_rate": 1.0} for s in (1, 2)]
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.plot(out)
    tone = 0.3 * torch.sin(torch.arange(12000) / 24000 * 2 * torch.pi * 440)
    for folder in ("reference", "step-1", "step-2"):
        (out / "samples" / folder).mkdir(parents=True)
        codec.write_wav(out / "samples" / folder / "eval-0000.wav", tone, 24000)
        (out / "samples" / folder / "eval-0000.json").write_text(json.dumps({"id": "eval-0000", "frames": 12,
                                                                             "text": "a tone"}))
    report.write(out)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium here (Debian: apt-get install chromium)")
def test_every_player_loads_in_headless_chromium(tmp_path):
    out = tmp_path / "out"
    synthetic_run(out)
    check_report(out)
    # a copy of the page whose script (Chromium's, not the report's) writes what loaded into the DOM
    probe = out / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", """<script>
addEventListener('load', () => setTimeout(() => {
  const a = [...document.querySelectorAll('audio')];
  const img = [...document.querySelectorAll('img')];
  document.title = 'RESULT ' + JSON.stringify({audio: a.length,
    loaded: a.filter(x => x.readyState >= 1 && x.duration > 0 && !x.error).length,
    images: img.filter(x => x.complete && x.naturalWidth > 0).length});
}, 1500));
</script></body>"""))
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--autoplay-policy=no-user-gesture-required", "--virtual-time-budget=5000", "--dump-dom",
                        probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"RESULT (\{.*?\})</title>", r.stdout)
    assert m, r.stderr[-2000:]
    got = json.loads(m.group(1).replace("&quot;", '"'))
    assert got["audio"] == 3 and got["loaded"] == got["audio"] and got["images"] == 1, got
