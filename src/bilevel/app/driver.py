"""The driver of every run of the application: one loop, and what a long run needs around it.

An experiment hands the driver something that steps (a :class:`Steppable`: ``step()``,
``state_dict()`` and ``load_state_dict()``, with optional hooks) and the driver owns the rest:

- the run's output directory: the driver is the run's :class:`~bilevel.app.runs.Run`
  (config.json, metrics.jsonl, summary.json, run.log, plots, TensorBoard scalars), written by
  rank 0 alone under torchrun;
- the process group of torchrun's processes (:mod:`bilevel.app.distributed`), closed at the end;
- checkpoints: named, bound to the run's identity (the settings behind its numbers), written
  whole by rank 0 (:mod:`bilevel.app.checkpoints`), read and verified before anything of the
  run is opened (:func:`read`), and continued from (``--resume``, ``BILEVEL_RESUME=auto``, a
  torchrun restart);
- the loop (:meth:`Driver.loop`): the progress bar, each step under recorded warnings, metrics
  lines, evaluations, periodic checkpoints, stop requests (SIGINT or SIGTERM: the step in flight
  finishes, a checkpoint is written, the run stops as interrupted; a second SIGINT stops at
  once), early stops the steppable asks for, and divergence stops (the reason in summary.json
  and run.log, one line that says what the checkpoint on disk keeps);
- the summary: what the steppable reports, why its loop stopped, and the run's final status.

Staged experiments (:mod:`bilevel.app.experiments.stages`) run one loop per stage; the few-shot
trainer runs one loop.
"""

from __future__ import annotations

import math
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bilevel import BilevelError

from . import checkpoints, distributed
from .checkpoints import CHECKPOINT, CheckpointError
from .files import remove_partial_writes
from .runs import Run

__all__ = [
    "EXPECTED",
    "Diverged",
    "Driver",
    "MovingAverage",
    "Position",
    "RunStopped",
    "Steppable",
    "describe",
    "execute",
    "read",
]

# Failures the command line reports in one line (exit 1), by their message: a BilevelError
# (divergence, bad data, a checkpoint that cannot be used), an output path that cannot be written.
EXPECTED = (BilevelError, PermissionError)


class Steppable(Protocol):
    """What the driver runs: one step at a time, its state saved and restored whole.

    Optional hooks, used when present (as Betty's Engine looks for ``validation``):

    - ``evaluate() -> dict | None``: every ``evaluate_every`` steps (a validation); its metrics
      line. A checkpoint follows each evaluation.
    - ``stop_reason() -> str | None``: a reason to stop before the budget (no improvement for
      a while; a hyper-optimiser that diverged, when that ends a mode rather than the run).
    - ``bar() -> dict[str, float]``: the numbers the progress bar shows.
    - ``summary() -> dict``: what summary.json reports of it, after each evaluation and when
      the loop ends (with ``stopped``: why the loop ended, None if it may continue).

    ``step`` and ``evaluate`` raise :class:`Diverged` (on every rank together) for a non-finite
    loss or gradient; ``state_dict`` raises it rather than return non-finite weights.
    """

    def step(self) -> dict | None:
        """One step; returns its metrics line, or None for no line."""

    def state_dict(self) -> dict:
        """Everything the next step depends on."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output."""


class Diverged(Exception):
    """A non-finite loss, gradient or weight in this step: the loop stops the run."""


class RunStopped(BilevelError):
    """A run stopped by an error: one line naming where, what, and what the checkpoint keeps."""


@dataclass
class Position:
    """Where a loop stands: the steps done, the metrics lines so far, and the steppable's state
    (None before the first checkpoint). :meth:`Driver.loop` advances it in place."""

    step: int = 0
    lines: list[dict] = field(default_factory=list)
    state: dict | None = None


class MovingAverage:
    """A bias-corrected exponential moving average (as Adam corrects its moments): its first
    value is the first number, not ``(1 - beta)`` times it. For progress bars."""

    def __init__(self, beta: float = 0.98):
        self.beta, self.average, self.count = beta, 0.0, 0

    def add(self, value: float) -> float:
        """Add ``value``; returns the corrected average."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        return self.average / (1 - self.beta**self.count) if self.count else math.nan


def read(out: Path, identity: dict, upgrade: Callable | None = None, older=()) -> dict:
    """``out``'s checkpoint, verified against ``identity`` (or one of the ``older`` identities
    an earlier version bound the same settings to): read before any file of the run is opened,
    so that one that cannot be used leaves the run as it was. ``upgrade(state, out)`` turns an
    older layout into this version's. Raises CheckpointError (naming what differs from
    ``identity``)."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume: no {CHECKPOINT} in {out}")
    try:
        state = checkpoints.load(path, identity)
    except CheckpointError as error:
        state = _load_any(path, older, error)
    return state if upgrade is None else upgrade(state, Path(out))


def _load_any(path: Path, identities, error: CheckpointError) -> dict:
    for identity in identities:
        try:
            return checkpoints.load(path, identity)
        except CheckpointError:
            continue
    raise error


class Driver(Run):
    """One run: its output directory (a Run), process group, checkpoints, stop requests and
    loops. A context manager: signal handlers are installed on entry, and the handlers and the
    process group released on exit.

    Args:
        out, resolved, quiet, tensorboard: as for :class:`~bilevel.app.runs.Run` (``resolved``
            is what config.json holds).
        config: the validated ExperimentConfig; ``self.config`` is it on this rank's device.
        identity: what the run's checkpoints are bound to (None: the run writes none).
        resume: the checkpoint to continue from (:func:`read`); rank 0's is every rank's.
    """

    def __init__(
        self,
        out: Path,
        resolved: dict,
        config,
        *,
        identity: dict | None = None,
        resume: dict | None = None,
        quiet: bool = False,
        tensorboard: bool = False,
    ):
        self.group = distributed.init(config.device)  # first: who writes
        try:
            super().__init__(
                out, resolved, quiet=quiet, writes=self.group.main, tensorboard=tensorboard
            )
            if self.writes:
                remove_partial_writes(self.out)
            self.resume = self.group.broadcast(resume)  # every rank starts from the same
        except BaseException:
            self.group.close()
            raise
        self.config = config.model_copy(update={"device": self.group.device})
        self.identity = identity
        self.kept = f"no {CHECKPOINT} was written"  # what the checkpoint on disk holds
        self.stopped_by: str | None = None  # the reason of a stop by error
        self._stop = threading.Event()
        self._deferring = False  # inside a loop: a stop request waits for the step to finish
        self._previous_handlers: dict = {}
        self._warnings: Counter = Counter()
        if self.group.size > 1:
            self.log.info("%d processes (%s); rank 0 writes", self.group.size, self.group.device)

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> Driver:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[number] = signal.signal(number, self._request_stop)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}
        self.group.close()

    def _request_stop(self, signum, frame) -> None:
        """SIGINT/SIGTERM: inside a loop, stop after the step in flight (a second SIGINT: at
        once); outside one, at once (KeyboardInterrupt: the run ends as interrupted)."""
        if self._deferring and not (self._stop.is_set() and signum == signal.SIGINT):
            self._stop.set()
            return
        raise KeyboardInterrupt

    # -- checkpoints and stops --------------------------------------------------------------
    def checkpoint(self, payload: dict, kept: str | None = None, name: str = CHECKPOINT) -> None:
        """Write checkpoint ``name`` whole (rank 0), bound to the run's identity. ``kept`` says
        what checkpoint.pt now holds ("iteration 8"), for the line of a later stop."""
        if self.identity is None:
            raise RuntimeError("this run has no identity: it writes no checkpoints")
        if self.writes:
            checkpoints.save(self.out / name, payload, self.identity)
        if name == CHECKPOINT and kept is not None:
            self.kept = f"{CHECKPOINT} keeps {kept}"

    def stop_line(self, where: str, error) -> str:
        """The one line of a stop: where, what, and what the checkpoint keeps."""
        return f"{where}: {error}; stopped ({self.kept})"

    def fail(self, line: str, reason: str) -> RunStopped:
        """Record a stop by error: ``reason`` is summary.json's ``stopped`` and ``line`` (see
        :meth:`stop_line`) the error to raise, which run.log and summary.json keep too."""
        self.stopped_by = reason
        self.update(stopped=reason)
        return RunStopped(line)

    def rewrite(self, lines: list[dict]) -> None:
        """Write the metrics lines of a resumed part again (each start rewrites metrics.jsonl)."""
        for line in lines:
            self.metrics(**line)

    # -- the loop ---------------------------------------------------------------------------
    def loop(
        self,
        task: Steppable,
        total: int,
        *,
        name: str,
        unit: str = "step",
        start: Position | None = None,
        save: Callable[[Position], None] | None = None,
        checkpoint_every: int | None = None,
        evaluate_every: int | None = None,
        shared: bool = True,
    ) -> Position:
        """Run ``task`` until ``total`` steps are done or it asks to stop; returns the position.

        Args:
            task: the steppable (see :class:`Steppable` for its optional hooks).
            total: the budget of steps.
            name, unit: for the progress bar and the log ("bilevel", "iteration").
            start: the position to continue from (its state is loaded into ``task``); it is
                advanced in place, so the caller sees how far a loop that raised got.
            save: writes a checkpoint of a position (its ``state`` filled in), every
                ``checkpoint_every`` steps, after each evaluation, on a stop request and at the
                end; None: the loop writes none.
            evaluate_every: steps between calls of ``task.evaluate()``.
            shared: every rank runs this loop together (they agree on stop requests and the
                step to start from, and rank 0 writes the lines); False: this rank runs it alone
                (a stage dealt to it), and its lines are returned, not written.
        """
        position = start if start is not None else Position()
        hooks = _Hooks(task)
        together = shared or self.group.size == 1
        if position.state is not None:
            task.load_state_dict(position.state)
            self.log.info("%s: resumed at %s %d", name, unit, position.step)
        if together:
            self.group.agree(position.step, f"the {unit} to start from")
        saved_at = position.step if position.state is not None else None
        bar = self.progress(total=total, desc=name)
        bar.update(position.step)
        self._deferring = True
        try:
            while position.step < total and hooks.stop_reason() is None:
                line = self._guarded(task.step, name, f"diverged at {unit} {position.step + 1}")
                position.step += 1
                self._record(position, line, together)
                bar.update()
                bar.set_postfix(hooks.bar(), refresh=False)
                due = bool(checkpoint_every) and position.step % checkpoint_every == 0
                if evaluate_every and position.step % evaluate_every == 0:
                    line = self._guarded(task.evaluate, name, f"diverged at {unit} {position.step}")
                    self._record(position, line, together)
                    self._summarise(hooks, position, total)
                    due = True
                stopping = self._stop.is_set()
                if together:
                    stopping = self.group.any(stopping)
                if save is not None and (due or stopping):
                    saved_at = self._save(save, task, position, unit)
                if stopping:
                    raise KeyboardInterrupt
            if save is not None and saved_at != position.step:
                self._save(save, task, position, unit)
            reason = hooks.stop_reason()
            if reason is not None:
                self.log.info("%s: stopped: %s", name, reason)
        finally:
            self._deferring = False
            bar.close()
            self._count_warnings(name)
            self._summarise(hooks, position, total)
        return position

    def _guarded(self, call: Callable, name: str, where: str):
        """``call()`` with its warnings recorded in run.log (the first of each kind in each
        loop; the rest counted) and a divergence turned into the run's stop."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return call()
            except Diverged as error:
                raise self.fail(self.stop_line(where, error), where) from None
            finally:
                for warning in caught:
                    self._warned(name, warning)

    def _warned(self, name: str, warning: warnings.WarningMessage) -> None:
        kind = warning.category.__name__
        self._warnings[name, kind] += 1
        if self._warnings[name, kind] == 1:
            self.log.warning("%s: %s: %s", name, kind, warning.message)

    def _count_warnings(self, name: str) -> None:
        for loop, kind in [key for key in self._warnings if key[0] == name]:
            count = self._warnings.pop((loop, kind))
            if count > 1:
                self.log.info("%s: %d %ss in all", name, count, kind)

    def _record(self, position: Position, line: dict | None, write: bool) -> None:
        if line is None:
            return
        position.lines.append(line)
        if write:
            self.metrics(**line)

    def _save(self, save: Callable, task: Steppable, position: Position, unit: str) -> int:
        try:
            position.state = task.state_dict()
        except Diverged as error:
            where = f"diverged at {unit} {position.step}"
            raise self.fail(self.stop_line(where, error), where) from None
        save(position)
        return position.step

    def _summarise(self, hooks: _Hooks, position: Position, total: int) -> None:
        summary = hooks.summary()
        if summary is None:
            return
        stopped = self.stopped_by or hooks.stop_reason()
        if stopped is None and position.step >= total:
            stopped = "budget"
        self.update(**summary, stopped=stopped)  # None: interrupted, it may continue


class _Hooks:
    """A steppable's optional hooks, each with what its absence means."""

    def __init__(self, task: Steppable):
        self.task = task

    def _call(self, name: str, default):
        hook = getattr(self.task, name, None)
        return default if hook is None else hook()

    def stop_reason(self) -> str | None:
        return self._call("stop_reason", None)

    def bar(self) -> dict[str, str]:
        return {key: f"{value:.4g}" for key, value in self._call("bar", {}).items()}

    def summary(self) -> dict | None:
        return self._call("summary", None)


def describe(error: BaseException) -> str:
    """An error as the command line reports it: an expected failure by its message, anything
    else by its type and message."""
    if isinstance(error, EXPECTED):
        return str(error)
    return f"{type(error).__name__}: {error}"


def execute(
    experiment,
    config,
    out: Path,
    data_dir: Path | None,
    quiet: bool = False,
    *,
    resume: dict | None = None,
    tensorboard: bool = False,
) -> str:
    """Run ``experiment`` (bilevel.app.experiments.Experiment) into ``out``; returns its final
    status.

    Ctrl-C (or SIGTERM) leaves a valid partial result (status "interrupted"); an error leaves
    status "failed", its message in summary.json ("error") and run.log, and propagates. Nothing
    claims success unless the run completed.
    """
    from bilevel import __version__

    resolved = {
        "experiment": experiment.name,
        "version": __version__,
        "data_dir": None if data_dir is None else str(data_dir),
        "config": config.model_dump(),
    }
    identity = None if experiment.identity is None else experiment.identity(config)
    with Driver(
        out,
        resolved,
        config,
        identity=identity,
        resume=resume,
        quiet=quiet,
        tensorboard=tensorboard,
    ) as driver:
        try:
            experiment.run(driver.config, driver, data_dir)
        except KeyboardInterrupt:
            driver.finish("interrupted")
            return "interrupted"
        except BaseException as error:
            driver.finish("failed", error=describe(error))
            raise
        driver.finish("completed")
        return "completed"
