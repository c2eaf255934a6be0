"""The run's log: one line per log step (+ an analysis line now and then), the chance warning only with
evidence over a window at a non-zero learning rate, train.log holding every line from the first."""
import logging
import math
from types import SimpleNamespace

import torch

from higgs_min import runlog
from higgs_min.loss import Diagnostics

CHANCE = math.log(1024)


def _step(report, step, text, lr=1e-3):
    row = {"step": step, "loss": text + 1, "text_loss": text, "audio_loss": 1.0, "lr": lr, "grad_norm": 1.0,
           "tokens_per_s": 100.0}
    text_scores = SimpleNamespace(count=3, row=torch.zeros(3, dtype=torch.long), pred=torch.tensor([1, 2, 3]),
                                  target=torch.tensor([1, 2, 4]), logits_shape=(3, 1024))
    audio = SimpleNamespace(counts=torch.tensor([2, 2]), correct=torch.tensor([1, 2]), target=torch.empty(0, 2),
                            logits_shape=(2, 2, 1026))
    return report.lines(row, text_scores, audio, next_save=100)


def test_chance_warning_needs_a_window_at_nonzero_lr(caplog):
    diag = Diagnostics(1024, 1026)
    report = runlog.StepReport(diag, 0, 100)
    for step, value in enumerate([8.0, CHANCE, 5.0, CHANCE, 3.0], 1):  # passing through chance: no warning
        lines = _step(report, step, value)
        assert 1 <= len(lines) <= 2 and lines[0].startswith(f"step {step}/100: ") and "eta" in lines[0]
    assert "chance level" not in caplog.text
    frozen = runlog.StepReport(diag, 0, 100)
    for step in range(1, 6):  # at chance, but the learning rate is 0: not evidence of anything
        _step(frozen, step, CHANCE, lr=0.0)
    assert "chance level" not in caplog.text
    stuck = runlog.StepReport(diag, 0, 100)
    for step in range(1, runlog.WINDOW + 1):
        _step(stuck, step, CHANCE * 1.01)
    assert f"text loss at chance level for the last {runlog.WINDOW} log steps" in caplog.text
    assert "steps 1-4" in caplog.text


def test_analysis_line_only_every_few_log_steps():
    report = runlog.StepReport(Diagnostics(1024, 1026), 0, 20, detail_every=4)
    counts = [len(_step(report, s, 5.0)) for s in range(1, 21)]
    assert [i + 1 for i, c in enumerate(counts) if c == 2] == [1, 4, 8, 12, 16, 20]  # first, every 4th, last
    assert counts[0] == 2 and counts[-1] == 2 and counts[1] == 1


def test_train_log_gets_the_lines_logged_before_it_opened(tmp_path):
    runlog.setup(True)
    log = logging.getLogger("higgs_min.train")
    try:
        log.info("before the output folder was checked")
        runlog.attach_file(tmp_path / "train.log")
        log.info("after")
    finally:  # leave the package logger as the other tests expect it
        package = logging.getLogger("higgs_min")
        for h in list(package.handlers):
            package.removeHandler(h)
            h.close()
        package.setLevel(logging.NOTSET)
    text = (tmp_path / "train.log").read_text()
    assert text.index("before the output folder") < text.index("after")
    assert runlog.duration(3725) == "1h02m" and runlog.duration(65) == "1m05s"
