"""`bilevel bench`: run the benchmark suite, each measurement in its own process."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from pathlib import Path

import click

from .workloads import MODULES


def machine() -> str:
    """CPU model, cores, memory, torch and Python versions (and the GPU, where there is one)."""
    import os

    import psutil
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{model}, {os.cpu_count()} cores, {memory:.0f} GB RAM{gpu}; torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def header(mode: str, threads: int | None, device: str) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    args = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else sys.argv[1:]
    command = "bilevel bench " + shlex.join(args)
    return (
        f"- date: {now}\n- command: `{command}`\n- machine: {machine()}\n"
        f"- device: {device}; torch threads: {threads or 'default'}; mode: {mode}\n"
    )


@click.command()
@click.option("--quick/--full", default=True, help="A couple of minutes, or every size.")
@click.option(
    "--workload", "-w", "names", multiple=True, type=click.Choice(list(MODULES)),
    help="Run only these workloads (repeatable); default all.",
)  # fmt: skip
@click.option("--only", help="Run only implementations whose name contains this (and bounds).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per run.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"),
    show_default=True, help="Folder for the JSON lines, the table and the plots.",
)  # fmt: skip
@click.option("--report-only", is_flag=True, help="Rebuild table and plots from saved rows.")
def bench(quick, names, only, threads, device, out, report_only) -> None:
    """Time and memory of every hypergradient method against the peers (one process each)."""
    from . import report, runner

    mode = "quick" if quick else "full"
    rows_path = out / f"{mode}.jsonl"
    if report_only:
        rows = runner.load(rows_path)
    else:
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.write_text("")
        click.echo(f"bench ({mode}); rows -> {rows_path}")
        rows = runner.run_suite(names or list(MODULES), mode, rows_path, device, threads, only,
                                echo=click.echo)  # fmt: skip
    text = (
        f"{header(mode, threads, device)}\n{report.table(rows)}\n\n{report.targets_table(rows)}\n"
    )
    (out / f"{mode}.md").write_text(text)
    plot = report.plot_w1(rows, out / f"w1_{mode}.png")
    click.echo("\n" + text + (f"\nplot: {plot}" if plot else ""))
