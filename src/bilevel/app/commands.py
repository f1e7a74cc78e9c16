"""Building blocks of the command line: the options every run takes, and the one command that
resolves a config, reads the checkpoint a run continues from, claims the output directory and
runs an experiment on the driver. bilevel.app.cli builds ``bilevel`` from them and the
experiments' declarations; an experiment with a command of its own (``fewshot test``) uses the
same blocks.
"""

from __future__ import annotations

import sys
import time
from importlib.util import find_spec
from pathlib import Path

import click

__all__ = [
    "OVERWRITE",
    "build",
    "experiment_command",
    "experiment_options",
    "resolve",
    "run",
]

OVERWRITE = click.option(
    "--overwrite",
    is_flag=True,
    help="replace the run already in --out (its results, log and checkpoints are deleted first)",
)


def experiment_options(presets):
    """The options every experiment command takes (one decorator for all of them)."""
    options = [
        click.option(
            "--preset",
            type=click.Choice(sorted(presets)),
            metavar="NAME",
            help="a named set of settings (listed below)",
        ),
        click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path),
            help="a TOML or YAML file of settings",
        ),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="KEY=VALUE",
            help="override one setting (repeatable), e.g. --set inner_steps=200",
        ),
        click.option("--seed", type=int, help="random seed: same seed, same numbers"),
        click.option("--device", help="torch device (cpu, cuda, cuda:1)"),
        click.option(
            "--out",
            type=click.Path(path_type=Path),
            help="output directory (default runs/<experiment>-<time>)",
        ),
        click.option(
            "--data-dir",
            type=click.Path(path_type=Path),
            help="data sets root (default: $BILEVEL_DATA, else the user cache)",
        ),
        click.option("--quiet", is_flag=True, help="no progress bar and no log on the console"),
        click.option("--show-config", is_flag=True, help="print the resolved config and exit"),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def resolve(experiment, preset, config_path, assignments, seed, device, presets=None):
    """The validated config, or a one-line usage error (exit 2)."""
    from .experiments.config import ConfigError
    from .experiments.config import resolve as resolve_config

    try:
        return resolve_config(
            experiment.config,
            experiment.presets if presets is None else presets,
            preset,
            config_path,
            assignments,
            seed=seed,
            device=device,
        )
    except ConfigError as error:
        raise click.UsageError(str(error)) from None


def run(
    experiment,
    config,
    out,
    data_dir,
    quiet,
    *,
    resume=None,
    overwrite=False,
    tensorboard=False,
) -> None:
    """Run into ``out``; expected failures are one line (exit 1), Ctrl-C exits 130. A new run
    (no ``resume``) does not replace a run already in ``out`` unless ``overwrite``; the refusal
    offers --resume where the experiment has it."""
    from .distributed import env_rank
    from .driver import EXPECTED, execute

    out = out or Path("runs") / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is None and env_rank() == 0:  # under torchrun, rank 0 writes: it alone checks
        _claim(out, overwrite, resumable=experiment.identity is not None)
    try:
        status = execute(
            experiment, config, out, data_dir, quiet, resume=resume, tensorboard=tensorboard
        )
    except EXPECTED as error:  # expected failures: one line, exit 1
        raise click.ClickException(str(error)) from None
    if status == "interrupted":
        click.echo(f"interrupted: a partial result is in {out} (summary.json says so)", err=True)
        sys.exit(130)
    if env_rank() == 0:  # under torchrun, one line for all the processes
        click.echo(f"completed: results in {out}", err=True)


def _claim(out: Path, overwrite: bool, resumable: bool) -> None:
    """Make `out` the directory of a new run: refuse one that holds a completed or checkpointed
    run, unless --overwrite, which deletes that run's files first (nothing else in `out`)."""
    from .runs import clear_run, previous_run

    found = previous_run(out)
    if found is None:
        return
    if overwrite:
        clear_run(out)
        return
    keep = (
        "continue it with --resume or choose another --out" if resumable else "choose another --out"
    )
    raise click.ClickException(
        f"--out {out} already holds {found}: {keep}; to replace it, add --overwrite"
    )


def show(config) -> None:
    """Print the resolved config (--show-config)."""
    from .runs import to_json

    click.echo(to_json(config.model_dump()), nl=False)


def experiment_command(experiment) -> click.Command:
    """The standard command of an experiment: the options every run takes, and --resume,
    --overwrite and --tensorboard."""

    from .experiments.config import settings_help

    @click.command(
        experiment.command or experiment.name,
        help=experiment.summary,
        epilog=settings_help(experiment.config, experiment.presets),
    )
    @experiment_options(experiment.presets)
    @click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint")
    @OVERWRITE
    @click.option(
        "--tensorboard",
        is_flag=True,
        help="also write the metrics as TensorBoard scalars in OUT/tensorboard",
    )
    def command(
        preset,
        config_path,
        assignments,
        seed,
        device,
        out,
        data_dir,
        quiet,
        show_config,
        resume,
        overwrite,
        tensorboard,
    ):
        from .checkpoints import restarted

        config = resolve(experiment, preset, config_path, assignments, seed, device)
        if show_config:
            show(config)
            return
        if tensorboard and find_spec("tensorboard") is None:
            raise click.UsageError(
                "--tensorboard: tensorboard is not installed (pip install 'bilevel[tensorboard]')"
            )
        overwrite = overwrite and not restarted()  # the first attempt replaced the old run
        state = _read_checkpoint(experiment, config, resume, overwrite, out)
        run(
            experiment,
            config,
            out,
            data_dir,
            quiet,
            resume=state,
            overwrite=overwrite,
            tensorboard=tensorboard,
        )

    return command


def _read_checkpoint(experiment, config, resume: bool, overwrite: bool, out):
    """The verified checkpoint of --out that the run continues from: with --resume, or with
    ``BILEVEL_RESUME=auto`` (or a torchrun restart) when there is one. Read before any file of
    the run is opened: a checkpoint that cannot be used is one line (exit 1) and leaves the run
    as it was."""
    from .checkpoints import AUTO_RESUME, CHECKPOINT, CheckpointError, auto_resume
    from .driver import read

    if resume and overwrite:
        raise click.UsageError(
            "--resume and --overwrite exclude each other: --resume continues the run in --out, "
            "--overwrite replaces it"
        )
    if resume and out is None:
        raise click.UsageError("--resume needs --out, the directory of the run")
    automatic = not resume and not overwrite and out is not None and auto_resume()
    if not resume and not (automatic and (Path(out) / CHECKPOINT).is_file()):
        return None
    try:
        older = experiment.older_identities(config) if experiment.older_identities else ()
        return read(out, experiment.identity(config), experiment.upgrade, older)
    except CheckpointError as error:
        if automatic:
            raise click.ClickException(
                f"{error} ({AUTO_RESUME}=auto resumes only the configuration that wrote it: "
                "choose another --out, or add --overwrite to replace the run)"
            ) from None
        raise click.ClickException(str(error)) from None


def build(entry) -> click.Command:
    """The click command of a declaration (bilevel.app.experiments.command_line): an
    experiment's (its own, or the standard one), a group's with its commands, or a click
    command as it is."""
    from .experiments import Experiment, Group

    if isinstance(entry, Experiment):
        return entry.build(entry) if entry.build is not None else experiment_command(entry)
    if isinstance(entry, Group):
        group = click.Group(entry.name, help=entry.help)
        for item in entry.commands:
            group.add_command(build(item))
        return group
    return entry
