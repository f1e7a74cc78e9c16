"""Long experiments as independent stages on the driver, spread over torchrun's ranks.

A hyperparameter-optimisation experiment is a list of stages (a radius of hyper-cleaning, a
horizon T of the convergence study, a mode of ``hparams``), each a deterministic function of
the config and the data that returns a result. :meth:`Stages.map` runs them:

- One process: in order. Inside a stage, the driver's loop (``Stage.loop``) checkpoints the
  hyper-optimiser's state every ``checkpoint_every`` hyper-iterations, and after each stage its
  result is checkpointed; a run killed at any moment and resumed (``--resume``,
  ``BILEVEL_RESUME=auto`` or a torchrun restart) skips the finished stages and continues the
  unfinished one from its last checkpoint, with the numbers of the uninterrupted run.
- N processes (torchrun): the stages are dealt out, rank r taking stages r, r + N, ...; after
  each round the results and metrics lines are gathered to every rank, and rank 0 writes them
  and the checkpoint (stage granularity: a rank's unfinished stage restarts from its beginning).
  Each stage computes what it would alone, so the results are those of one process.

Checkpoints are the driver's (atomic, sha256-verified), bound to the experiment and every
setting that changes its numbers. A stage that fails (divergence, bad data) stops the run with
one line naming the stage and what the checkpoint keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bilevel import BilevelError

from ..checkpoints import CHECKPOINT
from ..driver import Driver, Position, RunStopped
from .config import ExperimentConfig

UNHASHED = ("device", "checkpoint_every")  # settings that change no number


def identity(experiment: str, config: ExperimentConfig) -> dict:
    """What a checkpoint is bound to: the experiment and the settings behind its numbers."""
    settings = {k: v for k, v in config.model_dump().items() if k not in UNHASHED}
    return {"experiment": experiment, **settings}


def plural(count: int, noun: str) -> str:
    """'1 stage', '2 stages'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class HyperSteps:
    """A stage's hyper-optimiser (bilevel.HyperOptimizer) as the driver's steppable.

    A step is one hyper-iteration; ``line(metrics)`` makes its metrics line from the
    optimiser's metrics, and ``shown`` names the numbers of the line the progress bar shows.
    ``extra`` is any further object the stage needs to continue (``state_dict`` and
    ``load_state_dict``), or None. An error of a type in ``tolerate`` ends the stage's loop
    early, its ``status`` saying at which ``unit`` (a mode that diverged), instead of the run.
    """

    def __init__(
        self, loop, line, shown=("outer_loss",), extra=None, tolerate=(), unit="hyper-iteration"
    ):
        self.loop, self.line, self.shown, self.extra = loop, line, shown, extra
        self.tolerate, self.unit = tuple(tolerate), unit
        self.last: dict = {}
        self.status: str | None = None  # why it stopped early

    def step(self) -> dict | None:
        try:
            metrics = self.loop.step()
        except self.tolerate as error:
            self.status = f"diverged at {self.unit} {len(self.loop.history) + 1}: {error}"
            return None
        self.last = self.line(metrics)
        return self.last

    def stop_reason(self) -> str | None:
        return self.status

    def bar(self) -> dict[str, float]:
        return {key: self.last[key] for key in self.shown if key in self.last}

    def state_dict(self) -> dict:
        extra = None if self.extra is None else self.extra.state_dict()
        return {"loop": self.loop.state_dict(), "extra": extra}

    def load_state_dict(self, state: dict) -> None:
        self.loop.load_state_dict(state["loop"])
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])


@dataclass
class Stage:
    """What a stage's work function gets: its name, its loop on the driver, a metrics sink."""

    name: str
    stages: Stages
    saved: dict | None = None  # this stage's unfinished state, when resuming
    lines: list[dict] = field(default_factory=list)

    def loop(self, task, total: int, unit: str = "hyper-iteration") -> Position:
        """Run ``task`` (a steppable) for ``total`` steps on the driver, continued from this
        stage's checkpoint if it was interrupted; checkpoints every ``checkpoint_every`` steps
        with one process (with several, a stage restarts from its beginning)."""
        driver, saved = self.stages.driver, self.saved
        position = Position(lines=self.lines)
        if saved is not None:
            state = {"loop": saved["loop"], "extra": saved["extra"]}
            position = Position(saved["iteration"], list(saved["lines"]), state)
        alone = driver.group.size > 1
        driver.loop(
            task,
            total,
            name=self.name,
            unit=unit,
            start=position,
            save=None if alone else self._save,
            checkpoint_every=driver.config.checkpoint_every,
            shared=not alone,
        )
        self.lines = position.lines
        return position

    def metrics(self, **line) -> None:
        """One metrics line outside a loop (written now with one process, after the round
        with N)."""
        self.lines.append(line)
        if self.stages.driver.group.size == 1:
            self.stages.driver.metrics(**line)

    def _save(self, position: Position) -> None:
        current = {"name": self.name, "iteration": position.step, **position.state}
        self.stages.save({**current, "lines": list(position.lines)})


class Stages:
    """The stages of one run on ``driver`` (see the module docstring), continued from the
    driver's resumed checkpoint; the metrics lines of the resumed part are written again."""

    def __init__(self, driver: Driver):
        self.driver, self.group = driver, driver.group
        self.finished: dict[str, dict] = {}  # name -> result, lines
        self.current: dict | None = None  # the unfinished stage of a resumed run
        resume = driver.resume
        if resume is not None:
            self.finished, self.current = dict(resume["finished"]), resume["current"]
            for item in self.finished.values():
                driver.rewrite(item["lines"])
            if self.group.size == 1:  # (with several, the stage's lines come back with it)
                driver.rewrite((self.current or {}).get("lines", []))
            driver.kept = f"{CHECKPOINT} keeps {self._kept()}"
            at = self.current
            driver.log.info(
                "resumed: %s finished%s",
                plural(len(self.finished), "stage"),
                f", {at['name']} at {at['iteration']}" if at else "",
            )
        if self.group.size > 1:
            driver.log.info("stages dealt out to the %d processes", self.group.size)

    def map(
        self,
        names: Iterable[str],
        work: Callable[[str, Stage], object],
        on_result: Callable[[str, object], None] | None = None,
    ) -> dict[str, object]:
        """``work(name, stage)`` for every name, in order of names (results gathered to every
        rank); ``on_result(name, result)`` as each becomes known, on every rank."""
        names = list(names)
        pending = [n for n in names if n not in self.finished]
        for name in names:
            if name in self.finished and on_result is not None:
                on_result(name, self.finished[name]["result"])
        size = self.group.size
        for start in range(0, len(pending), size):
            batch = pending[start : start + size]
            mine = batch[self.group.rank] if self.group.rank < len(batch) else None
            outcome = self._compute(mine, work) if mine is not None else None
            for name, item in zip(batch, self._gather(outcome)):
                if item["name"] != name:
                    raise RunStopped(f"the ranks disagree on the stages: {item['name']} for {name}")
                if size > 1:
                    self.driver.rewrite(item["lines"])
                self.finished[name] = item
                if on_result is not None:
                    on_result(name, item["result"])
            self.save(None)
        return {name: self.finished[name]["result"] for name in names}

    def _compute(self, name: str, work) -> dict:
        saved = self.current if self.current and self.current["name"] == name else None
        stage = Stage(name, self, saved)
        try:
            result = work(name, stage)
        except BilevelError as error:  # divergence, bad data: stop, keeping the checkpoint
            line = self.driver.stop_line(name, error)
            if self.group.size == 1:
                raise self.driver.fail(line, f"error in {name}") from None
            return {"name": name, "error": line}
        except Exception as error:  # a bug: with several ranks, every rank must still stop
            if self.group.size == 1:
                raise
            return {"name": name, "error": f"{name}: {type(error).__name__}: {error}"}
        return {"name": name, "result": _to_cpu(result), "lines": stage.lines}

    def _kept(self) -> str:
        if self.current is not None:
            return f"{self.current['name']} at hyper-iteration {self.current['iteration']}"
        return f"the stages finished before: {', '.join(self.finished)}"

    def _gather(self, outcome: dict | None) -> list[dict]:
        if self.group.size == 1:
            outcomes = [outcome]
        else:
            outcomes = [None] * self.group.size
            dist.all_gather_object(outcomes, outcome)
        failed = [(r, o) for r, o in enumerate(outcomes) if o and "error" in o]
        if failed:
            rank, item = failed[0]
            line = item["error"] if self.group.size == 1 else f"on rank {rank}: {item['error']}"
            raise self.driver.fail(line, f"error in {item['name']}")
        return [o for o in outcomes if o is not None]

    def save(self, current: dict | None) -> None:
        """Write the checkpoint: the finished stages, and the unfinished one's state."""
        self.current = current
        state = {"finished": self.finished, "current": current}
        self.driver.checkpoint(state, kept=self._kept())


def _to_cpu(value):
    """The value with every tensor detached and on the CPU (checkpoints and gathers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
