"""The application's one curve plotter: panels of labelled curves, side by side.

Every learning curve, loss curve and comparison of the experiments is a list of panels, each a
list of curves against one x axis; curves at the same position in each panel share a colour
(matplotlib's cycle restarts in each panel), so one legend serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Curve", "Panel", "figure", "histories"]


@dataclass(frozen=True)
class Curve:
    """One labelled line: ``y`` against ``x``; ``style`` is a matplotlib format ("o-", "s--")
    and ``steps`` draws a staircase (a best-so-far value)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"
    steps: bool = False


@dataclass(frozen=True)
class Panel:
    """One axis: its curves, labels, scales and horizontal reference lines ({label: y})."""

    curves: Sequence[Curve]
    xlabel: str
    ylabel: str | None = None
    title: str | None = None
    xscale: str = "linear"
    yscale: str = "linear"
    lines: dict[str, float] = field(default_factory=dict)


def figure(
    panels: Sequence[Panel],
    *,
    width: float = 5.0,
    height: float = 3.5,
    sharey: bool = False,
    title: str | None = None,
    legend_below: bool = False,
):
    """A matplotlib figure of ``panels`` in one row, ``width`` inches each.

    Args:
        panels: the axes, left to right.
        sharey: one y axis for all panels (its label from the first panel).
        title: a title above the figure.
        legend_below: one legend under the figure (many curves) instead of one in the first
            panel.

    Returns:
        The figure, to be saved by ``Run.plot`` or ``runs.save_figure`` (which close it).
    """
    import matplotlib.pyplot as plt

    shown, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels), height), sharey=sharey, squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for index, (axis, panel) in enumerate(zip(axes[0], panels)):
        _draw(axis, panel, labelled=index == 0)  # the same curves again: one legend entry
    first = axes[0][0]
    if legend_below:
        count = len(panels[0].curves)
        shown.legend(loc="outside lower center", ncols=min(count, 3), fontsize="small")
    elif first.get_legend_handles_labels()[0]:
        first.legend()
    if title:
        shown.suptitle(title)
    return shown


def _draw(axis, panel: Panel, labelled: bool) -> None:
    def label(text: str) -> str:
        return text if labelled else "_nolegend_"

    for curve in panel.curves:
        if curve.steps:
            axis.step(curve.x, curve.y, where="post", label=label(curve.label))
        else:
            axis.plot(curve.x, curve.y, curve.style, label=label(curve.label))
    for text, y in panel.lines.items():
        axis.axhline(y, color="grey", linestyle="--", label=label(text))
    axis.set_xscale(panel.xscale)
    axis.set_yscale(panel.yscale)
    axis.set_xlabel(panel.xlabel)
    if panel.ylabel is not None:
        axis.set_ylabel(panel.ylabel)
    if panel.title is not None:
        axis.set_title(panel.title)


def histories(runs: dict[str, Sequence[dict]], ylabel: str, key: str = "outer_loss") -> Panel:
    """A panel of ``key`` against the hyper-iteration, one curve per labelled history (the
    metrics of a ``bilevel.HyperOptimizer``'s iterations)."""
    curves = [
        Curve(label, range(1, len(history) + 1), [m[key] for m in history])
        for label, history in runs.items()
    ]
    return Panel(curves, "hyper-iteration", ylabel)
