"""Smoke test of the benchmark suite: one tiny W1 measurement in its own process."""

from __future__ import annotations

from bilevel.app.bench import report, runner


def test_one_tiny_measurement_gives_a_complete_row(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_BENCH_CACHE", str(tmp_path))
    base = {"workload": "w1", "size": {"T": 5}, "mode": "quick", "device": "cpu", "threads": 1}
    runner.ensure_reference("w1", base["size"], base, timeout=120, echo=print)
    row = runner.run_child({**base, "impl": "bilevel:reverse-trajectory", "note": ""}, 120)

    assert "failure" not in row, row
    assert len(row["times"]) == 2 and all(t > 0 for t in row["times"])
    assert row["peak_bytes"] > 0 and row["baseline_bytes"] > 0
    assert row["error"] < 1e-4  # float32 against the float64 reference
    line = report.table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["w1", "T=5", "bilevel:reverse-trajectory"]
    assert cells[3].endswith(("ms", "s")) and cells[5].endswith("MB")
