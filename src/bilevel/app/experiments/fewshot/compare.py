"""Several training runs side by side: meta-validation accuracy against iterations and time.

Read from each run's metrics.jsonl, so runs made on other machines (a GPU, say) compare too.
Time is the training time the run recorded: its iterations (each train line's mean time per
iteration over its window) plus its validations; start-up and checkpoints are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ... import checkpoints, plots
from ...runs import save_figure
from .train import training_run

FORMATS = (".png", ".pdf", ".svg")


@dataclass(frozen=True)
class Curve:
    label: str
    iterations: list[int]
    minutes: list[float]
    accuracy: list[float]


def validation_curve(run: Path, label: str | None = None) -> Curve:
    """The meta-validation points of a training run directory (a last line cut short by a
    killed process is left out, as a resumed run does)."""
    run = Path(run)
    try:
        training_run(run)  # a bilevel or classical training run, not a test or another experiment
    except checkpoints.CheckpointError as error:
        raise ValueError(str(error)) from None
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} has no metrics.jsonl")
    lines = path.read_text().splitlines()
    seconds, done = 0.0, 0
    iterations, minutes, accuracy = [], [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            kind, iteration, took = row["kind"], row["iteration"], row["seconds"]
            if kind == "val":
                accuracy.append(float(row["accuracy"]))
        except (ValueError, KeyError, TypeError) as error:
            if isinstance(error, ValueError) and number == len(lines):
                break  # cut short by a killed process
            raise ValueError(f"{path}: line {number} is not a metrics line") from None
        if kind == "train":
            seconds += took * max(iteration - done, 0)
            done = max(done, iteration)
        elif kind == "val":
            seconds += took
            iterations.append(iteration)
            minutes.append(seconds / 60)
    if not iterations:
        raise ValueError(f"{run} has no meta-validation yet")
    return Curve(label or run.resolve().name, iterations, minutes, accuracy)


def plot_curves(curves: list[Curve], out: Path, title: str | None = None) -> Path:
    """Meta-validation accuracy against iterations (left) and training minutes (right)."""
    by_iteration = [plots.Curve(c.label, c.iterations, c.accuracy, ".-") for c in curves]
    by_time = [plots.Curve(c.label, c.minutes, c.accuracy, ".-") for c in curves]
    panels = [
        plots.Panel(by_iteration, "training iteration", "meta-validation accuracy (%)"),
        plots.Panel(by_time, "training minutes (as recorded)"),
    ]
    figure = plots.figure(
        panels, width=5.5, height=4.2, sharey=True, title=title, legend_below=True
    )
    return save_figure(figure, out)


def compare_runs(runs: list[Path], out: Path, labels: list[str] | None, title=None) -> Path:
    if Path(out).is_dir():
        raise ValueError(f"--out: {out} is a directory; give a file name")
    if Path(out).suffix.lower() not in FORMATS:
        raise ValueError(f"--out: a figure file ending in {', '.join(FORMATS)}, got {out}")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--label: {len(labels)} labels for {len(runs)} runs (one each, or none)")
    curves = [validation_curve(r, labels[i] if labels else None) for i, r in enumerate(runs)]
    try:
        return plot_curves(curves, out, title)
    except OSError as error:
        raise ValueError(f"--out: cannot write {out} ({error.strerror or error})") from None
