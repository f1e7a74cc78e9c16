"""Long experiments as independent stages: resumable after a kill, spread over torchrun's ranks.

A hyperparameter-optimisation experiment is a list of stages (a radius of hyper-cleaning, a
horizon T of the convergence study, a mode of ``hparams``), each a deterministic function of
the config and the data that returns a result. ``Session.map`` runs them:

- One process: in order. Inside a stage, the hyper-optimiser's state is checkpointed every
  ``checkpoint_every`` hyper-iterations (``Stage.restore`` / ``Stage.done``), and after each
  stage its result; a run killed at any moment and resumed (``--resume``, ``BILEVEL_RESUME=auto``
  or a torchrun restart) skips the finished stages and continues the unfinished one from its
  last checkpoint, with the numbers of the uninterrupted run.
- N processes (torchrun): the stages are dealt out, rank r taking stages r, r + N, ...; after
  each round the results and metrics lines are gathered to every rank, and rank 0 writes them
  and the checkpoint (stage granularity: a rank's unfinished stage restarts from its beginning).
  Each stage computes what it would alone, so the results are those of one process.

Checkpoints are ``bilevel.app.checkpoints`` files (atomic, sha256-verified), bound to the
experiment and every setting that changes its numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from bilevel import BilevelError

from .. import checkpoints, distributed
from ..runs import remove_partial_writes
from .config import ExperimentConfig

CHECKPOINT = "checkpoint.pt"
UNHASHED = ("device", "checkpoint_every")  # settings that change no number


class StageError(BilevelError):
    """A stage that failed on some rank (all ranks stop with its message)."""


def identity(experiment: str, config: ExperimentConfig) -> dict:
    """What a checkpoint is bound to: the experiment and the settings behind its numbers."""
    settings = {k: v for k, v in config.model_dump().items() if k not in UNHASHED}
    return {"experiment": experiment, **settings}


def prepare_resume(experiment: str, config: ExperimentConfig, out: Path) -> dict:
    """``out``'s checkpoint, verified, read before anything in ``out`` is overwritten."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise checkpoints.CheckpointError(f"--resume: no {CHECKPOINT} in {out}")
    return checkpoints.load(path, identity(experiment, config))


@dataclass
class Stage:
    """What a stage's work function gets: its name, a metrics sink and loop checkpoints."""

    name: str
    session: Session
    saved: dict | None = None  # this stage's unfinished state, when resuming
    lines: list[dict] = field(default_factory=list)

    def metrics(self, **line) -> None:
        """One metrics.jsonl line (written now with one process, after the round with N)."""
        self.lines.append(line)
        if self.session.group.size == 1:
            self.session.run.metrics(**line)

    def restore(self, loop) -> tuple[int, object]:
        """Load the loop's checkpointed state, if this stage was interrupted; returns the
        hyper-iterations done and the ``extra`` saved with them (0 and None otherwise)."""
        if self.saved is None:
            return 0, None
        loop.load_state_dict(self.saved["loop"])
        self.lines = list(self.saved["lines"])  # already rewritten to metrics.jsonl
        return self.saved["iteration"], self.saved["extra"]

    def done(self, loop, iteration: int, of: int, extra=None) -> None:
        """Call after hyper-iteration ``iteration`` of ``of``: checkpoints every
        ``checkpoint_every`` (one process; ``extra`` is any further state the stage needs to
        continue). Not after the last: the stage's result is checkpointed when it returns."""
        session = self.session
        every = session.config.checkpoint_every
        if session.group.size == 1 and iteration % every == 0 and iteration < of:
            current = {
                "name": self.name,
                "iteration": iteration,
                "loop": loop.state_dict(),
                "extra": extra,
                "lines": list(self.lines),
            }
            session.save(current)


@dataclass
class Session:
    """One run of an experiment's stages (see the module docstring)."""

    experiment: str
    config: ExperimentConfig
    run: object  # bilevel.app.runs.Run
    group: distributed.Group
    finished: dict[str, dict] = field(default_factory=dict)  # name -> result, lines
    current: dict | None = None  # the unfinished stage of a resumed run

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
                    raise StageError(f"the ranks disagree on the stages: {item['name']} for {name}")
                if size > 1:
                    for line in item["lines"]:
                        self.run.metrics(**line)
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
            message = f"{name}: {error}; stopped ({CHECKPOINT} {self._kept()})"
            if self.group.size == 1:
                raise StageError(message) from None
            return {"name": name, "error": message}
        except Exception as error:  # a bug: with several ranks, every rank must still stop
            if self.group.size == 1:
                raise
            return {"name": name, "error": f"{name}: {type(error).__name__}: {error}"}
        return {"name": name, "result": _to_cpu(result), "lines": stage.lines}

    def _kept(self) -> str:
        if self.current is not None:
            return f"keeps {self.current['name']} at hyper-iteration {self.current['iteration']}"
        if self.finished:
            return f"keeps the stages finished before: {', '.join(self.finished)}"
        return "was not written"

    def _gather(self, outcome: dict | None) -> list[dict]:
        if self.group.size == 1:
            outcomes = [outcome]
        else:
            outcomes = [None] * self.group.size
            dist.all_gather_object(outcomes, outcome)
        failed = [(r, o["error"]) for r, o in enumerate(outcomes) if o and "error" in o]
        if failed:
            rank, message = failed[0]
            raise StageError(message if self.group.size == 1 else f"on rank {rank}: {message}")
        return [o for o in outcomes if o is not None]

    def save(self, current: dict | None) -> None:
        """Write the checkpoint: the finished stages, and the unfinished one's state."""
        self.current = current
        if self.group.main:
            state = {"finished": self.finished, "current": current}
            path = self.run.out / CHECKPOINT
            checkpoints.save(path, state, identity(self.experiment, self.config))


@contextmanager
def session(
    experiment: str, config: ExperimentConfig, run, resume: dict | None
) -> Iterator[Session]:
    """The stages' session of a run: its process group (torchrun) and the resumed state, with
    the metrics lines of the resumed part written back to metrics.jsonl. ``resume`` is the
    checkpoint read before the run's files were opened (--resume, or ``BILEVEL_RESUME=auto``
    and torchrun restarts: bilevel.app.cli); rank 0's is the one every rank starts from."""
    group = distributed.init(config.device)
    try:
        if group.main:
            remove_partial_writes(run.out)
        resume = group.broadcast(resume)  # what rank 0 read: every rank starts from the same
        config = config.model_copy(update={"device": group.device})
        state = Session(experiment, config, run, group)
        if resume is not None:
            state.finished, state.current = dict(resume["finished"]), resume["current"]
            for item in state.finished.values():
                for line in item["lines"]:
                    run.metrics(**line)
            if group.size == 1:  # (with several, the stage's lines come back with its result)
                for line in (state.current or {}).get("lines", []):
                    run.metrics(**line)
            run.log.info(
                "resumed: %d stages finished%s",
                len(state.finished),
                f", {state.current['name']} at {state.current['iteration']}"
                if state.current
                else "",
            )
        if group.size > 1:
            run.log.info("%d processes (%s): stages dealt out to them", group.size, group.device)
        yield state
    finally:
        group.close()


def _to_cpu(value):
    """The value with every tensor detached and on the CPU (checkpoints and gathers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
