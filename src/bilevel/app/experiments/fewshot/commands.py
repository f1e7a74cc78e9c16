"""The commands of ``bilevel fewshot`` that are not the standard one of a training run: ``test``
(a trained run on meta-test episodes) and ``compare`` (validation curves of several runs)."""

from __future__ import annotations

from pathlib import Path

import click

from ... import commands


def test_command(experiment) -> click.Command:
    """``bilevel fewshot test SOURCE``: the settings are the trained run's, with only test and
    episode settings open to --set; the results go to SOURCE/test by default."""

    @click.command("test", help=experiment.summary)
    @click.argument("source", type=click.Path(path_type=Path, file_okay=False))
    @click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="a test setting (repeatable), e.g. --set test_episodes=600 --set test_steps=[1,5]",
    )
    @click.option("--device", help="torch device (cpu, cuda, cuda:1)")
    @click.option(
        "--out", type=click.Path(path_type=Path), help="output directory (default SOURCE/test)"
    )
    @click.option("--data-dir", type=click.Path(path_type=Path), help="data sets root")
    @click.option("--quiet", is_flag=True, help="no progress bar and no log on the console")
    @commands.OVERWRITE
    def command(source, assignments, device, out, data_dir, quiet, overwrite):
        from ...checkpoints import CheckpointError
        from .. import with_inputs
        from .evaluation import test_overrides
        from .train import training_run

        try:
            test_overrides(assignments)
            trained, mode = training_run(source)
        except (ValueError, CheckpointError) as error:
            raise click.UsageError(str(error)) from None
        presets = {"run": trained}
        config = commands.resolve(experiment, "run", None, assignments, None, device, presets)
        runner = with_inputs(experiment, source=source, mode=mode)
        out = out or source / "test"
        if Path(out).resolve() == Path(source).resolve():  # --overwrite would delete the network
            raise click.UsageError(f"--out {out} is the trained run: test into another directory")
        commands.run(runner, config, out, data_dir, quiet, overwrite=overwrite)

    return command


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="figure file (.png)")
@click.option("--label", "labels", multiple=True, help="a legend label per run, in order")
@click.option("--title", help="figure title")
def compare_command(runs, out, labels, title):
    """Plot the meta-validation curves of training RUNS, against iterations and time."""
    from .compare import compare_runs

    try:
        path = compare_runs(list(runs), out, list(labels) or None, title)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"wrote {path}")
