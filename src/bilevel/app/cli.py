"""The `bilevel` command line: thin; a subcommand parses, validates and calls the library."""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

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
    import inspect

    from bilevel import METHODS

    for name, function in METHODS.items():
        options = [
            f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        summary = (function.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:18s} {summary}\n{'':18s} options: {', '.join(options) or 'none'}")


_OVERWRITE = click.option(
    "--overwrite",
    is_flag=True,
    help="replace the run already in --out (its results, log and checkpoints are deleted first)",
)


def _experiment_options(presets):
    """The options every experiment command takes (one decorator for all of them)."""
    options = [
        click.option(
            "--preset",
            type=click.Choice(sorted(presets)),
            help="paper: the paper's setting; quick: minutes on 2 CPU cores",
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


def _resolve(experiment, preset, config_path, assignments, seed, device, presets=None):
    """The validated config, or a one-line usage error (exit 2)."""
    from .experiments.config import ConfigError, resolve

    try:
        return resolve(
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


def _execute(
    experiment, config, out, data_dir, quiet, *, resuming=False, overwrite=False, resumable=True
):
    """Run into `out`; expected failures are one line (exit 1), Ctrl-C exits 130. A new run
    (not ``resuming``) does not replace a run already in `out` unless ``overwrite``; the refusal
    offers --resume where the command has it (``resumable``)."""
    from .distributed import env_rank
    from .experiments import EXPECTED, execute

    out = out or Path("runs") / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not resuming and env_rank() == 0:  # under torchrun, rank 0 writes: it alone checks
        _claim(out, overwrite, resumable)
    try:
        status = execute(experiment, config, out, data_dir, quiet)
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


def _show(config) -> None:
    from .runs import to_json

    click.echo(to_json(config.model_dump()), nl=False)


def _experiment_command(experiment, name: str | None = None, prepare=None) -> click.Command:
    """One subcommand per experiment, all with the same options. ``prepare(config, out)`` reads
    the checkpoint that --resume continues from (default: a staged experiment's)."""

    @click.command(name or experiment.name, help=experiment.summary)
    @_experiment_options(experiment.presets)
    @click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint")
    @_OVERWRITE
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
    ):
        from .checkpoints import restarted
        from .experiments import stages, with_inputs

        config = _resolve(experiment, preset, config_path, assignments, seed, device)
        if show_config:
            _show(config)
            return
        read = prepare or (lambda config, out: stages.prepare_resume(experiment.name, config, out))
        overwrite = overwrite and not restarted()  # the first attempt replaced the old run
        state = _read_checkpoint(resume, overwrite, out, lambda out: read(config, out))
        runner = with_inputs(experiment, resume=state)
        resuming = state is not None
        _execute(runner, config, out, data_dir, quiet, resuming=resuming, overwrite=overwrite)

    return command


def _read_checkpoint(resume: bool, overwrite: bool, out, read):
    """The verified checkpoint of --out, ``read(out)``, that the run continues from: with
    --resume, or with ``BILEVEL_RESUME=auto`` (or a torchrun restart) when there is one. Read
    before any file of the run is opened: a checkpoint that cannot be used is one line (exit 1)
    and leaves the run as it was."""
    from .checkpoints import AUTO_RESUME, CheckpointError, auto_resume
    from .experiments.stages import CHECKPOINT

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
        return read(out)
    except CheckpointError as error:
        if automatic:
            raise click.ClickException(
                f"{error} ({AUTO_RESUME}=auto resumes only the configuration that wrote it: "
                "choose another --out, or add --overwrite to replace the run)"
            ) from None
        raise click.ClickException(str(error)) from None


def _fewshot_test(experiment) -> click.Command:
    source_help = "SOURCE: a training run directory, a weights file, or a name in the manifest."

    @click.command("test", help=f"{experiment.summary} {source_help}")
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
    @_WEIGHTS_DIR
    @_OVERWRITE
    def command(source, assignments, device, out, data_dir, quiet, weights_dir, overwrite):
        from .checkpoints import CheckpointError
        from .experiments import with_inputs
        from .experiments.fewshot import test_overrides
        from .experiments.fewshot.weights import resolve_test_source

        try:
            test_overrides(assignments)
            source, trained, mode = resolve_test_source(source, weights_dir)
        except (ValueError, CheckpointError) as error:
            raise click.UsageError(str(error)) from None
        config = _resolve(experiment, "run", None, assignments, None, device, {"run": trained})
        runner = with_inputs(experiment, source=source, mode=mode)
        out = out or (source / "test" if source.is_dir() else None)  # None: runs/fewshot-test-*
        if Path(out).resolve() == Path(source).resolve():  # --overwrite would delete the network
            raise click.UsageError(f"--out {out} is the trained run: test into another directory")
        _execute(runner, config, out, data_dir, quiet, overwrite=overwrite, resumable=False)

    return command


_WEIGHTS_DIR = click.option(
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
@_WEIGHTS_DIR
@_OVERWRITE
def _fewshot_export(run, name, hardware, cells, dtype, episodes, data_dir, weights_dir, overwrite):
    """Export RUN's best network to WEIGHTS_DIR/NAME.pt, test the file on 600 seeded episodes
    per cell, and list it with its row in WEIGHTS_DIR/manifest.json."""
    from .experiments import EXPECTED
    from .experiments.fewshot.export import export_run, parse_cell

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
def _fewshot_compare(runs, out, labels, title):
    """Plot the meta-validation curves of training RUNS, against iterations and time."""
    from .experiments.fewshot.compare import compare_runs

    try:
        path = compare_runs(list(runs), out, list(labels) or None, title)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"wrote {path}")


def _fewshot_checkpoint(config, out, mode: str):
    from .experiments.fewshot import prepare_resume

    return prepare_resume(config, out, mode)


def _fewshot_group() -> click.Group:
    from .experiments import fewshot

    group = click.Group(
        "fewshot",
        help="Few-shot learning with a hyper-representation (train, classical, test, compare, "
        "export).",
    )
    for name, experiment, mode in (
        ("train", fewshot.TRAIN, "bilevel"),
        ("classical", fewshot.CLASSICAL, "classical"),
    ):
        read = partial(_fewshot_checkpoint, mode=mode)
        group.add_command(_experiment_command(experiment, name, read))
    group.add_command(_fewshot_test(fewshot.TEST))
    group.add_command(_fewshot_compare)
    group.add_command(_fewshot_export)
    return group


def _register_commands() -> None:
    from .bench.cli import bench
    from .bench.stochastic.cli import stochastic_bench
    from .experiments import registry

    main.add_command(bench)
    main.add_command(stochastic_bench)
    for experiment in registry().values():
        main.add_command(_experiment_command(experiment))
    main.add_command(_fewshot_group())


_register_commands()

if __name__ == "__main__":
    main()
