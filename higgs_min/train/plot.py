"""Plot a run's losses: python -m higgs_min.train.plot OUTPUT_DIR  ->  OUTPUT_DIR/loss.png

Reads OUTPUT_DIR/metrics.jsonl (one JSON line per log step; rows with "split": "eval" are the
held-out evaluations, drawn as dashed lines with markers). matplotlib arrives
with descript-audio-codec's dependencies; it is imported only here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot(output_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path = output_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics to plot (is {output_dir} a training output folder?)")
    rows = {"train": {}, "eval": {}}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: malformed JSON: {e.msg}")
        # a resumed run may log a step twice: keep the last
        rows["eval" if r.get("split") == "eval" else "train"][r["step"]] = r
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    out = output_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.train.plot", description="Write OUTPUT_DIR/loss.png.")
    ap.add_argument("output_dir", type=Path, help="a training output folder holding metrics.jsonl")
    print(f"wrote {plot(ap.parse_args(argv).output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
