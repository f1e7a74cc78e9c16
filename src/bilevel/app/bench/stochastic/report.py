"""The benchmark's outputs from its rows: per problem a plot (metric against solver time and
against samples drawn: medians over seeds with 20-80 % quantile bands) and a table (markdown and
json) of the time and samples each solver took to reach the problem's target.

Rows (JSON lines) are of two types: "problem" (what a problem plots, its reference and target,
its data's label) and "run" (one solver, one seed: the curve of evaluations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median

import numpy as np

from ...files import atomic_write, write_atomic

QUANTILES = (0.2, 0.8)
FLOOR = 1e-16  # suboptimality plotted on a log axis: values below (rounding) are drawn here


# -- the metric of each point, against the (possibly lowered) reference ----------------------


def lowered_minimum(problem: dict, runs: list[dict]) -> float | None:
    """For a problem whose h* was estimated (regularisation selection): the lowest h(x) any
    run reached, when it is below the estimate (None otherwise): the suboptimality is then
    measured against it, and the table says so."""
    if "h*" not in problem["reference"] or problem["reference"].get("how") == "closed form":
        return None
    values = [p["value"] for r in runs for p in r["curve"] if "value" in p]
    lowest = min(values, default=math.inf)
    return lowest if lowest < problem["reference"]["h*"] else None


def metric_of(problem: dict, point: dict, lowered: float | None) -> float:
    if lowered is not None and problem["metric"] == "suboptimality":
        return point["value"] - lowered
    return point[problem["metric"]]


def reached(problem: dict, value: float, target: float) -> bool:
    return value <= target if problem["lower_is_better"] else value >= target


# -- the table ----------------------------------------------------------------------------------


def summarise(problem: dict, runs: list[dict]) -> dict:
    """Per solver: seeds run, failed and stopped; seeds that reached the target and the median
    time and samples they took (first evaluation at or past it); the final metric's median and
    20-80 % quantiles; the median solver time and warm-up time."""
    lowered = lowered_minimum(problem, runs)
    target = problem["target"]
    if lowered is not None:  # the same fraction of the starting gap, from the lowered minimum
        target = target + problem["reference"]["h*"] - lowered
    solvers = {}
    for run in runs:
        solvers.setdefault(run["solver"], []).append(run)
    summary = {"target": target, "lowered_minimum": lowered, "solvers": {}}
    for solver, seeds in solvers.items():
        hits, finals = [], []
        for run in seeds:
            curve = run["curve"]
            if not curve:  # the solver could not start: its failure says why
                continue
            values = [metric_of(problem, p, lowered) for p in curve]
            hit = next((p for p, v in zip(curve, values) if reached(problem, v, target)), None)
            if hit is not None and "failure" not in run:
                hits.append(hit)
            if "failure" not in run:
                finals.append(values[-1])
        entry = {
            "seeds": len(seeds),
            "failed": [f"seed {r['seed']}: {r['failure']}" for r in seeds if "failure" in r],
            "stopped": [f"seed {r['seed']}: {r['stopped']}" for r in seeds if "stopped" in r],
            "reached": len(hits),
            "tuned": seeds[0]["tuned"],
            "settings": seeds[0]["settings"],
            "warmup_seconds": median(r["warmup_seconds"] for r in seeds),
            "seconds": median([r["curve"][-1]["seconds"] for r in seeds if r["curve"]] or [0.0]),
        }
        if len(hits) > len(seeds) / 2:  # a median over seeds needs most of them to get there
            entry["seconds_to_target"] = median(h["seconds"] for h in hits)
            entry["samples_to_target"] = median(h["samples"] for h in hits)
        if finals:
            entry["final"] = float(np.median(finals))
            entry["final_band"] = [float(np.quantile(finals, q)) for q in QUANTILES]
        summary["solvers"][solver] = entry
    return summary


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3g}"


def markdown(problem: dict, summary: dict) -> str:
    """The problem's table: a heading with its data and target, one row per solver."""
    metric = "suboptimality" if problem["metric"] == "suboptimality" else "test accuracy"
    direction = "≤" if problem["lower_is_better"] else "≥"
    lines = [
        f"### {problem['name']} — {problem['data']}",
        "",
        f"Target: {metric} {direction} {_number(summary['target'])} ({problem['target_rule']}); "
        f"reference: {_reference_text(problem, summary)}.",
        "",
        "| solver | reached | time to target | samples to target | final "
        f"{metric} (20–80 %) | solver time | warm-up | settings |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for solver, e in summary["solvers"].items():
        band = e.get("final_band")
        final = (
            f"{_number(e.get('final'))} ({_number(band[0])}–{_number(band[1])})" if band else "–"
        )
        to_time = f"{e['seconds_to_target']:.3g} s" if "seconds_to_target" in e else "–"
        to_samples = f"{e['samples_to_target']:.0f}" if "samples_to_target" in e else "–"
        notes = "; ".join(e["failed"] + e["stopped"])
        settings = ("" if e["tuned"] else "untuned: ") + ", ".join(
            f"{k}={v}" for k, v in e["settings"].items()
        )
        lines.append(
            f"| {solver} | {e['reached']}/{e['seeds']} | {to_time} | {to_samples} | {final} | "
            f"{e['seconds']:.3g} s | {e['warmup_seconds'] * 1e3:.0f} ms | {settings}"
            f"{' — ' + notes if notes else ''} |"
        )
    return "\n".join(lines)


def _reference_text(problem: dict, summary: dict) -> str:
    reference = problem["reference"]
    if "h*" in reference:
        text = f"h* = {reference['h*']:.10g} ({reference['how']})"
        if summary["lowered_minimum"] is not None:
            text += f", lowered to {summary['lowered_minimum']:.10g}, the lowest h any run reached"
        return text
    return ", ".join(f"{k} {v:.4g}" for k, v in reference.items() if isinstance(v, float))


def write_tables(out: Path, mode: str, header: str, problems: list[dict], runs: list[dict]):
    """{mode}.md and {mode}.json in `out`; returns the markdown text."""
    sections, record = [header], {"header": header, "problems": {}}
    for problem in problems:
        own = [r for r in runs if r["problem"] == problem["name"]]
        summary = summarise(problem, own)
        sections.append(markdown(problem, summary))
        record["problems"][problem["name"]] = {**problem, **summary}
    text = "\n\n".join(sections) + "\n"
    atomic_write(out / f"{mode}.md", text)
    atomic_write(out / f"{mode}.json", json.dumps(record, indent=1) + "\n")
    return text


# -- the plots ----------------------------------------------------------------------------------


def band(curves: list[tuple[np.ndarray, np.ndarray]], log_y: bool, points: int = 60):
    """(grid, median, lower, upper) over seeds: each seed's curve interpolated on a log grid
    of x (in log x, and log y for a log axis) over the range all seeds cover."""
    curves = [(x[x > 0], y[x > 0]) for x, y in curves]
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    start, stop = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    if not start < stop:
        return None
    grid = np.geomspace(start, stop, points)

    def warp(y):
        return np.log10(np.maximum(y, FLOOR)) if log_y else y

    values = np.stack([np.interp(np.log10(grid), np.log10(x), warp(y)) for x, y in curves])
    middle, low, high = (np.quantile(values, q, axis=0) for q in (0.5, *QUANTILES))
    unwarp = (lambda v: 10**v) if log_y else (lambda v: v)
    return grid, unwarp(middle), unwarp(low), unwarp(high)


def plot(out: Path, mode: str, problem: dict, runs: list[dict]) -> Path | None:
    """{problem}_{mode}.png: the metric against solver time and against samples drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(problem, runs)
    lowered, log_y = summary["lowered_minimum"], problem["metric"] == "suboptimality"
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    drawn = False
    for index, solver in enumerate(summary["solvers"]):
        seeds = [r for r in runs if r["solver"] == solver and "failure" not in r]
        colour = f"C{index % 10}"  # ten colours, then the same dashed, then dotted
        style = ("-", "--", ":")[index // 10 % 3]
        for axis, key in zip(axes, ("seconds", "samples")):
            curves = [
                (
                    np.array([p[key] for p in r["curve"]], dtype=float),
                    np.array([metric_of(problem, p, lowered) for p in r["curve"]]),
                )
                for r in seeds
            ]
            found = band(curves, log_y)
            if found is None:
                continue
            grid, middle, low, high = found
            axis.plot(grid, middle, color=colour, linestyle=style, label=solver)
            axis.fill_between(grid, low, high, color=colour, alpha=0.2, linewidth=0)
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    seeds = max(s["seeds"] for s in summary["solvers"].values())
    for axis, label in zip(axes, ("solver time (s)", "samples drawn")):
        axis.axhline(summary["target"], color="k", linestyle="--", linewidth=0.8, label="target")
        axis.set(xscale="log", yscale="log" if log_y else "linear", xlabel=label)
        axis.grid(True, which="both", alpha=0.3)
    ylabel = "h(x) − h*" if log_y else "test accuracy"
    axes[0].set_ylabel(
        ylabel
        + (" (h* estimated)" if problem["reference"].get("how") != "closed form" and log_y else "")
    )
    axes[1].legend(fontsize=7, ncol=2)
    figure.suptitle(f"{problem['name']} — {problem['data']}: median and 20–80 % over {seeds} seeds")
    figure.tight_layout()
    path = out / f"{problem['name']}_{mode}.png"
    write_atomic(path, lambda t: figure.savefig(t, dpi=100, format="png"))
    plt.close(figure)
    return path
