"""A run's output directory: resolved config, metrics log, summary, plots, progress.

Every file is written whole (to a temporary name, then renamed), so a reader
never sees half a file; metrics.jsonl grows a whole line at a time. An
interrupted run (Ctrl-C) still leaves a valid summary.json whose status says so.

Under torchrun only rank 0 writes: the Run of every other rank is silent and writes nothing
(its methods do nothing, its log goes nowhere), so N processes never write the same files.

The console log goes through tqdm, so a log line never breaks into a progress bar; the final
status line goes to run.log only (the command line prints it once). With ``tensorboard=True``
every metrics line is also written as TensorBoard scalars under ``tensorboard/`` (the optional
``tensorboard`` extra).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from .checkpoints import BEST, CHECKPOINT
from .distributed import env_rank
from .files import atomic_write, write_atomic

__all__ = ["Run", "Scalars", "atomic_write", "clear_run", "previous_run", "save_figure", "to_json"]

RESULTS = ("config.json", "metrics.jsonl", "summary.json", "run.log")  # every run writes these
CHECKPOINTS = (CHECKPOINT, BEST)  # what a run continues from, or is tested from
TENSORBOARD = "tensorboard"  # the directory of a run's TensorBoard event files


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure whole (format from the suffix of ``path``), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        write_atomic(
            path,
            lambda temporary: figure.savefig(
                temporary, format=path.suffix.lstrip(".") or None, dpi=120, bbox_inches="tight"
            ),
        )
    finally:
        plt.close(figure)
    return path


def to_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=_jsonable) + "\n"


def _jsonable(value):
    if hasattr(value, "tolist"):  # tensors and numpy values
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class Run:
    """The output directory of one experiment run.

    Args:
        out: the directory (created).
        config: the resolved configuration, written to config.json.
        quiet: no progress bar and no log on the console.
        writes: whether this process writes (default: rank 0 of torchrun's environment).
        tensorboard: also write every metrics line as TensorBoard scalars.
    """

    def __init__(
        self,
        out: Path,
        config: dict,
        *,
        quiet: bool = False,
        writes: bool | None = None,
        tensorboard: bool = False,
    ):
        self.out = Path(out)
        self.started = time.time()
        self.summary: dict = {"status": "running"}
        self.writes = env_rank() == 0 if writes is None else writes
        self._scalars = None
        if not self.writes:  # another rank of a torchrun job: rank 0 writes
            self.quiet, self._metrics = True, None
            self.log = _silent_logger()
            return
        _check_writable(self.out)
        self.quiet = quiet
        self._metrics = open(self.out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        if tensorboard:  # rewritten from the lines, as metrics.jsonl is
            self._scalars = Scalars(self.out / TENSORBOARD)
        self.log = _file_logger(self.out / "run.log", quiet)
        self.log.info("start: %s", config.get("experiment", "run"))
        atomic_write(self.out / "config.json", to_json(config))

    def metrics(self, **values) -> None:
        """Append one line to metrics.jsonl (one write call per line, flushed), and its numbers
        to TensorBoard when enabled."""
        if not self.writes:
            return
        self._metrics.write(json.dumps(values, default=_jsonable) + "\n")
        self._metrics.flush()
        if self._scalars is not None:
            self._scalars.add(values)

    def update(self, **values) -> None:
        """Record final numbers as they become known, so an interruption keeps them."""
        self.summary.update(values)
        self._write_summary()

    def _write_summary(self) -> None:
        if not self.writes:
            return
        self.summary["wall_seconds"] = round(time.time() - self.started, 3)
        atomic_write(self.out / "summary.json", to_json(self.summary))

    def plot(self, figure, name: str) -> Path:
        """Save a matplotlib figure as PNG, whole, and close it."""
        import matplotlib.pyplot as plt

        path = self.out / f"{name}.png"
        if not self.writes:
            plt.close(figure)
            return path
        return save_figure(figure, path)

    def save(self, obj, name: str) -> Path:
        """torch.save `obj` to `name` in the run directory, whole."""
        if not self.writes:
            return self.out / name
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        atomic_write(self.out / name, buffer.getvalue())
        return self.out / name

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str = ""):
        """A live progress bar on a terminal; silent in logs, CI and pipes."""
        disable = self.quiet or not sys.stderr.isatty()
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            disable=disable,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the final status (and, for a failed run, its error message), and close."""
        self.summary["status"] = status
        if error is not None:
            self.summary["error"] = error
        self._write_summary()
        if not self.writes:
            return
        self._metrics.close()
        if self._scalars is not None:
            self._scalars.close()
        why = "" if error is None else f"{error}; "
        # run.log only: the command line prints the outcome once, --quiet or not
        self.log.info("%s: %sresults in %s", status, why, self.out, extra={FILE_ONLY: True})
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)


def previous_run(out: Path) -> str | None:
    """What a new run in ``out`` would destroy: a run there that completed or left a checkpoint
    (None when there is none, or only the files of a run stopped before its first checkpoint)."""
    out = Path(out)
    checkpointed = any((out / name).is_file() for name in CHECKPOINTS)
    status = _status(out)
    if status != "completed" and not checkpointed:
        return None
    return f"a{'n' if status[0] in 'aeiou' else ''} {status} run" + (
        " with its checkpoint" if checkpointed else ""
    )


def clear_run(out: Path) -> None:
    """Delete the files of an earlier run in ``out`` (its results, log, checkpoints and
    TensorBoard events), so that a new run neither mixes with it nor resumes it; other files are
    left alone."""
    for name in (*RESULTS, *CHECKPOINTS):
        (Path(out) / name).unlink(missing_ok=True)
    _remove_events(Path(out) / TENSORBOARD)


def _status(out: Path) -> str:
    """The status in ``out``'s summary.json ("unfinished" when absent or unreadable)."""
    try:
        status = json.loads((out / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unfinished"
    return status if isinstance(status, str) and status else "unfinished"


def _silent_logger() -> logging.Logger:
    logger = logging.getLogger("bilevel.run.silent")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"--out {out}: cannot write there ({error.strerror})") from error


FILE_ONLY = "file_only"  # a record with this attribute set goes to run.log, not the console


class _Console(logging.Handler):
    """The console: each record written through tqdm, which lifts a progress bar off its line
    and redraws it below, so a log line never lands in the middle of a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, FILE_ONLY, False):
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's own policy: report, never raise)
            self.handleError(record)


def _file_logger(path: Path, quiet: bool) -> logging.Logger:
    logger = logging.getLogger(f"bilevel.run.{path.parent}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    # appended: a resumed run keeps the log of its earlier starts
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)
    if not quiet:
        console = _Console()
        console.setFormatter(formatter)
        logger.addHandler(console)
    return logger


class Scalars:
    """TensorBoard scalars of a run's metrics lines (rank 0; the ``tensorboard`` extra).

    A line's text values name its series (``{"run": "R=300", "outer_loss": 0.3}`` gives the tag
    ``R=300/outer_loss``), its numbers are the scalars, and its ``iteration`` is the step (else
    the line's place in its series). Event files of an earlier start are deleted first: the run
    writes every line again, as it rewrites metrics.jsonl when it resumes.
    """

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        _remove_events(directory)
        self.writer = SummaryWriter(str(directory))
        self.counts: Counter = Counter()

    def add(self, line: dict) -> None:
        series = "/".join(v for v in line.values() if isinstance(v, str))
        self.counts[series] += 1
        step = line.get("iteration", self.counts[series])
        for key, value in line.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and key != "iteration" and math.isfinite(value):
                self.writer.add_scalar(f"{series}/{key}" if series else key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _remove_events(directory: Path) -> None:
    for events in directory.glob("events.out.tfevents.*"):
        events.unlink(missing_ok=True)
