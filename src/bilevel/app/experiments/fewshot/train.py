"""What both learners train with: the driver's steppable (one meta-iteration a step),
validation, early stopping and the checkpoint layout.

Every ``validate_every`` iterations the network is evaluated on fixed seeded meta-validation
episodes (the test protocol at T = inner_steps); the best one is kept in ``best.pt`` and
training stops after ``patience`` validations without improvement. ``checkpoint.pt`` holds
everything the next iteration depends on (network, optimiser, schedule, sampler and RNG
states, the pending metrics window, and the metrics lines so far), so a resumed run continues
with the same numbers. The loop, stop requests, checkpoints, divergence stops and the summary
are the driver's (bilevel.app.driver): a process killed outright loses at most the iterations
since the last checkpoint (``checkpoint_every``), and a non-finite loss or hypergradient stops
the run before the optimiser step, keeping the last good checkpoint.

Under torchrun the episodes of each meta-batch are split over the processes and the gradients
averaged (bilevel.app.distributed); only rank 0 writes files. See docs/distributed.md.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bilevel import BilevelError, HypergradientError, InnerDivergenceError

from ... import checkpoints, distributed, plots
from ...checkpoints import BEST, CHECKPOINT
from ...data import Episodes
from ...driver import Diverged, MovingAverage, Position
from ...plots import Curve, Panel
from ..common import seed_everything
from .config import FewshotConfig
from .data import ImageSampler, class_sets, episodes
from .learners import Learner, classical_loss, confidence, evaluate, meta_loss, norm_statistics

VALIDATION_SEED = 7919  # mixed with the run's seed: validation episodes differ from training's


class TrainingError(BilevelError):
    """Settings that do not fit the run's processes (the command line reports it in one line)."""


def upgrade(state: dict, out: Path) -> dict:
    """A checkpoint of an older version, which kept no metrics lines: they are read from the
    run's metrics.jsonl (before the resumed run rewrites it), up to the checkpoint's iteration."""
    if state.get("history") is None:
        done = state["progress"]["iteration"]
        lines = _metrics_lines(out / "metrics.jsonl")
        state = {**state, "history": [x for x in lines if x.get("iteration", 0) <= done]}
    return state


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
    """One learner's training, as the driver's steppable (bilevel.app.driver.Steppable)."""

    config: FewshotConfig
    mode: str  # "bilevel" or "classical"
    learner: Learner
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    sampler: object  # EpisodeSampler or ImageSampler: sample(), state_dict()
    val_classes: object
    progress: dict
    group: distributed.Group = field(default_factory=distributed.Group)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("bilevel.fewshot"))
    keep_best: Callable[[dict], None] | None = None  # writes best.pt (the driver's checkpoint)
    query_accuracy: MovingAverage = field(default_factory=MovingAverage)  # for the bar
    last_loss: float = math.nan

    def train_step(self) -> tuple[float, float]:
        """One optimiser step: (loss, accuracy) of its whole batch. Raises Diverged, on every
        rank, before the optimiser step when the loss or a gradient is not finite."""
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
        # one all-reduce: the batch's loss and accuracy, and divergence on any rank
        status = torch.tensor(
            [loss_value, accuracy_value, float(detail is not None)],
            dtype=torch.float64,
            device=group.device,
        )
        group.sum(status)
        if status[2] > 0:
            raise Diverged(group.first_message(detail))
        grads = [p.grad for p in self.learner.parameters() if p.grad is not None]
        group.average(grads)  # each rank's loss is its share's mean: the mean is the batch's
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise Diverged("the hypergradient of the network is not finite")
        self.optimizer.step()
        self.schedule.step()
        group.average(norm_statistics(self.learner.net))  # one update by all episodes
        return float(status[0]) / group.size, float(status[1]) / group.size

    def step(self) -> dict | None:
        """One iteration; every ``log_every`` iterations, the metrics line of their window."""
        began = time.perf_counter()
        loss, accuracy = self.train_step()
        progress = self.progress
        progress["iteration"] += 1
        progress["window"].append([loss, accuracy, time.perf_counter() - began])
        self.query_accuracy.add(100 * accuracy)  # percent, as the lines and plots
        self.last_loss = loss
        if progress["iteration"] % self.config.log_every == 0:
            return self._window_line()
        return None

    def _window_line(self) -> dict:
        window = np.array(self.progress["window"])
        self.progress["window"] = []
        return {
            "kind": "train",
            "iteration": self.progress["iteration"],
            "loss": float(window[:, 0].mean()),
            "accuracy": 100 * float(window[:, 1].mean()),  # percent, as validation and test
            "outer_lr": self.optimizer.param_groups[0]["lr"],
            "inner_lr": self.learner.inner_lr(),
            "seconds": float(window[:, 2].mean()),
        }

    def evaluate(self) -> dict:
        """Meta-validation: its line; keeps the best network (best.pt) and counts patience."""
        progress, began = self.progress, time.perf_counter()
        accuracy, ci95 = self.validate()
        improved = accuracy > progress["best_accuracy"]
        if improved:
            progress.update(
                best_accuracy=accuracy, best_ci95=ci95, best_iteration=progress["iteration"]
            )
            progress["stale"] = 0
            if self.keep_best is not None:
                self.keep_best({"learner": self.learner.state_dict(), "progress": dict(progress)})
        else:
            progress["stale"] += 1
            if progress["stale"] >= self.config.patience:
                progress["stopped"] = f"no improvement in {progress['stale']} validations"
        self.log.info(
            "iteration %d: validation accuracy %.2f ± %.2f%s",
            progress["iteration"],
            accuracy,
            ci95,
            " (best)" if improved else "",
        )
        return {
            "kind": "val",
            "iteration": progress["iteration"],
            "accuracy": accuracy,
            "ci95": ci95,
            "best": improved,
            "seconds": time.perf_counter() - began,
        }

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
            raise Diverged(failure)
        return confidence(group.fill(torch.from_numpy(correct)).numpy())

    def stop_reason(self) -> str | None:
        return self.progress["stopped"]

    def bar(self) -> dict[str, float]:
        return {"query_acc": self.query_accuracy.value, "loss": self.last_loss}

    def summary(self) -> dict:
        return {
            "iterations": self.progress["iteration"],
            **best_so_far(self.progress),
            "inner_lr": self.learner.inner_lr(),
        }

    def state_dict(self) -> dict:
        """Everything the next iteration depends on; never a non-finite weight or statistic
        (raises Diverged)."""
        state = {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "progress": self.progress,
        }
        bad = [
            k
            for k, v in state["learner"].items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise Diverged(f"non-finite values in {', '.join(bad[:3])}")
        return state

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.progress = state["progress"]


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
        config, mode, learner, optimizer, schedule, sampler, sets["val"], progress, group, log
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


def run_training(config: FewshotConfig, run, data_dir, mode: str) -> None:
    """Train one learner on the driver ``run`` (bilevel.app.driver.Driver), continuing from
    ``run.resume`` (the checkpoint read before the run's files were opened)."""
    resume = run.resume
    trainer = build(config, data_dir, mode, run.log, run.group, fresh=resume is None)
    trainer.keep_best = lambda state: run.checkpoint(state, name=BEST)
    position = Position()
    if resume is not None:
        position = Position(resume["progress"]["iteration"], list(resume["history"]), resume)
        run.kept = f"{CHECKPOINT} keeps iteration {position.step}"
        run.rewrite(position.lines)
    net = trainer.learner.net
    run.update(
        mode=mode,
        parameters=sum(p.numel() for p in net.parameters()),
        features=net.out_features,
        processes=run.group.size,
    )

    def save(at: Position) -> None:
        run.checkpoint({**at.state, "history": at.lines}, kept=f"iteration {at.step}")

    try:
        run.loop(
            trainer,
            config.iterations,
            name=mode,
            unit="iteration",
            start=position,
            save=save,
            checkpoint_every=config.checkpoint_every or config.validate_every,
            evaluate_every=config.validate_every,
        )
    finally:
        if position.lines:
            plot_curves(run, position.lines)


def best_so_far(progress: dict) -> dict:
    """The best validation so far as summary.json reports it: null before the first one."""
    if progress["best_accuracy"] < 0:  # the -1 that any validation accuracy beats
        return dict.fromkeys(("best_val_accuracy", "best_val_ci95", "best_iteration"))
    return {
        "best_val_accuracy": progress["best_accuracy"],
        "best_val_ci95": progress["best_ci95"],
        "best_iteration": progress["best_iteration"],
    }


def plot_curves(run, history: list[dict]) -> None:
    curves = []
    for kind, label in (("train", "meta-train query (window mean)"), ("val", "meta-validation")):
        points = [(x["iteration"], x["accuracy"]) for x in history if x.get("kind") == kind]
        if points:
            curves.append(Curve(label, *zip(*points), style="o-" if kind == "val" else "-"))
    panel = Panel(curves, "iteration", "accuracy (%)")
    run.plot(plots.figure([panel], width=6), "learning_curve")
