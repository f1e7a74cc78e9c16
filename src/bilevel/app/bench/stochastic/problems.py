"""The benchmark's problems, their sizes per mode, their data, and their reference values.

Each problem says what it plots (`metric`), the reference that metric is measured against and
the target that the table's time-to-target uses:

- quadratic: h(x) - h*, h* exact (closed form); target 1e-2 of the starting gap.
- ijcnn1, covtype (regularisation selection): h(x) - h*, h(x) by a full solve of the inner
  problem at each evaluation, h* ESTIMATED by a long deterministic run (exact hypergradients,
  gradient descent with Barzilai-Borwein steps; `reference_minimum`), lowered to the best value
  any run reached if one went below it; target 1e-2 of the starting gap.
- cleaning-p (MNIST, a fraction p of training labels wrong): the test accuracy of the iterate
  z; references the accuracy with uniform weights (x = 0) and of the oracle that keeps exactly
  the clean examples (one inner solve each); target: half the way from the first to the second.

The LIBSVM sets are read from --data-dir when there (never downloaded by the benchmark);
otherwise a generated stand-in of the same shape is used and its label says so everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bilevel import stochastic

from ...data import load_libsvm, load_mnist, stand_in
from ...data.libsvm import DATASETS, libsvm_dir

# rows per split, per mode: inner (train), outer (validation), test
SIZES = {
    "quick": {"ijcnn1": (2000, 2000, 0), "covtype": (2000, 2000, 2000),
              "cleaning": (1000, 1000, 2000)},
    "full": {"ijcnn1": (49_990, 91_701, 0), "covtype": (290_506, 145_253, 145_253),
             "cleaning": (20_000, 5_000, 10_000)},
}  # fmt: skip
CORRUPTIONS = (0.5, 0.7, 0.9)
CLEANING_REGULARISATION = 0.01  # on ||W||^2 / 2: a clear gap between weights 1/2 and the oracle
REFERENCE_ITERATIONS = 100  # of the deterministic run that estimates h*
LOG_WEIGHT_BOUND = 20.0  # the reference run stops where a weight is exp(-20) ~ 2e-9
RELATIVE_TARGET = 1e-2  # of h(x0) - h*, for the suboptimality problems


@dataclass
class BenchProblem:
    """A problem as the benchmark runs it.

    `metric` is the evaluation's key the plots and targets read ("suboptimality" or
    "test_accuracy"), `lower_is_better` its direction, `target` the value time-to-target
    waits for, `reference` what the target was derived from, `data` where the data came from.
    """

    name: str
    kind: str  # "quadratic", "regularisation" or "cleaning": the settings table's key
    problem: stochastic.StochasticProblem
    metric: str
    lower_is_better: bool
    data: str
    reference: dict = field(default_factory=dict)
    target: float | None = None
    target_rule: str = ""
    suboptimality: Callable[[dict], float] | None = None

    def describe(self) -> dict:
        """What the report needs of the problem (a "problem" row)."""
        return {
            "type": "problem",
            "name": self.name,
            "data": self.data,
            "metric": self.metric,
            "lower_is_better": self.lower_is_better,
            "reference": self.reference,
            "target": self.target,
            "target_rule": self.target_rule,
        }

    @property
    def settings_key(self) -> str:
        """The key of its settings and budget (bench.stochastic.settings): the cleaning
        problems share theirs (tuned at p = 0.5)."""
        return "cleaning" if self.kind == "cleaning" else self.name

    @property
    def title(self) -> str:
        return f"{self.name} ({self.data})"


def problem_names() -> list[str]:
    return ["quadratic", "ijcnn1", "covtype", *(f"cleaning-{p}" for p in CORRUPTIONS)]


def build(name: str, mode: str, data_dir: Path | None, device: str) -> BenchProblem:
    """The benchmark problem `name` at the `mode`'s size on `device` (float64), without its
    reference values (`attach_reference` adds them)."""
    if name == "quadratic":
        problem = stochastic.QuadraticProblem(device=device)
        return BenchProblem(name, "quadratic", problem, "suboptimality", True, "generated")
    if name in ("ijcnn1", "covtype"):
        return _regularisation(name, mode, data_dir, device)
    if name.startswith("cleaning-"):
        return _cleaning(float(name.removeprefix("cleaning-")), mode, data_dir, device)
    raise ValueError(f"unknown problem {name!r}; choose from {', '.join(problem_names())}")


# -- regularisation selection -------------------------------------------------------------------


def _regularisation(name: str, mode: str, data_dir, device) -> BenchProblem:
    n_train, n_val, n_test = SIZES[mode][name]
    splits, data = _libsvm_splits(name, (n_train, n_val, n_test), data_dir)
    tensors = [t.to(device, torch.float64) if t.is_floating_point() else t.to(device)
               for split in splits for t in split]  # fmt: skip
    train_x, train_y, val_x, val_y, *test = tensors
    test = tuple(test) if n_test else None
    if name == "ijcnn1":
        problem = stochastic.LogisticRegularisation(
            train_x, train_y, val_x, val_y, test=test, log_weights=-2.0
        )
    else:
        problem = stochastic.SoftmaxRegularisation(
            train_x, train_y, val_x, val_y, classes=7, test=test, log_weights=-2.0
        )
    return BenchProblem(name, "regularisation", problem, "suboptimality", True, data)


def _libsvm_splits(name: str, sizes: tuple[int, int, int], data_dir):
    """[(features, labels)] for train, validation and (if sized) test, and the data's label:
    the real files when --data-dir holds any of them (the first rows of the site's splits;
    covtype's one file shuffled with seed 0 and cut; a missing or bad file is an error), else
    a generated stand-in."""
    n_train, n_val, n_test = sizes
    directory = libsvm_dir(data_dir) if data_dir is not None else None
    files = DATASETS[name].files.values()
    if directory is None or not any((directory / f.name).is_file() for f in files):
        rows = {"train": n_train, "val": n_val, "test": n_test}
        made = stand_in(name, {k: v for k, v in rows.items() if v}, seed=0)
        return [made.splits[k] for k in ("train", "val", "test") if rows[k]], made.label
    loaded = load_libsvm(name, data_dir, download=False)  # present: a bad file is an error
    if name == "ijcnn1":  # the site's test file is the validation (outer) data
        train, val = loaded["train"], loaded["test"]
        return [(train[0][:n_train], train[1][:n_train]), (val[0][:n_val], val[1][:n_val])], name
    features, labels = loaded["all"]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    bounds = [0, n_train, n_train + n_val, n_train + n_val + n_test]
    parts = [order[a:b] for a, b in zip(bounds, bounds[1:])]
    return [(features[p], labels[p]) for p in parts], name


# -- data cleaning ------------------------------------------------------------------------------


def _cleaning(corruption: float, mode: str, data_dir, device) -> BenchProblem:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown problem 'cleaning-{corruption:g}'; p is one of {CORRUPTIONS}")
    n_train, n_val, n_test = SIZES[mode]["cleaning"]
    mnist = load_mnist(data_dir)
    order = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))

    def pixels(split, index):
        images, labels = mnist[split]
        return images[index].reshape(len(index), -1).to(device, torch.float64) / 255, labels[
            index
        ].to(device)

    train, val = pixels("train", order[:n_train]), pixels("train", order[n_train:][:n_val])
    test = pixels("test", torch.arange(n_test))
    problem = stochastic.DataCleaning(
        *train, *val, corruption=corruption, regularisation=CLEANING_REGULARISATION,
        classes=10, seed=0, test=test,
    )  # fmt: skip
    return BenchProblem(
        f"cleaning-{corruption:g}", "cleaning", problem, "test_accuracy", False, "MNIST"
    )


# -- references ---------------------------------------------------------------------------------


def attach_reference(bench: BenchProblem, cached: Callable[[str, Callable[[], dict]], dict]):
    """Set `reference`, `target` and `suboptimality` of `bench`; `cached(key, compute)` keeps
    the costly references between runs."""
    problem = bench.problem
    if bench.kind == "quadratic":
        start = float(problem.value(problem.x0)) - problem.minimum
        bench.reference = {"h*": problem.minimum, "how": "closed form", "start_gap": start}
    elif bench.kind == "regularisation":
        bench.reference = cached(f"{bench.title}-minimum", lambda: reference_minimum(problem))
        minimum = bench.reference["h*"]
        bench.suboptimality = lambda metrics: metrics["value"] - minimum
    else:
        bench.reference = cached(f"{bench.title}-accuracies", lambda: cleaning_accuracies(problem))
        low, high = bench.reference["uniform_accuracy"], bench.reference["oracle_accuracy"]
        bench.target = low + 0.5 * (high - low)
        bench.target_rule = "half the way from uniform weights' accuracy to the oracle's"
        return
    bench.target = RELATIVE_TARGET * bench.reference["start_gap"]
    bench.target_rule = f"{RELATIVE_TARGET:g} of h(x0) - h*"


def reference_minimum(problem, iterations: int | None = None, tolerance: float = 1e-8) -> dict:
    """h* estimated by gradient descent on h with exact hypergradients (the inner problem
    solved by Newton-CG, warm-started from the last solution; the linear system by CG) and
    Barzilai-Borwein steps (no log-weight moves by more than 1 a step), from x0, until
    ||grad h|| <= tolerance or after `iterations` (REFERENCE_ITERATIONS) steps; backtracking
    keeps h decreasing. Stops early when h no longer decreases (by 1e-13 of itself) or a
    log-weight passes +-LOG_WEIGHT_BOUND: h may have no minimiser (a weight exp(x_k) -> 0 is
    best), and past that bound the inner problem loses its conditioning. The result is the
    lowest value reached, an estimate from above."""
    iterations = REFERENCE_ITERATIONS if iterations is None else iterations
    x = problem.x0.clone()
    z = problem.inner_solution(x)
    value, gradient = _value(problem, x, z), problem.hypergradient(x, start=z)
    start, rate, steps = value, 1.0, 0
    while steps < iterations:
        steps += 1
        if float(torch.linalg.vector_norm(gradient)) <= tolerance:
            break
        rate = min(rate, 1.0 / float(gradient.abs().max()))  # no log-weight moves by over 1
        while True:
            candidate = x - rate * gradient
            candidate_z = problem.inner_solution(candidate, start=z)
            candidate_value = _value(problem, candidate, candidate_z)
            if candidate_value <= value or rate < 1e-12:
                break
            rate /= 2
        new_gradient = problem.hypergradient(candidate, start=candidate_z)
        if not bool(torch.isfinite(new_gradient).all()):  # a weight underflowed: stop here
            break
        stalled = value - candidate_value <= 1e-13 * abs(value)
        if stalled or float(candidate.abs().max()) > LOG_WEIGHT_BOUND:
            x, value, gradient = candidate, candidate_value, new_gradient
            break
        moved, turned = candidate - x, new_gradient - gradient
        curvature = float(moved @ turned)
        rate = float(moved @ moved) / curvature if curvature > 0 else 2 * rate
        x, z, value, gradient = candidate, candidate_z, candidate_value, new_gradient
    return {
        "h*": value,
        "start_gap": start - value,
        "gradient_norm": float(torch.linalg.vector_norm(gradient)),
        "iterations": steps,
        "largest_log_weight": float(x.abs().max()),
        "how": "gradient descent with exact hypergradients and Barzilai-Borwein steps",
    }


def _value(problem, x, z) -> float:
    return float(problem.outer_value(x, z, problem.everything(problem.n_outer)))


def cleaning_accuracies(problem: stochastic.DataCleaning) -> dict:
    """Test accuracies of z*(x) with every weight 1/2 (x = 0) and of the oracle that keeps the
    clean examples only (weights sigmoid(+-30))."""
    oracle = torch.where(problem.corrupted, -30.0, 30.0).to(problem.x0)
    found = {}
    for label, x in (
        ("uniform_accuracy", torch.zeros_like(problem.x0)),
        ("oracle_accuracy", oracle),
    ):
        z = problem.z_layout.unflatten(problem.inner_solution(x))
        found[label] = problem.accuracy(z, *problem.test)
    return {**found, "how": "test accuracy of z*(x) at x = 0 and at the oracle's weights"}
