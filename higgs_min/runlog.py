"""What a training run prints: one line per log step, a progress bar that log lines never glue onto,
and train.log holding every line from the first.

    setup(is_main)            console handler (through tqdm.write while a bar is shown) + a buffer
    attach_file(path)         train.log: the buffered lines first, then every later one
    StepReport                the per-step line (losses beside chance, lr, grad norm, tokens/s, ETA) and,
                              every `detail_every` log steps, one line of prediction analysis; the run's
                              only warnings about the losses: zero targets, a loss of exactly 0, and
                              "at chance" only with evidence: every logged loss of the last WINDOW log
                              steps within 3% of chance while the learning rate was > 0
"""

from __future__ import annotations

import logging
import math
import sys
import time

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
WINDOW = 4  # log steps of evidence before "at chance" is said


class _Console(logging.Handler):
    """stderr, or tqdm.write while a progress bar is on screen (so a line never lands inside the bar)."""

    def __init__(self):
        super().__init__()
        self.bar, self.stream = None, sys.stderr  # the stderr of when the run started, as StreamHandler does

    def emit(self, record):
        try:
            msg = self.format(record)
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
                self.stream.flush()
        except Exception:  # logging's own contract: a failing handler reports, never raises
            self.handleError(record)


class _Buffered(logging.Handler):
    """Keeps records until train.log can be opened (the output folder is checked first), then writes them."""

    def __init__(self):
        super().__init__()
        self.records, self.file = [], None

    def emit(self, record):
        if self.file is None:
            self.records.append(record)
        else:
            self.file.emit(record)

    def attach(self, path) -> None:
        self.file = logging.FileHandler(path)
        self.file.setFormatter(FORMAT)
        for r in self.records:
            self.file.emit(r)
        self.records = []

    def close(self):
        if self.file is not None:
            self.file.close()
        super().close()


_console, _buffer = _Console(), _Buffered()


def setup(is_main: bool) -> None:
    """The package logger: INFO on rank 0 (console + buffer for train.log), WARNING elsewhere."""
    global _console, _buffer
    logger = logging.getLogger("higgs_min")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    _console, _buffer = _Console(), _Buffered()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in ([_console, _buffer] if is_main else [_console]):
        h.setFormatter(FORMAT)
        logger.addHandler(h)


def attach_file(path) -> None:
    if _buffer in logging.getLogger("higgs_min").handlers:
        _buffer.attach(path)


def live() -> bool:
    """Whether a run's logging is set up (and not yet detached)."""
    return _console in logging.getLogger("higgs_min").handlers


def detach() -> None:
    """The run is over: close train.log and take the run's handlers off the package logger, so that
    later in-process use (tests, notebooks) logs as if no run had happened."""
    logger = logging.getLogger("higgs_min")
    for h in (_console, _buffer):
        if h in logger.handlers:
            logger.removeHandler(h)
            h.close()


def set_bar(bar) -> None:
    _console.bar = bar


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StepReport:
    def __init__(self, diag, start_step: int, max_steps: int, detail_every: int = 4):
        self.diag, self.start_step, self.max_steps, self.detail_every = diag, start_step, max_steps, detail_every
        self.t0, self.logged, self.history = time.time(), 0, []  # history: (step, lr, {name: loss})

    def eta(self, step: int) -> float:
        done = step - self.start_step
        return (time.time() - self.t0) / done * (self.max_steps - step) if done > 0 else math.inf

    def lines(self, row: dict, text, audio, next_save: int) -> list[str]:
        """The step's line, and every `detail_every` log steps (and the first and last) the analysis line."""
        step, self.logged = row["step"], self.logged + 1
        parts = [f"step {step}/{self.max_steps}: loss {row['loss']:.4f}"]
        for name in ("text", "audio"):
            value = row[f"{name}_loss"]
            if value is not None:  # None: no targets of this kind in the step
                parts.append(f"{name} {value:.4f} ({value / self.diag.chance[name]:.2f}× chance)")
        parts.append(f"lr {row['lr']:.2e}, grad norm {row['grad_norm']:.3f}, {row['tokens_per_s']:.0f} tok/s, "
                     f"eta {duration(self.eta(step))}, next save {next_save}")
        out = [", ".join(parts)]
        if self.logged == 1 or step == self.max_steps or self.logged % self.detail_every == 0:
            scored = (f"scored {text.count} text targets (logits {text.logits_shape} per chunk), " if text.count
                      else "no text targets, ")  # (a v3 layout scores audio only)
            out.append(f"  {scored}{int(audio.counts.sum())} audio targets (logits {audio.logits_shape}); "
                       + "; ".join(x.strip() for x in self.diag.predictions(text, audio)))
        self._warnings(row, text, audio)
        return out

    def _warnings(self, row, text, audio) -> None:
        log = logging.getLogger("higgs_min.train")
        step = row["step"]
        if text.count == 0 and int(audio.counts.sum()) == 0:
            log.warning("step %d: batch has zero targets", step)
        losses = {"text": row["text_loss"], "audio": row["audio_loss"]}
        for name, value in losses.items():
            if value == 0.0:  # not None: a part without targets is not a zero loss
                log.warning("step %d: %s loss is exactly 0: check that labels are not leaking into inputs", step, name)
        self.history = (self.history + [(step, row["lr"], losses)])[-WINDOW:]
        if len(self.history) < WINDOW or any(lr <= 0 for _, lr, _ in self.history):
            return
        for name, chance in self.diag.chance.items():
            seen = [h[2][name] for h in self.history]
            if all(v is not None and abs(v / chance - 1) < 0.03 for v in seen):
                log.warning("%s loss at chance level for the last %d log steps (%s at steps %d-%d, chance %.4f, "
                            "lr %.1e-%.1e): the model is not learning", name, WINDOW,
                            ", ".join(f"{v:.4f}" for v in seen), self.history[0][0], step, chance,
                            min(h[1] for h in self.history), max(h[1] for h in self.history))
