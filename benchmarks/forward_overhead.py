"""Milliseconds per inner step of forward mode (vectorized and not) against reverse mode.

Two problems, both float64, SGD with momentum whose learning rate is a hyperparameter:

- small: a 6-dimensional quadratic with 13 scalar hyperparameters (an L2 weight and a target
  shift per coordinate, and the log learning rate), where per-step overhead dominates;
- medium: an MLP 5-64-32-1 (2497 parameters) with 10 scalar hyperparameters (one weight decay
  per layer, a scale per input feature, the log learning rate, the momentum logit), where the
  arithmetic does.

    OMP_NUM_THREADS=1 python benchmarks/forward_overhead.py                 # under a minute
    OMP_NUM_THREADS=1 python benchmarks/forward_overhead.py --baseline 8beea88  # + that
        # revision's forward.py (loaded beside this one) in the same runs: before and after
    OMP_NUM_THREADS=1 python benchmarks/forward_overhead.py --profile       # + cProfile

Each row is the best of `--repeat` timed runs of `hypergradient` (after one warm-up) divided by
the number of inner steps; the rows take turns within each repetition, so a change of load on a
shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import bilevel

DTYPE = torch.float64
ROWS = {
    "forward": {"method": "forward"},
    "forward vectorize=False": {"method": "forward", "vectorize": False},
    "reverse (graph)": {"method": "reverse"},
}


def quadratic():
    """(inner, outer, params, hparams, dynamics): 6 coordinates, 13 hyperparameters."""
    g = torch.Generator().manual_seed(0)
    d = 6
    root = torch.randn(d, d, generator=g, dtype=DTYPE)
    curvature = root @ root.T / d + torch.eye(d, dtype=DTYPE)
    target = torch.randn(d, generator=g, dtype=DTYPE)

    def inner(p, h):
        error = p["w"] - target - h["shift"]
        return 0.5 * error @ curvature @ error + 0.5 * (h["log_l2"].exp() * p["w"] ** 2).sum()

    def outer(p, h):
        return 0.5 * ((p["w"] - target) ** 2).sum()

    params = {"w": torch.zeros(d, dtype=DTYPE)}
    hparams = {
        "log_l2": torch.full((d,), -2.0, dtype=DTYPE, requires_grad=True),
        "shift": torch.zeros(d, dtype=DTYPE, requires_grad=True),
        "log_lr": torch.tensor(-2.0, dtype=DTYPE, requires_grad=True),
    }
    dynamics = bilevel.sgd(lr=lambda h: h["log_lr"].exp(), momentum=0.5)
    return inner, outer, params, hparams, dynamics


def mlp():
    """(inner, outer, params, hparams, dynamics): an MLP 5-64-32-1, 10 hyperparameters."""
    g = torch.Generator().manual_seed(1)
    x, xv = (torch.randn(n, 5, generator=g, dtype=DTYPE) for n in (256, 128))
    y, yv = torch.sin(x.sum(1, keepdim=True)), torch.sin(xv.sum(1, keepdim=True))
    sizes = [(5, 64), (64, 32), (32, 1)]
    params = {}
    for i, (a, b) in enumerate(sizes):
        params[f"W{i}"] = torch.randn(a, b, generator=g, dtype=DTYPE) / a**0.5
        params[f"b{i}"] = torch.zeros(b, dtype=DTYPE)

    def predict(p, inputs):
        hidden = inputs
        for i in range(len(sizes)):
            hidden = hidden @ p[f"W{i}"] + p[f"b{i}"]
            if i < len(sizes) - 1:
                hidden = torch.tanh(hidden)
        return hidden

    def inner(p, h):
        loss = ((predict(p, x * h["feature_scale"]) - y) ** 2).mean()
        decay = sum(h["log_wd"][i].exp() * (p[f"W{i}"] ** 2).sum() for i in range(len(sizes)))
        return loss + 0.5 * decay

    def outer(p, h):
        return ((predict(p, xv * h["feature_scale"]) - yv) ** 2).mean()

    hparams = {
        "log_wd": torch.full((3,), -4.0, dtype=DTYPE, requires_grad=True),
        "feature_scale": torch.ones(5, dtype=DTYPE, requires_grad=True),
        "log_lr": torch.tensor(-2.0, dtype=DTYPE, requires_grad=True),
        "logit_mu": torch.tensor(0.0, dtype=DTYPE, requires_grad=True),
    }
    dynamics = bilevel.sgd(
        lr=lambda h: h["log_lr"].exp(), momentum=lambda h: torch.sigmoid(h["logit_mu"])
    )
    return inner, outer, params, hparams, dynamics


PROBLEMS = {"small (d=6, m=13)": (quadratic, 100), "medium (d=2497, m=10)": (mlp, 20)}


def baseline_forward(revision: str):
    """The `forward` method of an earlier revision's forward.py, imported beside this one."""
    repo = Path(__file__).resolve().parents[1]
    path = "src/bilevel/hypergrad/forward.py"
    source = subprocess.run(
        ["git", "-C", str(repo), "show", f"{revision}:{path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    name = "bilevel.hypergrad.forward_baseline"  # its relative imports resolve in bilevel
    spec = importlib.util.spec_from_file_location(name, file.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    Path(file.name).unlink()
    return module.forward


def rows(baseline: str | None) -> dict[str, tuple]:
    """Row name -> (method function or None for the registered one, options)."""
    out = {name: (None, options) for name, options in ROWS.items()}
    if baseline:
        old = baseline_forward(baseline)
        for name in ("forward", "forward vectorize=False"):
            out[f"{name} @{baseline}"] = (old, ROWS[name])
    return out


def ms_per_step(problem, steps: int, table: dict[str, tuple], repeat: int) -> dict[str, float]:
    """Best milliseconds per step of each row; the rows alternate within each repetition."""
    inner, outer, params, hparams, dynamics = problem
    registered = bilevel.hypergrad.METHODS["forward"]
    best = {name: float("inf") for name in table}
    try:
        for repetition in range(repeat + 1):  # the first is a warm-up
            for name, (method, options) in table.items():
                bilevel.hypergrad.METHODS["forward"] = method or registered
                began = time.perf_counter()
                bilevel.hypergradient(inner, outer, params, hparams, dynamics, steps, **options)
                if repetition:
                    best[name] = min(best[name], time.perf_counter() - began)
    finally:
        bilevel.hypergrad.METHODS["forward"] = registered
    return {name: 1000 * seconds / steps for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also time forward.py of git REV")
    parser.add_argument("--profile", action="store_true", help="cProfile forward (small)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    table = rows(args.baseline)
    for name, (build, steps) in PROBLEMS.items():
        for row, ms in ms_per_step(build(), steps, table, args.repeat).items():
            print(f"{name:24s} {row:36s} {ms:9.3f} ms/step  (T={steps})", flush=True)
    if args.profile:
        inner, outer, params, hparams, dynamics = quadratic()
        profiler = cProfile.Profile()
        profiler.enable()
        bilevel.hypergradient(inner, outer, params, hparams, dynamics, 50, method="forward")
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
