"""`make bench`'s printout: a row whose optional figures are missing (a 1M-sample row has no JSONL contestant,
so its jsonl_open_s is None) still prints, after bench/results.json was written. Bench numbers themselves are
never asserted in tests (they are measurements, `make bench`)."""
from higgs_min.bench.common import row
from higgs_min.bench.rows import format_table

MACHINE = {"processor": "cpu", "cpu_cores": 2, "torch": "2.11.0", "date": "2026-12-07"}


def test_format_table_prints_rows_with_missing_extras():
    rows = [row("open, 1M samples", 0.05, float("nan"), "s", "1000000 samples", open_s=0.02, jsonl_open_s=None),
            row("save vs floor", 0.26, 0.44, "s", "473 MB", target="ratio <= 1.1", median_ratio=0.61),
            {"name": "gpu row", "skipped": "no CUDA"}]
    text = format_table(rows, MACHINE)
    assert "open_s 0.02" in text and "jsonl_open_s" not in text  # the missing figure is left out, not printed
    assert "median_ratio 0.61" in text and "ratio <= 1.1" in text
    assert "gpu row" in text and "skipped: no CUDA" in text
