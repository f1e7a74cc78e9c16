"""The `bilevel` command line: thin. Its commands are the experiments' declarations
(bilevel.app.experiments.command_line) built by bilevel.app.commands; nothing here is any one
experiment's."""

from __future__ import annotations

import click

from bilevel import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bilevel")
def main() -> None:
    """Gradient-based bilevel programming on PyTorch: hyperparameter optimisation and
    meta-learning by reverse, forward, truncated and implicit hypergradients."""


@main.command()
def methods() -> None:
    """List the hypergradient methods and their options."""
    from bilevel import METHODS

    from .method_guide import describe_methods

    click.echo(describe_methods(METHODS))


def _register_commands() -> None:
    """``bench`` and every experiment's command, as the experiments declare them."""
    from .bench.cli import bench
    from .bench.stochastic.cli import stochastic_bench
    from .commands import build
    from .experiments import command_line

    main.add_command(bench)
    main.add_command(stochastic_bench)
    for entry in command_line():
        main.add_command(build(entry))


_register_commands()

if __name__ == "__main__":
    main()
