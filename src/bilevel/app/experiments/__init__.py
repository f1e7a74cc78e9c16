"""Experiments: each is a validated config, presets, and a run function over a `Run`.

Experiments use only the public API of the library, as users do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from bilevel import BilevelError

from .config import ExperimentConfig

# Failures the command line reports in one line (exit 1), by their message: a BilevelError
# (divergence, bad data, a checkpoint that cannot be used), an output path that cannot be written.
EXPECTED = (BilevelError, PermissionError)


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    config: type[ExperimentConfig]
    presets: dict[str, dict]
    run: Callable  # (config, run: bilevel.app.runs.Run, data_dir) -> None


def registry() -> dict[str, Experiment]:
    """All experiments by name (imported lazily so that `bilevel --help` stays fast)."""
    from . import convergence, hparams, hyperclean

    return {e.name: e for e in (hyperclean.EXPERIMENT, hparams.EXPERIMENT, convergence.EXPERIMENT)}


def with_inputs(experiment: Experiment, **inputs) -> Experiment:
    """The experiment with keyword inputs its run needs beyond (config, run, data_dir)."""
    return replace(experiment, run=partial(experiment.run, **inputs))


def describe(error: BaseException) -> str:
    """An error as the command line reports it: an expected failure by its message, anything
    else by its type and message."""
    if isinstance(error, EXPECTED):
        return str(error)
    return f"{type(error).__name__}: {error}"


def execute(experiment: Experiment, config: ExperimentConfig, out, data_dir, quiet: bool) -> str:
    """Run one experiment into `out`; returns its final status.

    Ctrl-C leaves a valid partial result (status "interrupted"); an error leaves status
    "failed", its message in summary.json ("error") and run.log, and propagates. Nothing claims
    success unless the run completed.
    """
    from bilevel import __version__

    from ..runs import Run

    resolved = {
        "experiment": experiment.name,
        "version": __version__,
        "data_dir": None if data_dir is None else str(data_dir),
        "config": config.model_dump(),
    }
    run = Run(out, resolved, quiet=quiet)
    try:
        experiment.run(config, run, data_dir)
    except KeyboardInterrupt:
        run.finish("interrupted")
        return "interrupted"
    except BaseException as error:
        run.finish("failed", error=describe(error))
        raise
    run.finish("completed")
    return "completed"
