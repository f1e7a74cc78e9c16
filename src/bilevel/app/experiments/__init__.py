"""Experiments: each declares its config, presets, run function and place on the command line.

Experiments use only the public API of the library, as users do. The command line
(bilevel.app.cli) is built from :func:`command_line`: every :class:`Experiment` becomes a
command with the options every run has (bilevel.app.commands), unless it declares a command of
its own; a :class:`Group` gathers the commands of one experiment family (``bilevel fewshot``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from .config import ExperimentConfig


@dataclass(frozen=True)
class Experiment:
    """One kind of run.

    Attributes:
        name: the run's name in config.json and the default ``--out`` ("fewshot-train").
        summary: the command's help.
        config: its validated settings; presets: named starting points for them.
        run: ``run(config, driver, data_dir)`` (bilevel.app.driver.Driver: the run's
            directory, loop and checkpoints).
        identity: what its checkpoints are bound to, from the config; None: it writes none
            (no --resume).
        upgrade: ``upgrade(state, out)``: a checkpoint of an older layout as this version's.
        older_identities: ``older_identities(config)``: the identities earlier versions bound
            the same settings to (their checkpoints still resume).
        command: the subcommand's name (default: ``name``).
        build: ``build(experiment) -> click.Command``: a command of its own instead of the
            standard one.
    """

    name: str
    summary: str
    config: type[ExperimentConfig]
    presets: dict[str, dict]
    run: Callable
    identity: Callable[[ExperimentConfig], dict] | None = None
    upgrade: Callable | None = None
    older_identities: Callable[[ExperimentConfig], list[dict]] | None = None
    command: str | None = None
    build: Callable | None = None


@dataclass(frozen=True)
class Group:
    """A command group: ``bilevel NAME ...``; ``commands`` holds experiments and click
    commands (those that run nothing, such as ``fewshot compare``)."""

    name: str
    help: str
    commands: tuple


def command_line() -> list:
    """What ``bilevel`` offers besides ``methods`` and ``bench``: experiments and groups, in
    the order of ``bilevel --help`` (imported here, when the command line is built)."""
    from . import convergence, fewshot, hparams, hyperclean

    return [hyperclean.EXPERIMENT, hparams.EXPERIMENT, convergence.EXPERIMENT, fewshot.GROUP]


def with_inputs(experiment: Experiment, **inputs) -> Experiment:
    """The experiment with keyword inputs its run needs beyond (config, driver, data_dir)."""
    return replace(experiment, run=partial(experiment.run, **inputs))
