"""Smoke test of the benchmark suite: one tiny W1 measurement in its own process; the peers' install
line."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from bilevel.app.bench import report, runner
from bilevel.app.bench.common import PEERS, Impl, missing_peer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the experiments extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
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


def test_the_peer_install_lines_bring_what_each_peer_needs_to_import():
    needed = {name for names in PEERS.values() for name in names}
    for readme in ("README.md", "benchmarks/README.md"):
        (line,) = re.findall(r"pip install --no-deps ([\w\- ]+)", (ROOT / readme).read_text())
        assert set(line.split()) == needed, readme
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["project"]["optional-dependencies"]["peers"]) == needed


def test_a_missing_peer_row_names_the_whole_install_line():
    reason = missing_peer(Impl("torchopt", "torchopt"))
    if all(importlib.util.find_spec(name) for name in PEERS["torchopt"]):
        assert reason is None
    else:
        assert reason.endswith("(pip install --no-deps torchopt optree graphviz)")
