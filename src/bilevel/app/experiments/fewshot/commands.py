"""The commands of ``bilevel fewshot`` that are not the standard one of a training run: ``test``
(a trained run or weights file on meta-test episodes), ``export`` (a run's best network as a
weights file with its manifest entry) and ``compare`` (validation curves of several runs)."""

from __future__ import annotations

from pathlib import Path

import click

from ... import commands


def test_command(experiment) -> click.Command:
    """``bilevel fewshot test SOURCE``: SOURCE is a training run, a weights file or a name in
    the weights manifest; the settings are the trained run's, with only test and episode
    settings open to --set; a run's results go to SOURCE/test by default."""
    from ..config import settings_help

    source_help = "SOURCE: a training run directory, a weights file, or a name in the manifest."

    @click.command(
        "test",
        help=f"{experiment.summary} {source_help}",
        epilog=settings_help(experiment.config, experiment.presets, "the trained run"),
    )
    @click.argument("source", type=click.Path(path_type=Path))
    @click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="a test setting (repeatable), e.g. --set test_episodes=600 --set test_steps=[1,5]",
    )
    @click.option("--device", help="torch device (cpu, cuda, cuda:1)")
    @click.option(
        "--out",
        type=click.Path(path_type=Path),
        help="output directory (default SOURCE/test for a run, runs/fewshot-test-TIME for weights)",
    )
    @click.option("--data-dir", type=click.Path(path_type=Path), help="data sets root")
    @click.option("--quiet", is_flag=True, help="no progress bar and no log on the console")
    @WEIGHTS_DIR
    @commands.OVERWRITE
    def command(source, assignments, device, out, data_dir, quiet, weights_dir, overwrite):
        from ...checkpoints import CheckpointError
        from .. import with_inputs
        from .evaluation import test_overrides
        from .weights import resolve_test_source

        try:
            test_overrides(assignments)
            source, trained, mode = resolve_test_source(source, weights_dir)
        except (ValueError, CheckpointError) as error:
            raise click.UsageError(str(error)) from None
        presets = {"run": trained}
        config = commands.resolve(experiment, "run", None, assignments, None, device, presets)
        runner = with_inputs(experiment, source=source, mode=mode)
        out = out or (source / "test" if source.is_dir() else None)  # None: runs/fewshot-test-*
        if out is not None and Path(out).resolve() == Path(source).resolve():
            raise click.UsageError(f"--out {out} is the trained run: test into another directory")
        commands.run(runner, config, out, data_dir, quiet, overwrite=overwrite)

    return command


WEIGHTS_DIR = click.option(
    "--weights-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("weights"),
    show_default=True,
    help="the folder of weights files and their manifest.json",
)


@click.command("export")
@click.argument("run", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--name", required=True, help="the weights' name: WEIGHTS_DIR/NAME.pt")
@click.option("--hardware", required=True, help="what trained the run, e.g. '1 NVIDIA H200'")
@click.option("--cell", "cells", multiple=True, help="a test cell, e.g. 20w5s (repeatable; "
              "default: the trained cell)")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="the network's tensors in the file")  # fmt: skip
@click.option("--episodes", type=int, default=600, show_default=True, help="per cell")
@click.option("--data-dir", type=click.Path(path_type=Path), help="data sets root")
@WEIGHTS_DIR
@commands.OVERWRITE
def export_command(run, name, hardware, cells, dtype, episodes, data_dir, weights_dir, overwrite):
    """Export RUN's best network to WEIGHTS_DIR/NAME.pt, test the file on 600 seeded episodes
    per cell, and list it with its row in WEIGHTS_DIR/manifest.json."""
    from ...driver import EXPECTED
    from .export import export_run, parse_cell

    try:
        entry = export_run(run, name, hardware, weights_dir, dtype=dtype,
                           cells=[parse_cell(c) for c in cells] or None, episodes=episodes,
                           data_dir=data_dir, overwrite=overwrite, log=click.echo)  # fmt: skip
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    except EXPECTED as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {Path(weights_dir) / entry['file']} ({entry['bytes']} bytes) and its entry")


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
