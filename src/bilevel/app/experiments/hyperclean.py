"""Data hyper-cleaning (Franceschi et al. 2017, section 5.1) on MNIST.

A linear softmax model is trained on 5000 examples, half of them with a wrong
label, weighting each example's cross-entropy by a hyperparameter lambda_i in
[0, 1] with sum(lambda) <= R (kept feasible by projection). The weights are
learned by minimising the validation loss of the trained model. Rows: Baseline
(train on training + validation, ignoring the noise), Oracle (the same without
the corrupted examples), DH (the inner model at the learned weights) and DH-R
(retrain on validation + the training examples the weights kept); F1 of
flagging corrupted examples (lambda_i ~ 0).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.nn import functional as F

import bilevel
from bilevel.constraints import L1Ball

from .. import plots
from ..data import load_mnist
from . import Experiment, stages
from .common import accuracy, f1_score, linear_logits, seed_everything, train_linear, zero_linear
from .config import MEMORY_HELP, StagedConfig
from .stages import HyperSteps

CLASSES = 10
Method = Literal[
    "reverse", "truncated", "forward", "implicit-cg", "implicit-neumann", "fixed-point"
]


class HypercleanConfig(StagedConfig):
    train: int = Field(5000, gt=0, description="training examples (some with a wrong label)")
    validation: int = Field(5000, gt=0, description="validation examples (all labels right)")
    test: int = Field(10000, gt=0, le=10000, description="test examples (MNIST test set)")
    corrupted: int = Field(
        2500, ge=0, description="training examples whose label is replaced by a wrong one"
    )
    radii: list[float] = Field(
        [1000, 1500, 2000, 2500],
        min_length=1,
        description="bounds on the sum of the example weights (each weight is in [0, 1]): one "
        "run each",
    )
    inner_lr: float = Field(0.1, gt=0, description="learning rate of the model's training")
    inner_steps: int = Field(
        50, gt=0, description="gradient steps of the model's training per hyper-iteration"
    )
    method: Method = Field(
        "reverse", description="how the hypergradient is computed (`bilevel methods`)"
    )
    memory: Literal["graph", "trajectory", "checkpoint"] = Field("graph", description=MEMORY_HELP)
    truncation: int = Field(
        25, gt=0, description="steps that method 'truncated' differentiates (the last ones)"
    )
    warm_start: bool = Field(
        True, description="continue each training from the last one's model, not from zero"
    )
    hyper_lr: float = Field(0.02, gt=0, description="learning rate of Adam on the weights")
    hyper_iterations: int = Field(200, gt=0, description="updates of the example weights")
    retrain_steps: int = Field(
        2000,
        gt=0,
        description="gradient steps of the models retrained for comparison (Baseline, Oracle, "
        "DH-R)",
    )
    flag_below: float = Field(
        0.5,
        gt=0,
        le=1,
        description="an example is flagged as mislabelled when its weight ends below this "
        "fraction of its starting weight",
    )
    compare_methods: list[Method] = Field(
        ["reverse", "truncated", "implicit-cg"],
        description="hypergradient methods timed against each other after the main run",
    )
    compare_iterations: int = Field(
        20, ge=0, description="hyper-iterations per compared method (0: no comparison)"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.corrupted > self.train:
            raise ValueError(f"corrupted={self.corrupted} exceeds train={self.train}")
        if self.train + self.validation > 60000:
            raise ValueError("train + validation must be at most 60000 (the MNIST training set)")
        uses_truncation = "truncated" in (self.method, *self.compare_methods)
        if uses_truncation and self.truncation > self.inner_steps:
            raise ValueError(f"truncation={self.truncation} exceeds inner_steps={self.inner_steps}")
        for radius in self.radii:
            if not 0 < radius <= self.train:
                raise ValueError(f"each radius must be in (0, train={self.train}], got {radius}")
        return self


# paper: the 2017 paper's data, model, constraint set, radii and outer optimiser (Adam); the
# inner run is warm-started, T=50 steps per hyper-iteration, where the paper restarted T=4000
# steps from zero (about 40x the cost, hours per radius on 2 CPU cores): see docs/experiments.md.
PRESETS = {
    "paper": {},
    "quick": {
        "train": 1000,
        "validation": 1000,
        "test": 2000,
        "corrupted": 500,
        "radii": [500],
        "inner_steps": 100,
        "truncation": 25,
        "hyper_lr": 0.05,
        "hyper_iterations": 30,
        "retrain_steps": 300,
        "compare_iterations": 3,
    },
}


def make_data(config: HypercleanConfig, data_dir: Path | None, generator: torch.Generator):
    """Balanced draws from the MNIST training set, corrupted labels, and the MNIST test set."""
    mnist = load_mnist(data_dir)
    images, labels = mnist["train"]
    per_class = -(-(config.train + config.validation) // CLASSES)
    chosen = torch.cat(
        [
            torch.nonzero(labels == c).flatten()[
                torch.randperm(int((labels == c).sum()), generator=generator)[:per_class]
            ]
            for c in range(CLASSES)
        ]
    )
    chosen = chosen[torch.randperm(len(chosen), generator=generator)]
    x = images[chosen].reshape(len(chosen), -1).float() / 255
    y = labels[chosen]
    train_x, train_y = x[: config.train], y[: config.train].clone()
    val_x, val_y = (
        x[config.train : config.train + config.validation],
        y[config.train :][: config.validation],
    )
    corrupted = torch.zeros(config.train, dtype=torch.bool)
    corrupted[torch.randperm(config.train, generator=generator)[: config.corrupted]] = True
    shift = torch.randint(1, CLASSES, (int(corrupted.sum()),), generator=generator)
    train_y[corrupted] = (train_y[corrupted] + shift) % CLASSES  # always a wrong label
    test_images, test_labels = mnist["test"]
    test = torch.randperm(len(test_labels), generator=generator)[: config.test]
    device = torch.device(config.device)
    to = lambda t: t.to(device)  # noqa: E731
    return {
        "train_x": to(train_x),
        "train_y": to(train_y),
        "corrupted": to(corrupted),
        "val_x": to(val_x),
        "val_y": to(val_y),
        "test_x": to(test_images[test].reshape(len(test), -1).float() / 255),
        "test_y": to(test_labels[test]),
    }


def problem(data, radius: float):
    """Inner: sum_i lambda_i CE_i / R; outer: validation mean cross-entropy."""

    def inner(params, hparams):
        losses = F.cross_entropy(
            linear_logits(params, data["train_x"]), data["train_y"], reduction="none"
        )
        return (hparams["weights"] * losses).sum() / radius

    def outer(params, hparams):
        return F.cross_entropy(linear_logits(params, data["val_x"]), data["val_y"])

    return inner, outer


def method_options(config: HypercleanConfig, method: str) -> dict:
    if method == "reverse":
        return {"memory": config.memory}
    if method == "truncated":
        return {"k": config.truncation, "memory": config.memory}
    if method == "implicit-neumann":
        return {"alpha": config.inner_lr}
    return {}


def learn_weights(config, data, radius, stage, method, iterations, warm_start=None):
    """Projected Adam on the example weights, continued from the stage's checkpoint if it was
    interrupted; returns (weights, final inner params, loop)."""
    inner, outer = problem(data, radius)
    n = len(data["train_y"])
    weights = torch.full((n,), radius / n, device=data["train_x"].device, requires_grad=True)
    loop = bilevel.HyperOptimizer(
        inner,
        outer,
        zero_linear(data["train_x"].shape[1], CLASSES, weights.device),
        {"weights": weights},
        bilevel.sgd(lr=config.inner_lr),
        config.inner_steps,
        torch.optim.Adam([weights], lr=config.hyper_lr),
        method=method,
        warm_start=config.warm_start if warm_start is None else warm_start,
        constraints={"weights": L1Ball(radius, bound=1.0, nonnegative=True)},
        **method_options(config, method),
    )

    def line(metrics: dict) -> dict:
        scores = f1_score(flagged(config, weights.detach(), radius), data["corrupted"])
        return {"run": stage.name, "radius": radius, "method": method, **metrics, **scores}

    stage.loop(HyperSteps(loop, line, shown=("outer_loss", "f1")), iterations)
    return weights.detach(), loop.last.params, loop


def baselines(config, data) -> dict:
    """Baseline (all of training + validation) and Oracle (without the corrupted examples)."""
    x = torch.cat([data["train_x"], data["val_x"]])
    y = torch.cat([data["train_y"], data["val_y"]])
    clean = torch.cat([~data["corrupted"], torch.ones_like(data["val_y"], dtype=torch.bool)])
    rows = {}
    for name, keep in (("baseline", torch.ones_like(clean)), ("oracle", clean)):
        params = train_linear(x[keep], y[keep], CLASSES, config.inner_lr, config.retrain_steps)
        rows[name] = accuracy(params, data["test_x"], data["test_y"])
    return rows


def flagged(config, weights, radius: float):
    """Examples whose weight fell below a fraction of where every weight started (R / n): a
    rule fixed in advance, not tuned on the corruption labels."""
    return weights < config.flag_below * radius / len(weights)


def retrain(config, data, weights, radius) -> float:
    """DH-R: train on the validation set and the training examples the weights kept."""
    keep = ~flagged(config, weights, radius)
    x = torch.cat([data["train_x"][keep], data["val_x"]])
    y = torch.cat([data["train_y"][keep], data["val_y"]])
    params = train_linear(x, y, CLASSES, config.inner_lr, config.retrain_steps)
    return accuracy(params, data["test_x"], data["test_y"])


def compare_method(config, data, stage, method) -> dict:
    """One method for a few hyper-iterations at the largest radius: time and outcome.

    Implicit methods assume w_T near a minimum, so they continue from the last w_T
    (warm start); the unrolled ones follow the main run's setting.
    """
    warm = True if method in ("implicit-cg", "implicit-neumann", "fixed-point") else None
    radius, iterations = max(config.radii), config.compare_iterations
    weights, _, loop = learn_weights(
        config, data, radius, stage, method, iterations, warm_start=warm
    )
    return {
        "method": method,
        "iterations": iterations,
        "warm_start": loop.warm_start,
        "seconds_per_iteration": sum(m["seconds"] for m in loop.history) / iterations,
        "final_outer_loss": loop.history[-1]["outer_loss"],
        "f1": f1_score(flagged(config, weights, radius), data["corrupted"])["f1"],
    }


def learn_radius(config, data, stage, radius) -> dict:
    """The main run at one radius: its row (DH, DH-R, F1), the weights and the loss curve."""
    weights, params, loop = learn_weights(
        config, data, radius, stage, config.method, config.hyper_iterations
    )
    row = {
        "radius": radius,
        "dh": accuracy(params, data["test_x"], data["test_y"]),
        "dh_r": retrain(config, data, weights, radius),
        **f1_score(flagged(config, weights, radius), data["corrupted"]),
        "seconds": sum(m["seconds"] for m in loop.history),
    }
    return {"row": row, "weights": weights, "history": loop.history}


def plot_weights(run, results, data):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3), squeeze=False)
    for axis, (radius, weights) in zip(axes[0], results.items()):
        corrupted = data["corrupted"].cpu()
        bins = torch.linspace(0, 1, 21).tolist()
        axis.hist(weights.cpu()[~corrupted].tolist(), bins=bins, alpha=0.6, label="clean")
        axis.hist(weights.cpu()[corrupted].tolist(), bins=bins, alpha=0.6, label="corrupted")
        axis.set_title(f"R = {radius:g}")
        axis.set_xlabel("learned weight")
    axes[0][0].set_ylabel("examples")
    axes[0][0].legend()
    run.plot(figure, "weights")


def plot_curves(run, histories):
    labelled = {f"R = {radius:g}": history for radius, history in histories.items()}
    run.plot(plots.figure([plots.histories(labelled, "validation loss of w_T")]), "outer_loss")


def run_experiment(config: HypercleanConfig, run, data_dir: Path | None) -> None:
    """Stages: the baselines, one per radius, one per compared method (bilevel stages), on
    the driver ``run``."""
    session = stages.Stages(run)
    generator = seed_everything(config.seed)
    data = make_data(config, data_dir, generator)
    run.log.info(
        "data: %d train (%d corrupted), %d validation, %d test",
        config.train,
        config.corrupted,
        config.validation,
        config.test,
    )
    radii = {f"R={r:g}": r for r in config.radii}
    compared = {f"compare {m}": m for m in config.compare_methods if config.compare_iterations}
    rows, compare_rows = [], []

    def work(name, stage):
        if name == "baselines":
            return baselines(config, data)
        if name in radii:
            return learn_radius(config, data, stage, radii[name])
        return compare_method(config, data, stage, compared[name])

    def report(name, result):
        if name == "baselines":
            run.update(**result)
            run.log.info("baseline %.4f, oracle %.4f", result["baseline"], result["oracle"])
        elif name in radii:
            row = result["row"]
            rows.append(row)
            run.update(rows=rows)
            run.log.info("%s: DH %.4f, DH-R %.4f, F1 %.3f", name, row["dh"], row["dh_r"], row["f1"])
        else:
            compare_rows.append(result)
            run.update(methods=compare_rows)

    results = session.map(["baselines", *radii, *compared], work, report)
    learned = {r: results[name]["weights"] for name, r in radii.items()}
    run.save(
        {"weights": learned, "corrupted": data["corrupted"].cpu()},
        "weights.pt",
    )
    plot_weights(run, learned, data)
    plot_curves(run, {r: results[name]["history"] for name, r in radii.items()})


EXPERIMENT = Experiment(
    name="hyperclean",
    summary="Data hyper-cleaning on MNIST: learn per-example weights that discard noisy labels.",
    config=HypercleanConfig,
    presets=PRESETS,
    run=run_experiment,
    identity=partial(stages.identity, "hyperclean"),
)
