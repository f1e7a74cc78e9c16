"""Run one solver on one problem with one seed, measuring what the plots and the table need.

Timing: the clock runs only over the solver's steps. At each evaluation point (log-spaced in
samples drawn) the steps are synchronised (torch.cuda.synchronize on CUDA) before the clock is
read, the evaluation runs, and the clock restarts after it: evaluations are outside the time
reported. Before the seeds of a (problem, solver), a warm-up run (another seed, a few steps)
takes the one-time costs (lazy imports, allocator, autograd's first calls); its time is
reported apart, never added.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from bilevel import stochastic

from .problems import BenchProblem

WARMUP_STEPS = 5
WARMUP_SEED = 10**6


def synchroniser(device: str) -> Callable[[], None]:
    """What to call before reading the clock: wait for the device's queued work."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def checkpoints(budget: int, count: int) -> list[int]:
    """`count` sample counts log-spaced from budget / 300 to budget (distinct, increasing)."""
    points = np.geomspace(max(budget / 300, 1), budget, count)
    return sorted({int(round(p)) for p in points})


def drawn(solver: stochastic.StochasticSolver) -> int:
    return solver.samples["inner"] + solver.samples["outer"]


def warm_up(bench: BenchProblem, name: str, settings: dict, sync) -> dict:
    """A few steps of the solver with another seed: their time, reported apart."""
    solver = stochastic.make(name, bench.problem, seed=WARMUP_SEED, evaluate_every=10**12,
                             **settings)  # fmt: skip
    sync()
    began = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        solver.step()
    sync()
    return {"warmup_seconds": time.perf_counter() - began, "warmup_steps": WARMUP_STEPS}


def run_one(
    bench: BenchProblem,
    name: str,
    settings: dict,
    seed: int,
    budget: int,
    evaluations: int,
    max_seconds: float,
    sync: Callable[[], None],
) -> dict:
    """One run: the curve of evaluations (samples, seconds, iteration, metrics) at log-spaced
    sample counts up to `budget`, stopped early past `max_seconds` of solver time or when the
    iterates diverge (then `failure` says so and the curve keeps what came before)."""
    solver = stochastic.make(name, bench.problem, seed=seed, evaluate_every=10**12, **settings)
    curve = [_point(bench, solver, 0.0)]
    row = {"seed": seed, "curve": curve}
    seconds = 0.0
    for checkpoint in checkpoints(budget, evaluations):
        sync()
        began = time.perf_counter()
        while drawn(solver) < checkpoint and seconds + time.perf_counter() - began < max_seconds:
            solver.step()
        sync()
        seconds += time.perf_counter() - began
        try:
            curve.append(_point(bench, solver, seconds))
        except stochastic.DivergenceError as error:
            row["failure"] = str(error)
            break
        if seconds >= max_seconds:
            row["stopped"] = f"time cap of {max_seconds:g} s at {drawn(solver)} samples"
            break
    return row


def _point(bench: BenchProblem, solver, seconds: float) -> dict:
    """The evaluation at the solver's iterate: its metrics, with the suboptimality against the
    problem's reference where it is not in them already."""
    metrics = solver.evaluate()
    if bench.suboptimality is not None:
        metrics["suboptimality"] = bench.suboptimality(metrics)
    return {
        "samples": drawn(solver),
        "seconds": seconds,
        "iteration": solver.iteration,
        **{k: v for k, v in metrics.items() if isinstance(v, float)},
    }
