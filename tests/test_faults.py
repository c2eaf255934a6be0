"""The fault-injection suite's quick subset (the full one is `make faults`)."""
from tests.faults import run_suite, table


def test_fault_suite_quick(tmp_path):
    rows = run_suite(tmp_path, quick=True)
    print(table(rows))
    for r in rows:
        assert r["data_lost"] == 0, r
        assert r["survived"] == r["trials"], r
