"""`bilevel stochastic`: every registered stochastic solver on every benchmark problem, several
seeds each; a plot per problem and a table (markdown and json) of time and samples to target."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

import click

SEEDS = {"quick": 3, "full": 5}
QUICK_PROBLEMS = ("quadratic", "ijcnn1", "covtype", "cleaning-0.5")
REFERENCE_VERSION = 1  # bump when a problem's definition changes: cached references are stale


def _names(text: str | None, known: list[str], what: str, option: str) -> list[str] | None:
    """The comma-separated names of `text`, each one of `known`; None for all."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        found = f"unknown {what} {unknown[0]!r}" if unknown else f"no {what} named"
        raise click.UsageError(f"{option}: {found}; choose from {', '.join(known)}")
    return names


@click.command("stochastic")
@click.option(
    "--quick/--full", default=True,
    help="Small sizes (2 CPU cores: 1 min for 5 solvers, 4 for 17), or every size.",
)  # fmt: skip
@click.option(
    "--solvers", help="Comma-separated names of bilevel.stochastic.SOLVERS (default all)."
)
@click.option("--problems", help="Comma-separated problems (default: all; --quick: four).")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds per solver (default 3; full 5).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Where MNIST and LIBSVM sets are."
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("benchmarks/stochastic"),
    show_default=True, help="Folder for the rows, tables and plots.",
)  # fmt: skip
@click.option("--report-only", is_flag=True, help="Rebuild tables and plots from saved rows.")
def stochastic_bench(quick, solvers, problems, seeds, threads, device, data_dir, out, report_only):
    """Benchmark the stochastic bilevel solvers: suboptimality (or test accuracy) against time
    and samples, every registered solver on every problem, several seeds each."""
    import torch

    from bilevel import stochastic

    from ...data import DataError
    from . import problems as catalogue
    from . import report

    mode = "quick" if quick else "full"
    default_problems = list(QUICK_PROBLEMS) if quick else catalogue.problem_names()
    problem_list = _names(problems, catalogue.problem_names(), "problem", "--problems")
    solver_list = _names(solvers, list(stochastic.SOLVERS), "solver", "--solvers")
    rows_path = out / f"{mode}.jsonl"
    if report_only:
        if not rows_path.is_file():
            raise click.UsageError(f"--report-only: no rows in {rows_path}; run without it first")
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    else:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise click.UsageError(f"--device {device}: CUDA is not available here")
        torch.set_num_threads(threads)
        try:
            rows = _measure(
                problem_list or default_problems,
                solver_list or list(stochastic.SOLVERS),
                seeds or SEEDS[mode],
                mode,
                device,
                data_dir,
                rows_path,
            )
        except DataError as error:  # a data set missing or corrupt: one line, exit 1
            raise click.ClickException(str(error)) from None
    problem_rows = [r for r in rows if r["type"] == "problem"]
    runs = [r for r in rows if r["type"] == "run"]
    text = report.write_tables(out, mode, _header(mode, threads, device), problem_rows, runs)
    plots = [report.plot(out, mode, p, [r for r in runs if r["problem"] == p["name"]])
             for p in problem_rows if "failure" not in p]  # fmt: skip
    click.echo("\n" + text)
    click.echo("plots: " + ", ".join(str(p) for p in plots if p))


def _measure(problems, solvers, seeds, mode, device, data_dir, rows_path) -> list[dict]:
    """Every (problem, solver, seed) run, each row appended to `rows_path` as it comes."""
    from bilevel import stochastic

    from . import problems as catalogue
    from . import runner, settings

    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.write_text("")
    rows, sync = [], runner.synchroniser(device)

    def keep(row):
        rows.append(row)
        with rows_path.open("a") as file:
            file.write(json.dumps(row) + "\n")

    click.echo(f"stochastic bench ({mode}); rows -> {rows_path}")
    for name in problems:
        bench = catalogue.build(name, mode, data_dir, device)
        catalogue.attach_reference(bench, _cache(mode))
        keep(bench.describe())
        click.echo(f"{bench.title}: target {bench.metric} {bench.target:.4g}")
        key = bench.settings_key
        for solver in solvers:
            chosen, tuned = settings.settings_for(solver, key)
            try:
                warm = runner.warm_up(bench, solver, chosen, sync)
            except (TypeError, ValueError, stochastic.DivergenceError) as error:
                click.echo(f"  {solver:10s} cannot run: {error}")
                keep(_run_row(bench, solver, chosen, tuned, {"seed": None, "curve": [],
                                                              "failure": str(error)}))  # fmt: skip
                continue
            for seed in range(seeds):
                run = runner.run_one(bench, solver, chosen, seed, settings.BUDGET[mode][key],
                                     settings.EVALUATIONS[mode], settings.MAX_SECONDS[mode],
                                     sync)  # fmt: skip
                keep(_run_row(bench, solver, chosen, tuned, {**run, **warm}))
                last = run["curve"][-1]
                click.echo(
                    f"  {solver:10s} seed {seed}: {bench.metric} {last.get(bench.metric, 'n/a')}"
                    f" after {last['samples']} samples, {last['seconds']:.2f} s"
                    + (f" ({run['failure']})" if "failure" in run else "")
                )
    return rows


def _run_row(bench, solver, chosen, tuned, run) -> dict:
    return {"type": "run", "problem": bench.name, "data": bench.data, "solver": solver,
            "settings": chosen, "tuned": tuned, "warmup_seconds": 0.0, **run}  # fmt: skip


def _cache(mode: str):
    """cached(key, compute): a reference kept as JSON in the bench cache, by mode and key."""
    from ..common import cache_dir

    def cached(key: str, compute):
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in key)
        path = cache_dir() / f"stochastic-v{REFERENCE_VERSION}-{mode}-{safe}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        from ...files import atomic_write

        atomic_write(path, json.dumps(value))
        return value

    return cached


def _header(mode: str, threads: int, device: str) -> str:
    from ..cli import machine

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    args = sys.argv[sys.argv.index("stochastic") + 1 :] if "stochastic" in sys.argv else []
    return (
        f"- date: {now}\n- command: `bilevel stochastic {shlex.join(args)}`\n"
        f"- machine: {machine()}\n- device: {device}; torch threads: {threads}; mode: {mode}"
    )
