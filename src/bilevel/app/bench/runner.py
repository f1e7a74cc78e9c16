"""Plan the runs, start one child process per measurement, collect the rows.

Rows are appended to a JSON-lines file as they arrive, so a long run that is stopped keeps what
it measured; `report` turns them into the table and the plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from . import workloads
from .child import PREFIX
from .common import LOWER_BOUND, missing_peer, reference_path

TIMEOUT_S = {"quick": 600, "full": 3600}


def plan(names: Iterable[str], mode: str, only: str | None = None):
    """(workload name, size, Impl) for every row; the lower bound first in each group."""
    for name in names:
        workload = workloads.get(name)
        for size in workload.sizes(mode):
            for impl in workload.implementations(size):
                if only is None or impl.name == LOWER_BOUND or only in impl.name:
                    yield name, size, impl


def run_child(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; a crash or timeout becomes a failed row."""
    command = [sys.executable, "-m", "bilevel.app.bench.child", json.dumps(spec)]
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "failure": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(PREFIX)]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**spec, "failure": f"exit {done.returncode}: {tail[0][:200]}"}
    row = json.loads(lines[-1].removeprefix(PREFIX))
    row["process_s"] = time.perf_counter() - began
    return row


def ensure_reference(name: str, size: dict, base: dict, timeout: float, echo) -> None:
    if reference_path(name, size).exists():
        return
    echo(f"  reference {name} {size} (float64) ...")
    row = run_child({**base, "workload": name, "size": size, "impl": "reference"}, timeout)
    if "failure" in row:
        echo(f"  reference failed: {row['failure']}")


def run_suite(
    names: Iterable[str],
    mode: str,
    results: Path,
    device: str = "cpu",
    threads: int | None = None,
    only: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Measure every planned row; append each to `results` (JSON lines) and return them all."""
    base = {"mode": mode, "device": device, "threads": threads}
    timeout = TIMEOUT_S[mode]
    rows, referenced = [], set()
    results.parent.mkdir(parents=True, exist_ok=True)
    for name, size, impl in plan(names, mode, only):
        if (name, str(size)) not in referenced:
            ensure_reference(name, size, base, timeout, echo)
            referenced.add((name, str(size)))
        spec = {**base, "workload": name, "size": size, "impl": impl.name, "note": impl.note}
        skipped = missing_peer(impl)
        row = {**spec, "skipped": skipped} if skipped else run_child(spec, timeout)
        rows.append(row)
        with results.open("a") as file:
            file.write(json.dumps(row) + "\n")
        echo(_progress(row))
    return rows


def _progress(row: dict) -> str:
    label = f"  {row['workload']:8s} {json.dumps(row['size']):14s} {row['impl']:28s}"
    if "times" in row:
        median = sorted(row["times"])[len(row["times"]) // 2]
        return f"{label} {median:9.3f} s  {row['peak_bytes'] / 2**20:9.1f} MB"
    return f"{label} {row.get('failure') or row.get('skipped')}"


def load(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
