"""Learning rate, momentum and weight decay of an MLP on MNIST by forward-mode hypergradients.

An MLP 784-300-10 (ReLU) is trained by T steps of minibatch SGD with heavy-ball momentum and
coupled weight decay, from one fixed initialisation w_0 and one fixed, seeded sequence of
minibatches (batch t is row t of a precomputed index tensor), so the objective
f_T(lambda) = validation cross-entropy of w_T is a deterministic function of the three
hyperparameters. They are learned as unconstrained scalars (log lr, logit of the momentum,
log weight decay) by Adam on forward-mode hypergradients (Franceschi et al. 2017), three ways:

- restart: each hyper-iteration trains from w_0 for T steps (the gradient of f_T itself);
- real-time: one long run, an update every `every` inner steps from the running tangents
  (RTHO); its minibatches go on through the data, epoch after epoch;
- warm: each hyper-iteration continues from the previous w_T (optimiser state reset).

Every mode's hyperparameters are then judged by the same criterion: retrain from w_0 for T steps
and take the validation loss f_T (and the test accuracy of that model). Random search, the
alternative most users would try, samples lr log-uniformly, momentum uniformly and weight decay
log-uniformly, trains by the same code path (bilevel.solve under no_grad) and is compared at the
wall time each gradient mode took, and also at its CPU time (on a shared machine wall time
charges a method for others' load). Random search's number of trials depends on these timings,
so only its numbers vary between runs of one seed.

The paper preset (10000 train / 5000 validation examples, batch 100, T = 200, 40
hyper-iterations with Adam at 0.2, an update every 20 steps in real time) is a setting of this
scale chosen here, not a table reproduced from the paper. All modes start from lr 0.01,
momentum 0.5, weight decay 1e-4.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

import bilevel

from .. import plots
from ..data import load_mnist
from ..plots import Curve, Panel
from . import Experiment, stages
from .common import seed_everything
from .config import StagedConfig
from .stages import HyperSteps

CLASSES = 10
FEATURES = 784
Mode = Literal["restart", "real-time", "warm"]
NAMES = ("lr", "momentum", "weight_decay")


class HparamsConfig(StagedConfig):
    train: int = Field(10000, gt=0, description="training examples (MNIST training set)")
    validation: int = Field(5000, gt=0, description="validation examples (MNIST training set)")
    test: int = Field(10000, gt=0, le=10000, description="test examples (MNIST test set)")
    hidden: int = Field(300, gt=0, description="hidden units of the network (one hidden layer)")
    batch_size: int = Field(100, gt=0, description="training examples per SGD step")
    inner_steps: int = Field(200, gt=0, description="SGD steps per training run")
    init_lr: float = Field(0.01, gt=0, description="starting learning rate")
    init_momentum: float = Field(0.5, gt=0, lt=1, description="starting momentum")
    init_weight_decay: float = Field(1e-4, gt=0, description="starting weight decay")
    modes: list[Mode] = Field(
        ["restart", "real-time", "warm"],
        min_length=1,
        description="how the hyperparameters are learned. restart: each update trains from the "
        "start; real-time: updates during one long training run; warm: each training continues "
        "from the last one's network",
    )
    hyper_lr: float = Field(
        0.2,
        gt=0,
        description="learning rate of Adam on the hyperparameters (as the logarithms of lr and "
        "weight decay and the logit of momentum)",
    )
    hyper_iterations: int = Field(
        40, gt=0, description="hyperparameter updates in the restart and warm modes"
    )
    every: int = Field(
        20, gt=0, description="real-time mode: SGD steps between hyperparameter updates"
    )
    real_time_steps: int | None = Field(
        None,
        gt=0,
        description="SGD steps of the real-time run (none: hyper_iterations * inner_steps)",
    )
    real_time_hyper_lr: float | None = Field(
        None,
        gt=0,
        description="learning rate of Adam in the real-time mode (none: hyper_lr * every / "
        "inner_steps)",
    )
    random_search: bool = Field(
        True, description="also run random search, for as long as each mode took"
    )
    lr_range: tuple[float, float] = Field(
        (1e-3, 1.0), description="random search's learning rates: [low, high], log-uniform"
    )
    momentum_range: tuple[float, float] = Field(
        (0.0, 0.99), description="random search's momenta: [low, high], uniform"
    )
    weight_decay_range: tuple[float, float] = Field(
        (1e-6, 1e-2), description="random search's weight decays: [low, high], log-uniform"
    )
    curve_points: int = Field(
        12, ge=2, description="hyperparameters along each mode's path retrained for the plots"
    )

    @field_validator("modes")
    @classmethod
    def _distinct(cls, modes: list[str]) -> list[str]:
        if len(set(modes)) != len(modes):
            raise ValueError("each mode at most once")
        return modes

    @field_validator("lr_range", "momentum_range", "weight_decay_range")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError("expected [low, high] with low < high")
        return bounds

    @model_validator(mode="after")
    def _consistent(self):
        if self.train + self.validation > 60000:
            raise ValueError("train + validation must be at most 60000 (the MNIST training set)")
        if self.batch_size > self.train:
            raise ValueError(f"batch_size={self.batch_size} exceeds train={self.train}")
        if self.lr_range[0] <= 0 or self.weight_decay_range[0] <= 0:
            raise ValueError("lr_range and weight_decay_range must be positive (log-uniform)")
        if self.momentum_range[0] < 0 or self.momentum_range[1] >= 1:
            raise ValueError("momentum_range must lie in [0, 1)")
        if "real-time" in self.modes and self.every > self.total_real_time_steps:
            raise ValueError(
                f"every={self.every} exceeds real_time_steps={self.total_real_time_steps}"
            )
        return self

    @property
    def total_real_time_steps(self) -> int:
        return self.real_time_steps or self.hyper_iterations * self.inner_steps


PRESETS = {
    "paper": {},
    "quick": {
        "train": 2000,
        "validation": 1000,
        "test": 2000,
        "inner_steps": 50,
        "hyper_lr": 0.3,
        "hyper_iterations": 10,
        "every": 10,
        "curve_points": 6,
    },
}


# -- data, model, objectives --------------------------------------------------------------------
def make_data(config: HparamsConfig, data_dir: Path | None, generator: torch.Generator):
    """Disjoint train and validation draws from the MNIST training set; a test-set draw."""
    mnist = load_mnist(data_dir)
    images, labels = mnist["train"]
    order = torch.randperm(len(labels), generator=generator)
    train, val = order[: config.train], order[config.train : config.train + config.validation]
    test_images, test_labels = mnist["test"]
    test = torch.randperm(len(test_labels), generator=generator)[: config.test]
    device = torch.device(config.device)

    def pixels(x):
        return (x.reshape(len(x), -1).float() / 255).to(device)

    return {
        "train_x": pixels(images[train]),
        "train_y": labels[train].to(device),
        "val_x": pixels(images[val]),
        "val_y": labels[val].to(device),
        "test_x": pixels(test_images[test]),
        "test_y": test_labels[test].to(device),
    }


def minibatches(train: int, batch_size: int, rows: int, generator: torch.Generator):
    """[rows, batch_size] example indices: batches of successive shuffled epochs."""
    per_epoch = train // batch_size
    epochs = -(-rows // per_epoch)
    order = torch.cat([torch.randperm(train, generator=generator) for _ in range(epochs)])
    return order[: epochs * per_epoch * batch_size].reshape(-1, batch_size)[:rows]


def make_model(hidden: int, device, dtype=torch.float32):
    """(w_0, apply) of the MLP 784-hidden-10, initialised by torch's default (seeded) init."""
    module = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
    return bilevel.functional(module.to(device=device, dtype=dtype))


def objectives(data, apply, batches):
    """Inner: cross-entropy of minibatch t (pure in t, so forward mode and replays agree);
    outer: cross-entropy on the whole validation set."""

    def inner(params, hparams, t):
        rows = batches[(t - 1) % len(batches)]
        return F.cross_entropy(apply(params, data["train_x"][rows]), data["train_y"][rows])

    def outer(params, hparams):
        return F.cross_entropy(apply(params, data["val_x"]), data["val_y"])

    return inner, outer


def dynamics() -> bilevel.Dynamics:
    """SGD whose settings are functions of the unconstrained hyperparameters."""
    return bilevel.sgd(
        lr=lambda h: h["log_lr"].exp(),
        momentum=lambda h: torch.sigmoid(h["momentum_logit"]),
        weight_decay=lambda h: h["log_wd"].exp(),
    )


def unconstrained(lr: float, momentum: float, weight_decay: float, device, dtype=torch.float32):
    """Leaf tensors (requiring grad) of the hyperparameters in the space Adam works in."""
    values = {
        "log_lr": math.log(lr),
        "momentum_logit": math.log(momentum / (1 - momentum)),
        "log_wd": math.log(weight_decay),
    }
    return {
        k: torch.tensor(v, device=device, dtype=dtype, requires_grad=True)
        for k, v in values.items()
    }


def initial_values(config: HparamsConfig) -> dict[str, float]:
    return {
        "lr": config.init_lr,
        "momentum": config.init_momentum,
        "weight_decay": config.init_weight_decay,
    }


def readable(hparams) -> dict[str, float]:
    """lr, momentum and weight decay as numbers."""
    return {
        "lr": float(hparams["log_lr"].detach().exp()),
        "momentum": float(torch.sigmoid(hparams["momentum_logit"].detach())),
        "weight_decay": float(hparams["log_wd"].detach().exp()),
    }


class Task:
    """Everything one run needs: data, w_0, minibatches, objectives, the retraining criterion."""

    def __init__(self, config: HparamsConfig, data, generator: torch.Generator):
        self.config, self.data = config, data
        self.params, self.apply = make_model(config.hidden, data["train_x"].device)
        rows = config.inner_steps
        if "real-time" in config.modes:
            rows = max(rows, config.total_real_time_steps)
        self.batches = minibatches(config.train, config.batch_size, rows, generator)
        self.batches = self.batches.to(data["train_x"].device)
        self.inner, self.outer = objectives(data, self.apply, self.batches)

    def start(self, values: dict[str, float]):
        return unconstrained(**values, device=self.data["train_x"].device)

    def train(self, values: dict[str, float]):
        """w_T from w_0 with these hyperparameters, no graph; None if the run diverges."""
        hparams = {k: v.detach() for k, v in self.start(values).items()}
        try:
            with torch.no_grad():
                return bilevel.solve(
                    self.inner, self.params, hparams, dynamics(), self.config.inner_steps
                )
        except bilevel.InnerDivergenceError:
            return None

    def validation_loss(self, values: dict[str, float], params=None) -> float:
        """f_T: the criterion every mode and random search are judged by (inf if diverged)."""
        params = self.train(values) if params is None else params
        if params is None:
            return math.inf
        with torch.no_grad():
            loss = float(self.outer(params, {}))
        return loss if math.isfinite(loss) else math.inf

    def judge(self, values: dict[str, float]) -> dict:
        """Validation loss f_T and the test accuracy of that same w_T (never used to choose)."""
        params = self.train(values)
        row = {**values, "val_loss": finite(self.validation_loss(values, params))}
        row["test_accuracy"] = None
        if row["val_loss"] is not None:
            with torch.no_grad():
                predicted = self.apply(params, self.data["test_x"]).argmax(1)
            row["test_accuracy"] = float((predicted == self.data["test_y"]).float().mean())
        return row


# -- the gradient-based modes -------------------------------------------------------------------
class Stopwatch:
    """Wall and CPU seconds since it started. The machine may be shared: wall time then charges
    a method for others' load, while the process's CPU time is the compute it actually got."""

    def __init__(self, since: dict[str, float] | None = None):
        since = since or {"elapsed": 0.0, "cpu": 0.0}  # a resumed mode's time before the kill
        self.wall = time.perf_counter() - since["elapsed"]
        self.cpu = time.process_time() - since["cpu"]

    def read(self) -> dict[str, float]:
        return {"elapsed": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def warm_up(task: Task) -> None:
    """One untimed forward-mode step: torch.func's first calls cost seconds, which would
    otherwise be charged to whichever mode runs first."""
    hparams = task.start(initial_values(task.config))
    bilevel.hypergradient(
        task.inner, task.outer, task.params, hparams, dynamics(), 1, method="forward"
    )


def hyper_optimizer(task: Task, mode: str, hparams):
    config = task.config
    if mode == "real-time":
        rate = config.real_time_hyper_lr or config.hyper_lr * config.every / config.inner_steps
        return bilevel.RealTimeHyperOptimizer(
            task.inner,
            task.outer,
            task.params,
            hparams,
            dynamics(),
            config.every,
            torch.optim.Adam(list(hparams.values()), lr=rate),
        )
    return bilevel.HyperOptimizer(
        task.inner,
        task.outer,
        task.params,
        hparams,
        dynamics(),
        config.inner_steps,
        torch.optim.Adam(list(hparams.values()), lr=config.hyper_lr),
        method="forward",
        warm_start=mode == "warm",
    )


class Trajectory:
    """A mode's hyperparameters after each update, with the wall and CPU time since the mode
    began and the inner steps taken: the state a mode keeps beside its hyper-optimiser."""

    def __init__(self, initial: dict[str, float]):
        self.points = [{"elapsed": 0.0, "cpu": 0.0, "inner_step": 0, **initial}]
        self.clock = Stopwatch()

    def add(self, inner_step: int, hparams) -> dict:
        """The point after an update (appended): where random search is compared."""
        self.points.append({**self.clock.read(), "inner_step": inner_step, **readable(hparams)})
        return self.points[-1]

    def state_dict(self) -> dict:
        return {"trajectory": self.points, "clock": self.clock.read()}

    def load_state_dict(self, state: dict) -> None:
        self.points, self.clock = state["trajectory"], Stopwatch(state["clock"])


def learn(task: Task, mode: str, stage) -> dict:
    """Run one mode, continued from the stage's checkpoint if it was interrupted; returns its
    trajectory (hyperparameters after each update, with the wall time and inner steps at which
    they were reached) and how it ended."""
    config = task.config
    initial = initial_values(config)
    hparams = task.start(initial)
    if mode == "real-time":
        updates = config.total_real_time_steps // config.every
    else:
        updates = config.hyper_iterations
    loop, trajectory = hyper_optimizer(task, mode, hparams), Trajectory(initial)

    def line(metrics: dict) -> dict:
        inner_step = metrics.get("inner_step", metrics["iteration"] * config.inner_steps)
        return {"mode": mode, **metrics, **trajectory.add(inner_step, hparams)}

    diverging = (bilevel.InnerDivergenceError, bilevel.HypergradientError)
    steps = HyperSteps(loop, line, ("outer_loss", "lr"), trajectory, diverging, unit="update")
    stage.loop(steps, updates, unit="update")
    points, status = trajectory.points, steps.status or "completed"
    # On divergence the last update produced hyperparameters that cannot train; keep the
    # last ones whose run completed.
    last = points[-2] if status != "completed" and len(points) > 1 else points[-1]
    return {
        "mode": mode,
        "status": status,
        **trajectory.clock.read(),
        "history": loop.history,
        "trajectory": points,
        "final": pick(last),
    }


# -- random search ------------------------------------------------------------------------------
def sample(config: HparamsConfig, generator: torch.Generator) -> dict[str, float]:
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()

    def log_uniform(bounds, x):
        low, high = math.log(bounds[0]), math.log(bounds[1])
        return math.exp(low + x * (high - low))

    low, high = config.momentum_range
    return {
        "lr": log_uniform(config.lr_range, u[0]),
        "momentum": low + u[1] * (high - low),
        "weight_decay": log_uniform(config.weight_decay_range, u[2]),
    }


def random_search(task: Task, budget: dict, generator: torch.Generator, stage) -> list[dict]:
    """Trials until both budgets (wall and CPU seconds) are spent; each with the best so far."""
    trials, best = [], math.inf
    clock = Stopwatch()
    while any(clock.read()[key] < limit for key, limit in budget.items()):
        values = sample(task.config, generator)
        loss = task.validation_loss(values)
        best = min(best, loss)
        trial = {
            "trial": len(trials) + 1,
            **values,
            "val_loss": finite(loss),
            **clock.read(),
            "best_val_loss": finite(best),
        }
        stage.metrics(mode="random", **trial)
        trials.append(trial | {"loss": loss})
    return trials


def within(trials: list[dict], seconds: float, clock: str = "elapsed") -> list[dict]:
    """The trials finished within `seconds` of wall time ("elapsed") or CPU time ("cpu")."""
    return [t for t in trials if t[clock] <= seconds]


def best_of(trials: list[dict]) -> dict | None:
    done = [t for t in trials if math.isfinite(t["loss"])]
    return min(done, key=lambda t: t["loss"]) if done else None


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- report ---------------------------------------------------------------------------------------
def curve(task: Task, trajectory: list[dict], points: int) -> list[dict]:
    """f_T at up to `points` hyperparameters along a trajectory (first and last included)."""
    last, count = len(trajectory) - 1, min(points, len(trajectory))
    chosen = sorted({round(i * last / max(count - 1, 1)) for i in range(count)})
    return [
        {
            "elapsed": trajectory[i]["elapsed"],
            "cpu": trajectory[i]["cpu"],
            "val_loss": finite(task.validation_loss(pick(trajectory[i]))),
        }
        for i in chosen
    ]


def mode_row(task: Task, result: dict, trials: list[dict] | None) -> dict:
    row = {
        "mode": result["mode"],
        "status": result["status"],
        "updates": len(result["history"]),
        "inner_steps": result["trajectory"][-1]["inner_step"],
        "seconds": result["elapsed"],
        "cpu_seconds": result["cpu"],
        **task.judge(result["final"]),
    }
    if trials is None:
        return row
    for suffix, clock in (("", "elapsed"), ("_equal_cpu", "cpu")):
        done = within(trials, result[clock], clock)
        best = best_of(done)
        row[f"random_trials{suffix}"] = len(done)
        row[f"random{suffix}"] = None if best is None else task.judge(pick(best))
    return row


def pick(values: dict) -> dict[str, float]:
    return {k: values[k] for k in NAMES}


def plot_hyperparameters(run, results, best):
    panels = []
    for name in NAMES:
        curves = [
            Curve(r["mode"], [p["inner_step"] for p in r["trajectory"]],
                  [p[name] for p in r["trajectory"]])
            for r in results
        ]  # fmt: skip
        lines = {} if best is None else {"random search best": best[name]}
        scale = "linear" if name == "momentum" else "log"
        title = name.replace("_", " ")
        panels.append(Panel(curves, "inner steps taken", title=title, yscale=scale, lines=lines))
    run.plot(plots.figure(panels, width=13 / 3), "hyperparameters")


def plot_validation(run, results):
    # update k reports the loss of the w reached by then: trajectory point k (0 = start)
    curves = [
        Curve(r["mode"], [p["inner_step"] for p in r["trajectory"][1:]],
              [m["outer_loss"] for m in r["history"]])
        for r in results
    ]  # fmt: skip
    panel = Panel(curves, "inner steps taken", "validation loss of the current w")
    run.plot(plots.figure([panel], width=5.5), "validation_loss")


def plot_wall_time(run, curves, trials):
    panels = []
    for clock, label in (("elapsed", "wall time"), ("cpu", "CPU time")):
        lines = []
        for mode, points in curves.items():
            shown = [p for p in points if p["val_loss"] is not None]
            losses = [p["val_loss"] for p in shown]
            lines.append(Curve(mode, [p[clock] for p in shown], losses, "o-"))
        shown = [t for t in trials or [] if t["best_val_loss"] is not None]
        if shown:
            times, best = [t[clock] for t in shown], [t["best_val_loss"] for t in shown]
            lines.append(Curve("random search, best so far", times, best, steps=True))
        ylabel = "f_T: validation loss after T steps" if not panels else None
        panels.append(Panel(lines, f"{label} (s)", ylabel, yscale="log"))
    run.plot(plots.figure(panels, width=5.5, sharey=True), "wall_time")


def run_experiment(config: HparamsConfig, run, data_dir: Path | None) -> None:
    """Stages: one per mode, then random search in their time (bilevel.app.experiments.stages),
    on the driver ``run``."""
    session = stages.Stages(run)
    generator = seed_everything(config.seed)
    data = make_data(config, data_dir, generator)
    task = Task(config, data, generator)
    run.log.info(
        "data: %d train, %d validation, %d test; T=%d, batch %d",
        config.train,
        config.validation,
        config.test,
        config.inner_steps,
        config.batch_size,
    )
    run.update(initial=task.judge(initial_values(config)))
    warm_up(task)

    def report(mode, result):
        run.log.info("%s: %s in %.1f s", mode, result["status"], result["elapsed"])

    learned = session.map(config.modes, lambda mode, stage: learn(task, mode, stage), report)
    results = list(learned.values())
    trials = None
    if config.random_search:
        budget = {clock: max(r[clock] for r in results) for clock in ("elapsed", "cpu")}
        generator = torch.Generator().manual_seed(config.seed + 1)
        trials = session.map(
            ["random search"], lambda _, stage: random_search(task, budget, generator, stage)
        )["random search"]
        best = best_of(trials)
        run.update(
            random_search={
                "trials": len(trials),
                "seconds": trials[-1]["elapsed"] if trials else 0.0,
                "cpu_seconds": trials[-1]["cpu"] if trials else 0.0,
                "diverged": sum(not math.isfinite(t["loss"]) for t in trials),
                "best": None if best is None else task.judge(pick(best)),
            }
        )
    rows = []
    for result in results:
        rows.append(mode_row(task, result, trials))
        run.update(rows=rows)
        log_row(run, rows[-1])
    curves = {r["mode"]: curve(task, r["trajectory"], config.curve_points) for r in results}
    run.update(curves=curves)
    best = run.summary.get("random_search", {}).get("best")
    plot_hyperparameters(run, results, best)
    plot_validation(run, results)
    plot_wall_time(run, curves, trials)


def log_row(run, row: dict) -> None:
    run.log.info(
        "%s: lr %.3g, momentum %.3g, wd %.3g -> val %s, test acc %s (%.1f s, %.1f s CPU)",
        row["mode"],
        row["lr"],
        row["momentum"],
        row["weight_decay"],
        rounded(row["val_loss"]),
        rounded(row["test_accuracy"]),
        row["seconds"],
        row["cpu_seconds"],
    )
    for suffix, label in (("", "wall"), ("_equal_cpu", "CPU")):
        if row.get(f"random{suffix}"):
            run.log.info(
                "  random search in the same %s time (%d trials): val %s, test acc %s",
                label,
                row[f"random_trials{suffix}"],
                rounded(row[f"random{suffix}"]["val_loss"]),
                rounded(row[f"random{suffix}"]["test_accuracy"]),
            )


def rounded(value: float | None) -> str:
    """A number of a log line to 4 significant digits; "-" for none (a diverged run)."""
    return "-" if value is None else f"{value:.4g}"


EXPERIMENT = Experiment(
    name="hparams",
    summary="Learn lr, momentum and weight decay of an MLP on MNIST by forward mode "
    "(restart, real-time, warm) against random search at equal wall time.",
    config=HparamsConfig,
    presets=PRESETS,
    run=run_experiment,
    identity=partial(stages.identity, "hparams"),
)
