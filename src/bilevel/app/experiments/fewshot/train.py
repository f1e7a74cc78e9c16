"""The training loop of both learners: validation, early stopping, checkpoints, exact resume.

Every ``validate_every`` iterations the network is evaluated on fixed seeded meta-validation
episodes (the test protocol at T = inner_steps); the best one is kept in ``best.pt`` and
training stops after ``patience`` validations without improvement. ``checkpoint.pt`` holds
everything the next iteration depends on (network, optimiser, schedule, sampler and RNG
states, the pending metrics window and the metrics lines so far), so a resumed run continues
with the same numbers. A Ctrl-C or SIGTERM is honoured between iterations, after writing a
checkpoint; a process killed outright (SIGKILL, a lost node) loses at most the iterations since
the last checkpoint (``checkpoint_every``), and ``--resume`` (or ``BILEVEL_RESUME=auto``, or a
torchrun restart) continues from it. A non-finite loss or hypergradient stops the run before
the optimiser step, keeping the last good checkpoint.

Under torchrun the episodes of each meta-batch are split over the processes and the gradients
averaged (bilevel.app.distributed); only rank 0 writes files. See docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bilevel import BilevelError, HypergradientError, InnerDivergenceError

from ... import checkpoints, distributed
from ...data import Episodes
from ...runs import remove_partial_writes
from ..common import seed_everything
from .config import FewshotConfig
from .data import ImageSampler, class_sets, episodes
from .identity import identity, load_checkpoint
from .learners import Learner, classical_loss, confidence, evaluate, meta_loss, norm_statistics

CHECKPOINT, BEST = "checkpoint.pt", "best.pt"
VALIDATION_SEED = 7919  # mixed with the run's seed: validation episodes differ from training's


class TrainingError(BilevelError):
    """A run that cannot go on: it diverged, or its processes do not fit its settings.

    The command line reports it in one line (exit 1), like every BilevelError; the last good
    checkpoint is kept.
    """


class _Diverged(Exception):
    """A non-finite loss or hypergradient in this iteration (all ranks raise it together)."""


@dataclass
class Resume:
    """What a resumed run starts from: a verified checkpoint and the metrics lines before it."""

    state: dict
    lines: list[dict] = field(default_factory=list)


def prepare_resume(config: FewshotConfig, out: Path, mode: str) -> Resume:
    """Read and verify ``out``'s checkpoint before anything in ``out`` is overwritten."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise checkpoints.CheckpointError(f"--resume: no {CHECKPOINT} in {out}")
    state = load_checkpoint(path, config, mode)
    lines = state.get("history")
    if lines is None:  # a checkpoint without its metrics lines: read them from metrics.jsonl
        lines = _metrics_lines(Path(out) / "metrics.jsonl")
    done = state["progress"]["iteration"]
    return Resume(state, [x for x in lines if x.get("iteration", 0) <= done])


def _metrics_lines(path: Path) -> list[dict]:
    lines = []
    if path.is_file():
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:  # a line cut short by a killed process
                break
    return lines


@dataclass
class Trainer:
    config: FewshotConfig
    mode: str  # "bilevel" or "classical"
    learner: Learner
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    sampler: object  # EpisodeSampler or ImageSampler: sample(), state_dict()
    val_classes: object
    progress: dict
    group: distributed.Group = field(default_factory=distributed.Group)
    history: list[dict] = field(default_factory=list)  # the metrics lines so far
    saved_at: int | None = None  # the iteration of the last checkpoint written or read

    def step(self, stop: bool = False) -> tuple[float, float, bool]:
        """One training iteration: (loss, accuracy) of its whole batch, and whether any rank
        was asked to stop. Raises _Diverged, on every rank, before the optimiser step when the
        loss or a gradient is not finite."""
        group = self.group
        self.optimizer.zero_grad(set_to_none=True)
        detail, loss_value, accuracy_value = None, 0.0, 0.0
        try:
            if self.mode == "bilevel":
                batch = self.sampler.sample()
                mine = distributed.shard(batch, group.rank, group.size, "meta_batch")
                loss, accuracy = meta_loss(
                    self.learner, Episodes(*mine).to(group.device), self.config
                )
            else:
                images, labels = distributed.shard(
                    self.sampler.sample(), group.rank, group.size, "classical_batch"
                )
                loss, accuracy = classical_loss(
                    self.learner, images.to(group.device), labels.to(group.device)
                )
            loss_value, accuracy_value = float(loss.detach()), float(accuracy)
            if math.isfinite(loss_value):
                loss.backward()
            else:
                detail = f"the outer (query) loss is {loss_value}"
        except (InnerDivergenceError, HypergradientError) as error:
            detail = str(error)
        # one all-reduce: the batch's loss and accuracy, stop requests, divergence
        status = torch.tensor(
            [loss_value, accuracy_value, float(stop), float(detail is not None)],
            dtype=torch.float64,
            device=group.device,
        )
        group.sum(status)
        if status[3] > 0:
            raise _Diverged(group.first_message(detail))
        grads = [p.grad for p in self.learner.parameters() if p.grad is not None]
        group.average(grads)  # each rank's loss is its share's mean: the mean is the batch's
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise _Diverged("the hypergradient of the network is not finite")
        self.optimizer.step()
        self.schedule.step()
        group.average(norm_statistics(self.learner.net))  # one update by all episodes
        return float(status[0]) / group.size, float(status[1]) / group.size, bool(status[2])

    def validate(self) -> tuple[float, float]:
        rng = np.random.default_rng([self.config.seed, VALIDATION_SEED])
        sampler = episodes(self.config, self.val_classes, self.config.meta_batch, rng)
        steps, group = self.config.inner_steps, self.group
        correct, failure = None, None
        try:
            correct = evaluate(
                self.learner,
                sampler,
                self.config.val_episodes,
                [steps],
                self.config.val_batch_norm,
                share=(group.rank, group.size),
            )[steps]
        except BilevelError as error:  # every rank must learn of it before the next collective
            failure = f"meta-validation: {error}"
        if group.size > 1:
            failure = group.first_message(failure) or None
        if failure is not None:
            raise _Diverged(failure)
        return confidence(group.fill(torch.from_numpy(correct)).numpy())

    def state(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "progress": self.progress,
            "history": self.history,
        }

    def restore(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.progress = state["progress"]
        self.saved_at = self.progress["iteration"]

    def save(self, out: Path) -> None:
        """Write checkpoint.pt (rank 0), never with a non-finite weight or statistic."""
        state = self.state()
        bad = [
            k
            for k, v in state["learner"].items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise _Diverged(f"non-finite values in {', '.join(bad[:3])}")
        if self.group.main:
            checkpoints.save(out / CHECKPOINT, state, identity(self.config, self.mode))
        self.saved_at = self.progress["iteration"]


def build(
    config: FewshotConfig,
    data_dir: Path | None,
    mode: str,
    log,
    group: distributed.Group | None = None,
    fresh: bool = True,
) -> Trainer:
    group = group or distributed.Group(device=config.device)
    _check_split(config, mode, group.size)
    seed_everything(config.seed)
    sets = class_sets(config, data_dir, ("train", "val"))
    for part, classes in sets.items():
        log.info("%s: %d classes; %s", part, len(classes), classes.note)
    learner = Learner(config, len(sets["train"]) if mode == "classical" else None)
    if config.init_from is not None and fresh:
        initialise(learner, Path(config.init_from), config, log)
        log.info("network initialised from %s", config.init_from)
    learner.to(group.device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    decay = config.lr_decay
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / (1 + decay * t))
    if mode == "bilevel":
        sampler = episodes(config, sets["train"], config.meta_batch, config.seed)
    else:
        images = config.classical_batch or config.meta_batch * config.ways * (
            config.shots + config.queries
        )
        sampler = ImageSampler(sets["train"], images, config.seed)
    progress = {
        "iteration": 0,
        "best_accuracy": -1.0,
        "best_ci95": 0.0,
        "best_iteration": 0,
        "stale": 0,
        "stopped": None,
        "window": [],
    }
    return Trainer(
        config, mode, learner, optimizer, schedule, sampler, sets["val"], progress, group
    )


def training_run(source: Path) -> tuple[dict, str]:
    """The resolved config and mode ("bilevel"/"classical") a run directory was trained with."""
    path = Path(source) / "config.json"
    if not path.is_file():
        raise checkpoints.CheckpointError(f"{source} is not a training run (no config.json)")
    try:
        saved = json.loads(path.read_text())
        experiment, config = saved["experiment"], saved["config"]
    except (ValueError, KeyError, TypeError):
        raise checkpoints.CheckpointError(f"{path} is not a run's config.json") from None
    mode = {"fewshot-train": "bilevel", "fewshot-classical": "classical"}.get(experiment)
    if mode is None:
        raise checkpoints.CheckpointError(f"{source} holds a {experiment} run")
    return config, mode


def initialise(learner: Learner, source: Path, config: FewshotConfig, log) -> None:
    """Pretraining: start from the network of another run (its best validation)."""
    path = source / BEST if (source / BEST).is_file() else source / CHECKPOINT
    if (source / "config.json").is_file():
        theirs = training_run(source)[0].get("feature_norm")
        if theirs != config.feature_norm:
            log.warning(
                "init_from=%s was trained with feature_norm=%s, this run has %s",
                source,
                theirs,
                config.feature_norm,
            )
    if not path.is_file():
        raise checkpoints.CheckpointError(f"init_from={source}: no {BEST} or {CHECKPOINT} there")
    state = checkpoints.load(path)
    weights = {k[4:]: v for k, v in state["learner"].items() if k.startswith("net.")}
    try:
        learner.net.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise checkpoints.CheckpointError(
            f"init_from={source}: its network does not fit this model ({first})"
        ) from None


def _check_split(config: FewshotConfig, mode: str, processes: int) -> None:
    if processes == 1:
        return
    if mode == "bilevel" and config.train_batch_norm != "episode":
        raise TrainingError(
            f"train_batch_norm={config.train_batch_norm!r} needs one process: with "
            f"{processes}, use train_batch_norm=episode (the default)"
        )
    batch = config.meta_batch
    name = "meta_batch"
    if mode == "classical":
        name = "classical_batch"
        batch = config.classical_batch or batch * config.ways * (config.shots + config.queries)
    if batch % processes:
        raise TrainingError(f"{name}={batch} does not split evenly over {processes} processes")


def run_training(config: FewshotConfig, run, data_dir, mode: str, resume: Resume | None) -> None:
    group = distributed.init(config.device)
    try:
        _train(config, run, data_dir, mode, resume, group)
    finally:
        group.close()


def _train(config, run, data_dir, mode: str, resume: Resume | None, group) -> None:
    # resume: read before the run's files were opened (--resume, or BILEVEL_RESUME=auto and
    # torchrun restarts: bilevel.app.cli)
    if group.main:
        remove_partial_writes(run.out)
    trainer = build(config, data_dir, mode, run.log, group, fresh=resume is None)
    if group.size > 1:
        run.log.info("%d processes (%s), rank 0 of them logs", group.size, group.device)
    if resume is not None:
        trainer.restore(resume.state)
        trainer.history = list(resume.lines)
        for line in trainer.history:
            run.metrics(**line)
        run.log.info("resumed at iteration %d", trainer.progress["iteration"])
    group.agree(trainer.progress["iteration"], "the iteration to start from")
    net = trainer.learner.net
    run.update(
        mode=mode,
        parameters=sum(p.numel() for p in net.parameters()),
        features=net.out_features,
        processes=group.size,
    )
    try:
        with _stop_requests() as stop:
            _loop(trainer, run, stop)
    finally:
        _summarise(trainer, run)
        if trainer.history:
            plot_curves(run, trainer.history)


def _loop(trainer: Trainer, run, stop: threading.Event) -> None:
    config, progress, out = trainer.config, trainer.progress, run.out
    bar = run.progress(total=config.iterations, desc=trainer.mode)
    bar.update(progress["iteration"])
    running = None
    every = config.checkpoint_every or config.validate_every
    while progress["iteration"] < config.iterations and progress["stopped"] is None:
        began = time.perf_counter()
        try:
            loss, accuracy, stopping = trainer.step(stop.is_set())
        except _Diverged as error:
            _diverged(trainer, progress["iteration"] + 1, error)
        progress["iteration"] += 1
        progress["window"].append([loss, accuracy, time.perf_counter() - began])
        running = accuracy if running is None else 0.98 * running + 0.02 * accuracy
        bar.update()
        bar.set_postfix(query_acc=f"{running:.3f}", loss=f"{loss:.3f}")
        i = progress["iteration"]
        if i % config.log_every == 0:
            _log_window(trainer, run)
        try:
            if i % config.validate_every == 0:
                _validation(trainer, run)
            if i % config.validate_every == 0 or i % every == 0 or stopping:
                trainer.save(out)
        except _Diverged as error:
            _diverged(trainer, i, error)
        if stopping:
            raise KeyboardInterrupt
    bar.close()
    if trainer.saved_at != progress["iteration"]:
        trainer.save(out)


def _diverged(trainer: Trainer, iteration: int, error: _Diverged):
    """Stop with one line; the checkpoint on disk is the last good one."""
    trainer.progress["stopped"] = f"diverged at iteration {iteration}"
    kept = (
        f"{CHECKPOINT} keeps iteration {trainer.saved_at}"
        if trainer.saved_at is not None
        else "no checkpoint was written"
    )
    raise TrainingError(
        f"diverged at iteration {iteration}: {error}; stopped without saving ({kept})"
    ) from None


def _log_window(trainer: Trainer, run) -> None:
    window = np.array(trainer.progress.pop("window"))
    trainer.progress["window"] = []
    line = {
        "kind": "train",
        "iteration": trainer.progress["iteration"],
        "loss": float(window[:, 0].mean()),
        "accuracy": 100 * float(window[:, 1].mean()),  # percent, as validation and test
        "outer_lr": trainer.optimizer.param_groups[0]["lr"],
        "inner_lr": trainer.learner.inner_lr(),
        "seconds": float(window[:, 2].mean()),
    }
    run.metrics(**line)
    trainer.history.append(line)


def _validation(trainer: Trainer, run) -> None:
    progress = trainer.progress
    began = time.perf_counter()
    accuracy, ci95 = trainer.validate()
    improved = accuracy > progress["best_accuracy"]
    if improved:
        progress.update(
            best_accuracy=accuracy, best_ci95=ci95, best_iteration=progress["iteration"]
        )
        progress["stale"] = 0
        best = {"learner": trainer.learner.state_dict(), "progress": dict(progress)}
        if trainer.group.main:
            checkpoints.save(run.out / BEST, best, identity(trainer.config, trainer.mode))
    else:
        progress["stale"] += 1
        if progress["stale"] >= trainer.config.patience:
            progress["stopped"] = f"no improvement in {progress['stale']} validations"
    line = {
        "kind": "val",
        "iteration": progress["iteration"],
        "accuracy": accuracy,
        "ci95": ci95,
        "best": improved,
        "seconds": time.perf_counter() - began,
    }
    run.metrics(**line)
    trainer.history.append(line)
    run.log.info(
        "iteration %d: validation accuracy %.2f ± %.2f%s",
        progress["iteration"],
        accuracy,
        ci95,
        " (best)" if improved else "",
    )
    _summarise(trainer, run)


def _summarise(trainer: Trainer, run) -> None:
    p = trainer.progress
    budget_spent = p["iteration"] >= trainer.config.iterations
    run.update(
        iterations=p["iteration"],
        **best_so_far(p),
        stopped=p["stopped"] or ("budget" if budget_spent else None),  # None: may resume
        inner_lr=trainer.learner.inner_lr(),
    )


def best_so_far(progress: dict) -> dict:
    """The best validation so far as summary.json reports it: null before the first one."""
    if progress["best_accuracy"] < 0:  # the -1 that any validation accuracy beats
        return dict.fromkeys(("best_val_accuracy", "best_val_ci95", "best_iteration"))
    return {
        "best_val_accuracy": progress["best_accuracy"],
        "best_val_ci95": progress["best_ci95"],
        "best_iteration": progress["best_iteration"],
    }


@contextmanager
def _stop_requests():
    """SIGINT and SIGTERM set an event the loop checks between iterations; a second SIGINT
    interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def plot_curves(run, history: list[dict]) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for kind, label in (("train", "meta-train query (window mean)"), ("val", "meta-validation")):
        points = [(x["iteration"], x["accuracy"]) for x in history if x.get("kind") == kind]
        if points:
            axis.plot(*zip(*points), label=label, marker="o" if kind == "val" else None)
    axis.set_xlabel("iteration")
    axis.set_ylabel("accuracy (%)")
    axis.legend()
    run.plot(figure, "learning_curve")
