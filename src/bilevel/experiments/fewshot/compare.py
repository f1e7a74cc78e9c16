"""Several training runs side by side: meta-validation accuracy against iterations and time.

Read from each run's metrics.jsonl, so runs made on other machines (a GPU, say) compare too.
Time is the training time the run recorded: its iterations (each train line's mean time per
iteration over its window) plus its validations; start-up and checkpoints are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...runs import save_figure


@dataclass(frozen=True)
class Curve:
    label: str
    iterations: list[int]
    minutes: list[float]
    accuracy: list[float]


def validation_curve(run: Path, label: str | None = None) -> Curve:
    """The meta-validation points of a training run directory."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} is not a training run (no metrics.jsonl)")
    seconds, done = 0.0, 0
    iterations, minutes, accuracy = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            kind, iteration = row["kind"], row["iteration"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {number} is not a metrics line") from None
        if kind == "train":
            seconds += row["seconds"] * max(iteration - done, 0)
            done = max(done, iteration)
        elif kind == "val":
            seconds += row["seconds"]
            iterations.append(iteration)
            minutes.append(seconds / 60)
            accuracy.append(row["accuracy"])
    if not iterations:
        raise ValueError(f"{run} has no meta-validation yet")
    return Curve(label or Path(run).name, iterations, minutes, accuracy)


def plot_curves(curves: list[Curve], out: Path, title: str | None = None) -> Path:
    """Meta-validation accuracy against iterations (left) and training minutes (right)."""
    import matplotlib.pyplot as plt

    figure, (by_iteration, by_time) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for curve in curves:
        line = by_iteration.plot(curve.iterations, curve.accuracy, marker=".", label=curve.label)
        by_time.plot(curve.minutes, curve.accuracy, marker=".", color=line[0].get_color())
    by_iteration.set_xlabel("meta-iteration")
    by_time.set_xlabel("training minutes (as recorded)")
    by_iteration.set_ylabel("meta-validation accuracy (%)")
    by_iteration.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return save_figure(figure, out)


def compare_runs(runs: list[Path], out: Path, labels: list[str] | None, title=None) -> Path:
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--label: {len(labels)} labels for {len(runs)} runs (one each, or none)")
    curves = [validation_curve(r, labels[i] if labels else None) for i, r in enumerate(runs)]
    return plot_curves(curves, out, title)
