"""The training loop of both learners: validation, early stopping, checkpoints, exact resume.

Every ``validate_every`` iterations the network is evaluated on fixed seeded meta-validation
episodes (the test protocol at T = inner_steps); the best one is kept in ``best.pt`` and
training stops after ``patience`` validations without improvement. ``checkpoint.pt`` holds
everything the next iteration depends on (network, optimiser, schedule, sampler and RNG
states, the pending metrics window), so a resumed run continues with the same numbers. A
Ctrl-C or SIGTERM is honoured between iterations, after writing a checkpoint.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ... import checkpoints
from ..common import seed_everything
from .config import FewshotConfig
from .data import ImageSampler, class_sets, episodes
from .learners import Learner, classical_loss, confidence, evaluate, meta_loss

CHECKPOINT, BEST = "checkpoint.pt", "best.pt"
VALIDATION_SEED = 7919  # mixed with the run's seed: validation episodes differ from training's


@dataclass
class Resume:
    """What a resumed run starts from: a verified checkpoint and the metrics lines before it."""

    state: dict
    lines: list[dict] = field(default_factory=list)


def identity(config: FewshotConfig, mode: str) -> dict:
    """The settings a checkpoint is bound to."""
    return {**config.hashed(), "mode": mode}


def prepare_resume(config: FewshotConfig, out: Path, mode: str) -> Resume:
    """Read and verify ``out``'s checkpoint before anything in ``out`` is overwritten."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise checkpoints.CheckpointError(f"--resume: no {CHECKPOINT} in {out}")
    state = checkpoints.load(path, identity(config, mode))
    metrics = Path(out) / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    done = state["progress"]["iteration"]
    return Resume(state, [x for x in lines if x.get("iteration", 0) <= done])


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

    def step(self) -> tuple[float, float]:
        """One training iteration: (loss, accuracy) of its batch."""
        device = self.config.device
        if self.mode == "bilevel":
            batch = self.sampler.sample().to(device)
            loss, accuracy = meta_loss(self.learner, batch, self.config)
        else:
            images, labels = (t.to(device) for t in self.sampler.sample())
            loss, accuracy = classical_loss(self.learner, images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return float(loss.detach()), float(accuracy)

    def validate(self) -> tuple[float, float]:
        rng = np.random.default_rng([self.config.seed, VALIDATION_SEED])
        sampler = episodes(self.config, self.val_classes, self.config.meta_batch, rng)
        steps = self.config.inner_steps
        correct = evaluate(
            self.learner, sampler, self.config.val_episodes, [steps], self.config.test_batch_norm
        )
        return confidence(correct[steps])

    def state(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "progress": self.progress,
        }

    def restore(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.progress = state["progress"]

    def save(self, out: Path) -> None:
        checkpoints.save(out / CHECKPOINT, self.state(), identity(self.config, self.mode))


def build(config: FewshotConfig, data_dir: Path | None, mode: str, log) -> Trainer:
    seed_everything(config.seed)
    sets = class_sets(config, data_dir, ("train", "val"))
    for part, classes in sets.items():
        log.info("%s: %d classes; %s", part, len(classes), classes.note)
    learner = Learner(config, len(sets["train"]) if mode == "classical" else None)
    learner.to(config.device)
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
    return Trainer(config, mode, learner, optimizer, schedule, sampler, sets["val"], progress)


def run_training(config: FewshotConfig, run, data_dir, mode: str, resume: Resume | None) -> None:
    trainer = build(config, data_dir, mode, run.log)
    history = []
    if resume is not None:
        trainer.restore(resume.state)
        for line in resume.lines:
            run.metrics(**line)
        history = list(resume.lines)
        run.log.info("resumed at iteration %d", trainer.progress["iteration"])
    net = trainer.learner.net
    run.update(
        mode=mode, parameters=sum(p.numel() for p in net.parameters()), features=net.out_features
    )
    try:
        with _stop_requests() as stop:
            _loop(trainer, run, history, stop)
    finally:
        _summarise(trainer, run)
        if history:
            plot_curves(run, history)


def _loop(trainer: Trainer, run, history: list[dict], stop: threading.Event) -> None:
    config, progress, out = trainer.config, trainer.progress, run.out
    bar = run.progress(total=config.iterations, desc=trainer.mode)
    bar.update(progress["iteration"])
    running = None
    while progress["iteration"] < config.iterations and progress["stopped"] is None:
        began = time.perf_counter()
        loss, accuracy = trainer.step()
        progress["iteration"] += 1
        progress["window"].append([loss, accuracy, time.perf_counter() - began])
        running = accuracy if running is None else 0.98 * running + 0.02 * accuracy
        bar.update()
        bar.set_postfix(query_acc=f"{running:.3f}", loss=f"{loss:.3f}")
        i = progress["iteration"]
        if i % config.log_every == 0:
            _log_window(trainer, run, history)
        if i % config.validate_every == 0:
            _validation(trainer, run, history)
            trainer.save(out)
        if stop.is_set():
            trainer.save(out)
            raise KeyboardInterrupt
    bar.close()
    if progress["iteration"] % config.validate_every:  # not yet saved at this iteration
        trainer.save(out)


def _log_window(trainer: Trainer, run, history: list[dict]) -> None:
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
    history.append(line)


def _validation(trainer: Trainer, run, history: list[dict]) -> None:
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
    history.append(line)
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
        best_val_accuracy=p["best_accuracy"],
        best_val_ci95=p["best_ci95"],
        best_iteration=p["best_iteration"],
        stopped=p["stopped"] or ("budget" if budget_spent else None),  # None: may resume
        inner_lr=trainer.learner.inner_lr(),
    )


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
