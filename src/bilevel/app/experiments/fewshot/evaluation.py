"""Meta-test of a trained run: accuracy ± 95% CI on seeded episodes, as a function of T."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...data import ClassSet
from ..common import seed_everything
from ..config import unknown_setting
from . import weights
from .config import FewshotConfig, FewshotTestConfig
from .data import class_sets, episodes
from .identity import as_trained, load_checkpoint
from .learners import Learner, confidence, evaluate
from .train import BEST, CHECKPOINT, best_so_far, training_run

EPISODES_PER_DRAW = 20  # episodes sampled at once; the heads of a draw are trained together


def test_overrides(assignments) -> None:
    """Only test settings may change between training and testing; a key that is no setting at
    all is named with the closest test setting."""
    allowed = FewshotTestConfig.SETTABLE
    for assignment in assignments:
        key = assignment.partition("=")[0].strip()
        if key not in FewshotConfig.model_fields:
            raise ValueError(f"--set {key}: {unknown_setting(key, allowed)}")
        if key not in allowed:
            raise ValueError(f"--set {key}: only {', '.join(sorted(allowed))} can be set here")


def run_test(config: FewshotConfig, run, data_dir, source: Path, mode: str) -> None:
    """Test the network of ``source``: a training run directory (its best network) or a
    weights file (bilevel.app.experiments.fewshot.weights)."""
    seed_everything(config.seed)
    learner = _trained(config, Path(source), mode, run)
    test = class_sets(config, data_dir, ("test",))["test"]
    run.log.info("test: %d classes; %s", len(test), test.note)
    rows = accuracy_by_steps(config, learner, test)
    for row in rows:
        run.metrics(**row)
    main = next(r for r in rows if r["steps"] == config.inner_steps)
    run.update(
        accuracy=main["accuracy"],
        ci95=main["ci95"],
        steps=config.inner_steps,
        ways=config.ways,
        shots=config.shots,
        episodes=config.test_episodes,
        batch_norm=config.test_batch_norm,
        inner_lr=learner.inner_lr(),
        by_steps=rows,
    )
    run.log.info(
        "%d-way %d-shot: %.2f ± %.2f%% (T=%d, %d episodes, batch norm %s)",
        config.ways,
        config.shots,
        main["accuracy"],
        main["ci95"],
        config.inner_steps,
        config.test_episodes,
        config.test_batch_norm,
    )
    plot_steps(run, rows, config.inner_steps)


def accuracy_by_steps(config: FewshotConfig, learner: Learner, test: ClassSet) -> list[dict]:
    """Mean query accuracy and its 95% interval (percent) on ``config.test_episodes`` episodes
    of ``test`` seeded by ``config.test_seed``, for every T of ``config.test_steps`` and the
    trained T: one dict {steps, accuracy, ci95} per T, in increasing order."""
    rng = np.random.default_rng(config.test_seed)
    sampler = episodes(config, test, EPISODES_PER_DRAW, rng)
    steps = sorted({*config.test_steps, config.inner_steps})
    correct = evaluate(learner, sampler, config.test_episodes, steps, config.test_batch_norm)
    rows = []
    for t in steps:
        accuracy, ci95 = confidence(correct[t])
        rows.append({"steps": t, "accuracy": accuracy, "ci95": ci95})
    return rows


def _trained(config: FewshotConfig, source: Path, mode: str, run) -> Learner:
    """The network of ``source``'s best validation (its last checkpoint if it never validated),
    or of the weights file ``source``."""
    if source.is_file():
        learner, progress = weights.load_learner(source, config)
        path = source
    else:
        path = source / BEST if (source / BEST).is_file() else source / CHECKPOINT
        trained, _ = training_run(source)  # the episodes it was trained on, for its identity
        state = load_checkpoint(path, as_trained(config, trained), mode)
        learner = Learner(config)
        learner.load_state_dict(weights.network_state(state["learner"]))
        progress = state["progress"]
    run.update(
        checkpoint=str(path),
        trained_iterations=progress["iteration"],
        best_val_accuracy=best_so_far(progress)["best_val_accuracy"],
    )
    return learner.to(torch.device(config.device))


def plot_steps(run, rows: list[dict], trained_steps: int) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    steps = [r["steps"] for r in rows]
    axis.errorbar(
        steps, [r["accuracy"] for r in rows], yerr=[r["ci95"] for r in rows], marker="o", capsize=3
    )
    axis.axvline(
        trained_steps, color="grey", linestyle=":", label=f"T in training = {trained_steps}"
    )
    axis.set_xscale("log")
    axis.set_xticks(steps, [str(s) for s in steps])
    axis.set_xlabel("inner steps T at test")
    axis.set_ylabel("test accuracy (%), 95% CI")
    axis.legend()
    run.plot(figure, "accuracy_vs_steps")
