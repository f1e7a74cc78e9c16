"""The impact of T: f_T against the exact f (Franceschi et al. 2018, first experiment).

Data: `classes` Omniglot characters drawn with the seed (no rotations); per character, its 20
drawings are shuffled into 3 training, 3 validation and 14 test images. The paper used 15 test
images per class, but a character has only 20 drawings, so 3 + 3 + 14 is all there is.

Fixed features: the 784 raw pixels in [0, 1], centred by the mean training image.
Hyperparameter: a linear representation lambda, a 784 x `features` matrix (d = 64 by default),
drawn once with the seed (entries N(0, 1/784)) and shared as lambda_0 by every run. It is kept in
a Frobenius ball (`radius`): the theory asks for a compact Lambda, and a bounded lambda bounds
the curvature of the inner problem. Each result reports `smoothness`, an upper bound L on that
curvature at its lambda: inner_lr * L < 2 guarantees that gradient descent converges.

Inner problem: a linear softmax classifier (W, b) on the features x lambda, mean training
cross-entropy plus (l2 / 2)(|W|^2 + |b|^2), strongly convex in (W, b). Outer objective: the mean
validation cross-entropy.

- T in `horizons`: w_T is T steps of gradient descent from zero; Adam minimises f_T(lambda) =
  E(w_T) with reverse-mode hypergradients.
- exact: the inner problem is solved at every lambda until |grad L| <= `exact_tolerance`
  (heavy-ball, warm-started from the previous solution) and the hypergradient of f is implicit,
  by conjugate gradient, exact up to its tolerance since the Hessian is positive definite.

Every run starts from lambda_0 and takes the same number of hyper-iterations. Its result
lambda_T is then evaluated on the exact problem: f(lambda_T) = E(w_{lambda_T}) with the inner
problem solved to tolerance from zero, the test accuracy of w_{lambda_T}, and, for comparison,
f_T(lambda_T) and the test accuracy of the T-step classifier w_T(lambda_T).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor
from torch.nn import functional as F

import bilevel

from .. import plots
from ..data import load_omniglot
from ..plots import Curve, Panel
from . import Experiment, stages
from .common import accuracy, linear_logits, seed_everything, zero_linear
from .config import MEMORY_HELP, StagedConfig
from .stages import HyperSteps

CHARACTERS, DRAWINGS, PIXELS = 1623, 20, 28 * 28
EXACT = "exact"


class ConvergenceConfig(StagedConfig):
    classes: int = Field(
        100, ge=2, le=CHARACTERS, description="Omniglot characters, one class each"
    )
    train_shots: int = Field(3, gt=0, description="training drawings per class")
    val_shots: int = Field(3, gt=0, description="validation drawings per class")
    test_shots: int = Field(14, gt=0, description="test drawings per class")
    features: int = Field(
        64, gt=0, description="features of the learned linear representation of the 784 pixels"
    )
    radius: float = Field(
        16.0,
        gt=0,
        description="bound on the size (Frobenius norm) of the representation matrix; it starts "
        "near the square root of features",
    )
    l2: float = Field(
        0.01, gt=0, description="L2 penalty of the classifier (makes its training converge)"
    )
    inner_lr: float = Field(1.0, gt=0, description="learning rate of the classifier's training")
    horizons: list[int] = Field(
        [1, 5, 10, 50, 100, 500],
        min_length=1,
        description="numbers of training steps of the classifier to compare: one run each",
    )
    exact: bool = Field(
        True,
        description="also run with the classifier trained to convergence (implicit hypergradient)",
    )
    memory: Literal["graph", "trajectory", "checkpoint"] = Field("graph", description=MEMORY_HELP)
    hyper_lr: float = Field(0.003, gt=0, description="learning rate of Adam on the representation")
    hyper_iterations: int = Field(
        500, gt=0, description="updates of the representation in each run"
    )
    exact_tolerance: float = Field(
        1e-5, gt=0, description="gradient norm at which the classifier counts as converged"
    )
    exact_max_steps: int = Field(
        50000, gt=0, description="training steps allowed to reach exact_tolerance"
    )
    cg_iterations: int = Field(
        200, gt=0, description="conjugate-gradient iterations of the exact run's hypergradient"
    )
    cg_tolerance: float = Field(
        1e-6, gt=0, description="relative residual at which conjugate gradient stops"
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="floating-point precision")

    @field_validator("horizons")
    @classmethod
    def _positive_distinct(cls, horizons: list[int]) -> list[int]:
        if any(t <= 0 for t in horizons):
            raise ValueError("every T must be a positive integer")
        if len(set(horizons)) != len(horizons):
            raise ValueError("the values of T must be distinct")
        return sorted(horizons)

    @model_validator(mode="after")
    def _enough_drawings(self):
        used = self.train_shots + self.val_shots + self.test_shots
        if used > DRAWINGS:
            raise ValueError(
                f"train_shots + val_shots + test_shots = {used} exceeds the {DRAWINGS} "
                "drawings of an Omniglot character"
            )
        return self


PRESETS = {
    "paper": {},
    "quick": {
        "classes": 20,
        "features": 32,
        "radius": 11.0,
        "horizons": [1, 5, 20],
        "hyper_lr": 0.01,
        "hyper_iterations": 40,
    },
}


# --- data and problem -----------------------------------------------------------------------------


def make_data(config: ConvergenceConfig, data_dir: Path | None, generator: torch.Generator):
    """Seeded characters and drawings, flattened to centred pixels: {train,val,test}_{x,y}."""
    omniglot = load_omniglot(data_dir)
    characters = torch.randperm(CHARACTERS, generator=generator)[: config.classes].sort().values
    images = torch.from_numpy(omniglot.images[characters.numpy()])  # [classes, 20, 28, 28]
    order = torch.rand(config.classes, DRAWINGS, generator=generator).argsort(1)
    pixels = images.gather(1, order[:, :, None, None].expand_as(images)).reshape(
        config.classes, DRAWINGS, PIXELS
    )
    dtype, device = getattr(torch, config.dtype), torch.device(config.device)
    pixels = pixels.to(dtype) / 255
    bounds = [0, *accumulate((config.train_shots, config.val_shots, config.test_shots))]
    data = {"characters": characters}
    for part, start, stop in zip(("train", "val", "test"), bounds, bounds[1:]):
        data[f"{part}_x"] = pixels[:, start:stop].reshape(-1, PIXELS)
        data[f"{part}_y"] = torch.arange(config.classes).repeat_interleave(stop - start)
    mean = data["train_x"].mean(0)
    for part in ("train", "val", "test"):
        data[f"{part}_x"] = (data[f"{part}_x"] - mean).to(device)
        data[f"{part}_y"] = data[f"{part}_y"].to(device)
    return data


def problem(data: dict, l2: float):
    """Inner: training cross-entropy of (W, b) on x lambda, plus L2; outer: validation CE."""

    def inner(params, hparams):
        logits = linear_logits(params, data["train_x"] @ hparams["representation"])
        penalty = sum(w.square().sum() for w in params.values())
        return F.cross_entropy(logits, data["train_y"]) + l2 / 2 * penalty

    def outer(params, hparams):
        logits = linear_logits(params, data["val_x"] @ hparams["representation"])
        return F.cross_entropy(logits, data["val_y"])

    return inner, outer


@dataclass(frozen=True)
class FrobeniusBall:
    """Projection onto {lambda : |lambda|_F <= radius}."""

    radius: float

    def __call__(self, x: Tensor) -> Tensor:
        return x * (self.radius / x.norm()).clamp(max=1.0)


def initial_representation(config: ConvergenceConfig, generator: torch.Generator) -> Tensor:
    representation = torch.randn(PIXELS, config.features, generator=generator) / PIXELS**0.5
    representation = FrobeniusBall(config.radius)(representation)
    return representation.to(getattr(torch, config.dtype)).to(config.device)


def gradient_norm(inner, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> float:
    """|grad_w L_lambda(w)|: zero exactly at w_lambda."""
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        lam = {k: v.detach() for k, v in hparams.items()}
        grads = torch.autograd.grad(inner(leaves, lam), list(leaves.values()))
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads)))


class ExactInner:
    """w_lambda, the inner minimiser, to |grad L| <= tolerance.

    Heavy-ball steps (momentum 0.9: about ten times faster than plain gradient descent on this
    ill-conditioned problem) in chunks, each followed by a check of the gradient norm; each call
    starts from the previous solution, since lambda moves little between hyper-iterations.
    A callable of the hyperparameters, so it serves as Phi_0 of a HyperOptimizer: the implicit
    hypergradient depends on w_lambda only, not on how it was reached.
    """

    def __init__(self, inner, start, lr, tolerance, max_steps, chunk=100):
        self.inner, self.last = inner, start
        self.dynamics = bilevel.sgd(lr=lr, momentum=0.9)
        self.tolerance, self.max_steps, self.chunk = tolerance, max_steps, chunk
        self.steps = 0  # inner steps taken by all calls so far
        self.unread = 0  # of which not yet reported (take())
        self.gradient_norm = float("inf")

    def __call__(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        lam = {k: v.detach() for k, v in hparams.items()}
        params, steps = self.last, 0
        self.gradient_norm = gradient_norm(self.inner, params, lam)
        while self.gradient_norm > self.tolerance:
            if steps >= self.max_steps:
                raise bilevel.BilevelError(
                    f"the inner problem did not reach |grad L| <= {self.tolerance:g} in "
                    f"{self.max_steps} steps (at {self.gradient_norm:.2e}): raise "
                    "exact_max_steps or exact_tolerance"
                )
            with torch.no_grad():
                params = bilevel.solve(self.inner, params, lam, self.dynamics, self.chunk)
            steps += self.chunk
            self.gradient_norm = gradient_norm(self.inner, params, lam)
        self.last, self.steps, self.unread = params, self.steps + steps, self.unread + steps
        return params

    def take(self) -> int:
        """The inner steps taken since the last call of take()."""
        taken, self.unread = self.unread, 0
        return taken

    def state_dict(self) -> dict:
        """Where the next solve starts from, and the steps taken so far."""
        return {"last": self.last, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.last.values())).device
        self.last = {k: v.to(device) for k, v in state["last"].items()}
        self.steps, self.unread = state["steps"], 0


# --- optimising lambda for one T, or exactly ----------------------------------------------------


def zero_classifier(config: ConvergenceConfig, like: Tensor) -> dict[str, Tensor]:
    """w_0 = 0, in the dtype and on the device of `like`."""
    start = zero_linear(config.features, config.classes, like.device)
    return {k: v.to(like.dtype) for k, v in start.items()}


def exact_solver(config: ConvergenceConfig, data: dict, inner) -> ExactInner:
    start = zero_classifier(config, data["train_x"])
    return ExactInner(inner, start, config.inner_lr, config.exact_tolerance, config.exact_max_steps)


def hyper_optimizer(config, data, representation: Tensor, horizon: int | None):
    """Adam on lambda, in the Frobenius ball; returns (loop, the exact solver or None).

    With a horizon: reverse mode through T steps from zero. Exact: w_0 = w_lambda, one gradient
    step (which leaves w_lambda where it is) and implicit CG.
    """
    inner, outer = problem(data, config.l2)
    common = {
        "inner": inner,
        "outer": outer,
        "hparams": {"representation": representation},
        "dynamics": bilevel.sgd(lr=config.inner_lr),
        "optimizer": torch.optim.Adam([representation], lr=config.hyper_lr),
        "constraints": {"representation": FrobeniusBall(config.radius)},
    }
    if horizon is None:
        solver = exact_solver(config, data, inner)
        options = {"iterations": config.cg_iterations, "tolerance": config.cg_tolerance}
        loop = bilevel.HyperOptimizer(
            params=solver, steps=1, method="implicit-cg", **options, **common
        )
        return loop, solver
    start = zero_classifier(config, representation)
    loop = bilevel.HyperOptimizer(
        params=start, steps=horizon, method="reverse", memory=config.memory, **common
    )
    return loop, None


def optimise(config, data, representation_0: Tensor, horizon: int | None, stage) -> tuple:
    """`hyper_iterations` steps from lambda_0, continued from the stage's checkpoint if it was
    interrupted; returns (lambda_T, history, seconds of its hyper-iterations)."""
    representation = representation_0.clone().requires_grad_(True)
    loop, solver = hyper_optimizer(config, data, representation, horizon)
    if solver is not None:
        solver.take()  # each line counts the steps of its own hyper-iteration

    def line(metrics: dict) -> dict:
        if solver is not None:
            metrics["inner_steps"] = solver.take()
            metrics["inner_gradient_norm"] = solver.gradient_norm
        norm = float(representation.detach().norm())
        return {"run": stage.name, "T": horizon, **metrics, "representation_norm": norm}

    stage.loop(HyperSteps(loop, line, extra=solver), config.hyper_iterations)
    seconds = sum(m["seconds"] for m in loop.history)
    return representation.detach(), loop.history, seconds


def label_of(horizon: int | None) -> str:
    return EXACT if horizon is None else f"T={horizon}"


# --- evaluation on the exact problem -------------------------------------------------------------


def smoothness(features: Tensor, l2: float) -> float:
    """An upper bound on the Lipschitz constant of grad L_lambda, for every w.

    The logits are A theta with A = [x lambda, 1], and the softmax cross-entropy's Hessian in the
    logits is at most I / 2 (Boehning 1992), so L <= |A|_2^2 / (2 n) + l2. Gradient descent
    converges from any start when inner_lr * L < 2.
    """
    design = torch.cat([features, torch.ones_like(features[:, :1])], 1)
    return float(torch.linalg.matrix_norm(design, 2)) ** 2 / (2 * len(features)) + l2


def evaluate(config, data, representation: Tensor, horizon: int | None) -> dict:
    """f(lambda) and test accuracy at w_lambda solved from zero; f_T and the T-step classifier's
    test accuracy for a run with a horizon."""
    inner, outer = problem(data, config.l2)
    lam = {"representation": representation}
    solver = exact_solver(config, data, inner)
    start = solver.last
    exact = solver(lam)
    test_features = data["test_x"] @ representation
    row = {
        "run": label_of(horizon),
        "T": horizon,
        "f": float(outer(exact, lam)),
        "test_accuracy": accuracy(exact, test_features, data["test_y"]),
        "inner_gradient_norm": solver.gradient_norm,
        "exact_inner_steps": solver.steps,
        "smoothness": smoothness(data["train_x"] @ representation, config.l2),
    }
    if horizon is not None:
        with torch.no_grad():
            w_T = bilevel.solve(inner, start, lam, bilevel.sgd(lr=config.inner_lr), horizon)
            row["f_T"] = float(outer(w_T, lam))
        row["test_accuracy_T"] = accuracy(w_T, test_features, data["test_y"])
    return row


# --- outputs --------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    """The summary as aligned text: one line per run."""
    lines = [
        f"{'run':>7} {'f_T(l_T)':>9} {'f(l_T)':>8} {'test acc':>8} {'acc T-step':>10} "
        f"{'seconds':>8}"
    ]
    for row in rows:
        f_T = f"{row['f_T']:9.4f}" if "f_T" in row else f"{'-':>9}"
        acc_T = f"{row['test_accuracy_T']:10.4f}" if "test_accuracy_T" in row else f"{'-':>10}"
        lines.append(
            f"{row['run']:>7} {f_T} {row['f']:8.4f} {row['test_accuracy']:8.4f} {acc_T} "
            f"{row['seconds']:8.1f}"
        )
    return "\n".join(lines)


def plot_against_T(run, rows: list[dict], key: str, key_T: str, ylabel: str, name: str) -> None:
    """`key` at each run's lambda_T against T (log axis); the exact run's as a horizontal line."""
    runs = [r for r in rows if r["T"] is not None]
    horizons = [r["T"] for r in runs]
    curves = [
        Curve("inner solved exactly at lambda_T", horizons, [r[key] for r in runs], "o-"),
        Curve("T inner steps at lambda_T", horizons, [r[key_T] for r in runs], "s--"),
    ]
    exact = [r[key] for r in rows if r["T"] is None]
    lines = {"lambda of the exact problem": exact[0]} if exact else {}
    xlabel = "T (inner steps while lambda was optimised)"
    panel = Panel(curves, xlabel, ylabel, xscale="log", lines=lines)
    run.plot(plots.figure([panel]), name)


def plot_curves(run, histories: dict[str, list[dict]]) -> None:
    run.plot(plots.figure([plots.histories(histories, "f_T (exact: f)")]), "outer_loss")


def run_experiment(config: ConvergenceConfig, run, data_dir: Path | None) -> None:
    """Stages: one per horizon T, and the exact problem (bilevel.app.experiments.stages), on
    the driver ``run``."""
    session = stages.Stages(run)
    generator = seed_everything(config.seed)
    data = make_data(config, data_dir, generator)
    representation_0 = initial_representation(config, generator)
    run.update(characters=data.pop("characters").tolist())
    run.log.info(
        "data: %d classes, %d/%d/%d train/validation/test drawings each; lambda: %d x %d",
        config.classes,
        config.train_shots,
        config.val_shots,
        config.test_shots,
        PIXELS,
        config.features,
    )
    initial = evaluate(config, data, representation_0, None)
    run.update(initial={"f": initial["f"], "test_accuracy": initial["test_accuracy"]})
    horizons = {label_of(h): h for h in [*config.horizons, *([None] if config.exact else [])]}
    rows = []

    def work(label, stage):
        horizon = horizons[label]
        representation, history, seconds = optimise(config, data, representation_0, horizon, stage)
        row = {**evaluate(config, data, representation, horizon), "seconds": seconds}
        return {"row": row, "history": history, "representation": representation}

    def report(label, result):
        row = result["row"]
        rows.append(row)
        run.update(rows=rows)
        run.log.info(
            "%s: f(lambda_T) %.4f, test accuracy %.4f (%.0f s)",
            label,
            row["f"],
            row["test_accuracy"],
            row["seconds"],
        )

    results = session.map(horizons, work, report)
    representations = {"initial": representation_0.cpu()}
    representations.update({label: r["representation"] for label, r in results.items()})
    run.save(representations, "representations.pt")
    if any(r["T"] is not None for r in rows):
        plot_against_T(
            run, rows, "f", "f_T", "outer objective (validation loss)", "outer_objective"
        )
        plot_against_T(run, rows, "test_accuracy", "test_accuracy_T", "test accuracy", "accuracy")
    plot_curves(run, {label: r["history"] for label, r in results.items()})
    run.log.info("results:\n%s", table(rows))


EXPERIMENT = Experiment(
    name="convergence",
    summary="Impact of T on Omniglot: optimise a linear representation for f_T and for the "
    "exact f, and compare them on the exact problem.",
    config=ConvergenceConfig,
    presets=PRESETS,
    run=run_experiment,
    identity=partial(stages.identity, "convergence"),
)
