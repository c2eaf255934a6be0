"""RUN/report.html: one page to look at and listen to a run, rewritten at each evaluation.

    write(output_dir) -> Path          python -m higgs_min.train.report OUTPUT_DIR

One self-contained file opened from the file system: inline CSS, no script, nothing fetched. It shows
    loss.png (train/plot.py: train and eval losses, and the sample figures)
    a table of the sample figures per evaluation (the metrics.jsonl rows with "split": "samples")
    per held-out sample, a row of <audio> players: the reference, then every step from the first to the latest,
    each with its figures under it
Every link is relative (loss.png, samples/...), so the run folder can be moved or copied whole, and only files
that exist are linked: what the page reads is what train/samples.py wrote (each sample's <id>.json).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path
from urllib.parse import quote

from higgs_min import atomic

STEP_DIR = re.compile(r"^step-(\d+)$")
COLUMNS = (("samples", "samples", "{:d}"), ("duration_ratio", "duration ratio", "{:.2f}"),
           ("eos_rate", "EOS rate", "{:.2f}"), ("silence_fraction", "silence", "{:.2f}"), ("wer", "WER", "{:.3f}"),
           ("cer", "CER", "{:.3f}"), ("speaker_similarity", "speaker sim.", "{:.3f}"), ("generation_s", "seconds", "{:.1f}"))
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top}
th{background:#f4f4f4}.clips{overflow-x:auto}.clip{min-width:16em}.fig{font-size:.85em;color:#444}
.say{font-style:italic}audio{width:15em}img{max-width:100%}"""


def read_rows(output_dir: Path) -> dict[str, dict[int, dict]]:
    """metrics.jsonl by split and step (a resumed run may log a step twice: the last row wins)."""
    rows = {"eval": {}, "samples": {}}
    path = output_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # plot.py names a malformed line; the page shows what it can
            if r.get("split") in rows:
                rows[r["split"]][r["step"]] = r
    return rows


def read_clips(folder: Path) -> dict[str, dict]:
    """id -> the sample's JSON row, for every <id>.json in `folder`."""
    out = {}
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def figures(r: dict) -> str:
    """The figures under one player."""
    parts = [f"{r['frames']} frames" + (f", {r['duration_s']:.2f} s" if r.get("duration_s") is not None else "")]
    if r.get("stopped"):
        parts.append("stopped by EOS" if r["stopped"] == "eos" else f"cut at the limit ({r.get('limit')} steps)")
    for key, label, spec in (("duration_ratio", "duration ratio", "{:.2f}"), ("silence_fraction", "silence", "{:.2f}"),
                             ("wer", "WER", "{:.3f}"), ("cer", "CER", "{:.3f}"),
                             ("speaker_similarity", "speaker sim.", "{:.3f}"), ("rtf", "RTF", "{:.2f}")):
        if r.get(key) is not None:
            parts.append(f"{label} {spec.format(r[key])}")
    if r.get("transcript") is not None:
        parts.append(f"heard: <span class=say>{html.escape(r['transcript'])}</span>")
    return "<div class=fig>" + "<br>".join(parts) + "</div>"


def player(output_dir: Path, rel: str) -> str:
    if (output_dir / rel).is_file():
        return f'<audio controls preload="metadata" src="{quote(rel)}"></audio>'
    return "<div class=fig>(codes only: no decoder)</div>" if rel.endswith(".wav") else ""


def render(output_dir: Path) -> str:
    rows = read_rows(output_dir)
    samples = output_dir / "samples"
    steps = sorted((int(m.group(1)), p) for p in (samples.iterdir() if samples.is_dir() else [])
                   if (m := STEP_DIR.match(p.name)) and p.is_dir())
    references = read_clips(samples / "reference")
    clips = {step: read_clips(p) for step, p in steps}
    name = html.escape(output_dir.name)
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{name}: report</title>",
           f"<style>{STYLE}</style></head><body><h1>{name}</h1>"]
    if (output_dir / "loss.png").is_file():
        out.append('<h2>Loss</h2><img src="loss.png" alt="training and held-out loss">')
    if rows["samples"]:
        out.append("<h2>Samples per evaluation</h2><table><tr><th>step</th><th>eval loss</th>"
                   + "".join(f"<th>{label}</th>" for _, label, _ in COLUMNS) + "</tr>")
        for step, r in sorted(rows["samples"].items()):
            loss = rows["eval"].get(step, {}).get("loss")
            out.append(f"<tr><td>{step}</td><td>{fmt(loss, '{:.4f}')}</td>"
                       + "".join(f"<td>{fmt(r.get(k), spec)}</td>" for k, _, spec in COLUMNS) + "</tr>")
        out.append("</table>")
    ids = sorted(set(references) | {i for c in clips.values() for i in c})
    if ids:
        out.append("<h2>Held-out samples</h2><p>Each row: the reference clip, then the clip generated at each "
                   "evaluation (same prompt, same seed).</p>")
    for i in ids:
        ref = references.get(i, {})
        text = ref.get("text") or next((c[i].get("text") for c in clips.values() if i in c), "")
        out.append(f"<h3>{html.escape(i)}</h3><p class=say>{html.escape(text or '')}</p><div class=clips><table><tr>")
        cells = [("reference", f"samples/reference/{i}.wav", ref)] + [
            (f"step {step}", f"samples/step-{step}/{i}.wav", clips[step][i]) for step, _ in steps if i in clips[step]]
        out.append("".join(f"<th>{label}</th>" for label, _, _ in cells) + "</tr><tr>")
        out.append("".join(f"<td class=clip>{player(output_dir, rel)}{figures(r) if r else ''}</td>"
                           for _, rel, r in cells))
        out.append("</tr></table></div>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write(output_dir: Path) -> Path:
    """Render and atomically replace OUTPUT_DIR/report.html."""
    path = Path(output_dir) / "report.html"
    atomic.write_text(path, render(Path(output_dir)))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m higgs_min.train.report",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("output_dir", type=Path, help="a training output folder")
    print(f"wrote {write(ap.parse_args(argv).output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
