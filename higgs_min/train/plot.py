"""Plot a run's losses: python -m higgs_min.train.plot OUTPUT_DIR  ->  OUTPUT_DIR/loss.png

Reads OUTPUT_DIR/metrics.jsonl (one JSON line per log step; rows with "split": "eval" are the
held-out evaluations, drawn as dashed lines with markers; rows with "split": "samples" are the figures of the
generated held-out samples (train/samples.py), drawn in a second panel when present). matplotlib arrives
with descript-audio-codec's dependencies; it is imported only here.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from higgs_min import atomic

SAMPLE_FIGURES = (("duration_ratio", "duration ratio"), ("eos_rate", "EOS rate"), ("silence_fraction", "silence"),
                  ("wer", "WER"), ("cer", "CER"), ("speaker_similarity", "speaker similarity"))


def plot(output_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path = output_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics to plot (is {output_dir} a training output folder?)")
    rows = {"train": {}, "eval": {}, "samples": {}}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: malformed JSON: {e.msg}")
        # a resumed run may log a step twice: keep the last
        rows[r.get("split", "train") if r.get("split") in rows else "train"][r["step"]] = r
    heard = sorted(rows["samples"])
    fig, axes = plt.subplots(2 if heard else 1, 1, figsize=(8, 7.5 if heard else 4.5), squeeze=False)
    ax = axes[0, 0]
    for split, style in (("train", "-"), ("eval", "o--")):
        steps = sorted(rows[split])
        for key, label, color in (("loss", "total", "C0"), ("text_loss", "text", "C1"), ("audio_loss", "audio", "C2")):
            # null (no targets of that kind at a step): a gap in the curve; a curve of nulls is not drawn
            values = [rows[split][s].get(key) for s in steps]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], style, color=color,
                        label=f"{split} {label}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{output_dir.name}: training" + (" and held-out" if rows["eval"] else "") + " loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if heard:
        sx = axes[1, 0]
        for key, label in SAMPLE_FIGURES:
            points = [(s, rows["samples"][s][key]) for s in heard if rows["samples"][s].get(key) is not None]
            if points:
                sx.plot(*zip(*points), "o-", label=label)
        sx.set_xlabel("step")
        sx.set_title("generated held-out samples (train/samples.py)")
        sx.grid(alpha=0.3)
        sx.legend()
    out = output_dir / "loss.png"
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic.replace_file(out, buf.getvalue())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.train.plot", description="Write OUTPUT_DIR/loss.png.")
    ap.add_argument("output_dir", type=Path, help="a training output folder holding metrics.jsonl")
    print(f"wrote {plot(ap.parse_args(argv).output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
