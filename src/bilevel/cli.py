"""The `bilevel` command line: thin; a subcommand parses, validates and calls the library."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bilevel")
def main() -> None:
    """Gradient-based bilevel programming on PyTorch: hyperparameter optimisation and
    meta-learning by reverse, forward, truncated and implicit hypergradients."""


@main.command()
def methods() -> None:
    """List the hypergradient methods and their options."""
    import inspect

    from .hypergrad import METHODS

    for name, function in METHODS.items():
        options = [
            f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        summary = (function.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:18s} {summary}\n{'':18s} options: {', '.join(options) or 'none'}")


def _experiment_command(experiment) -> click.Command:
    """One subcommand per experiment, all with the same options."""

    @click.command(experiment.name, help=experiment.summary)
    @click.option(
        "--preset",
        type=click.Choice(sorted(experiment.presets)),
        help="paper: the paper's setting; quick: minutes on 2 CPU cores",
    )
    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        help="a TOML or YAML file of settings",
    )
    @click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set inner_steps=200",
    )
    @click.option("--seed", type=int, help="random seed: same seed, same numbers")
    @click.option("--device", help="torch device (cpu, cuda, cuda:1)")
    @click.option(
        "--out",
        type=click.Path(path_type=Path),
        help="output directory (default runs/<experiment>-<time>)",
    )
    @click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        help="data sets root (default: $BILEVEL_DATA, else the user cache)",
    )
    @click.option("--quiet", is_flag=True, help="no progress bar and no log on the console")
    @click.option("--show-config", is_flag=True, help="print the resolved config and exit")
    def command(preset, config_path, assignments, seed, device, out, data_dir, quiet, show_config):
        from .data import DataError
        from .experiments import execute
        from .experiments.config import ConfigError, resolve
        from .runs import to_json

        try:
            config = resolve(
                experiment.config,
                experiment.presets,
                preset,
                config_path,
                assignments,
                seed=seed,
                device=device,
            )
        except ConfigError as error:
            raise click.UsageError(str(error)) from None
        if show_config:
            click.echo(to_json(config.model_dump()), nl=False)
            return
        out = out or Path("runs") / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            status = execute(experiment, config, out, data_dir, quiet)
        except (DataError, PermissionError) as error:
            raise click.ClickException(str(error)) from None
        if status == "interrupted":
            click.echo(
                f"interrupted: a partial result is in {out} (summary.json says so)", err=True
            )
            sys.exit(130)
        click.echo(f"completed: results in {out}", err=True)

    return command


def _register_commands() -> None:
    from .bench.cli import bench
    from .experiments import registry

    main.add_command(bench)
    for experiment in registry().values():
        main.add_command(_experiment_command(experiment))


_register_commands()

if __name__ == "__main__":
    main()
