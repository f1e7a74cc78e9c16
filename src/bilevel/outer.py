"""The outer loop: hyper-iterations with any torch.optim optimiser over the hyperparameters.

`HyperOptimizer` restarts (or warm-starts) the inner run every hyper-iteration;
`RealTimeHyperOptimizer` keeps one inner run going and updates the
hyperparameters every `every` inner steps from forward-mode tangents (RTHO).
After each update the constraints are applied by projection, and every
callback receives the iteration's metrics. ``state_dict()``/``load_state_dict()`` capture all a
loop's next iteration depends on, so a loop restored from a checkpoint continues with the same
numbers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from . import validate
from .constraints import project
from .dynamics import Dynamics
from .hypergrad import ForwardSolver
from .hypergrad.problem import leaf_dict
from .precision import Precision
from .problem import Problem, pull_back
from .typing import Init, Objective

Callback = Callable[[dict], None]


class _OuterLoop:
    def __init__(self, hparams, optimizer, constraints, callbacks):
        validate.hyperparameters(hparams)
        for key, tensor in hparams.items():
            if not tensor.is_leaf:
                raise ValueError(
                    f"hparams[{key!r}] is not a leaf tensor: an outer optimiser can only "
                    "update leaves (use bilevel.solve inside your own loop instead)"
                )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer over the hparams, got "
                f"{type(optimizer).__name__}"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [k for k, v in hparams.items() if id(v) not in held]
        if missing:
            raise ValueError(f"optimizer does not hold hparams {missing}: pass it hparams.values()")
        self.hparams, self.optimizer = hparams, optimizer
        self.constraints = dict(constraints or {})
        project(hparams, self.constraints)  # start feasible; also checks the keys
        self.callbacks = list(callbacks)
        self.history: list[dict] = []

    def _update(self, value: float, grads: Mapping[str, Tensor], extra: dict) -> dict:
        """One outer step from a hypergradient; returns (and reports) the metrics."""
        for key, tensor in self.hparams.items():
            tensor.grad = grads[key].detach().clone()
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        self.optimizer.step()
        project(self.hparams, self.constraints)
        metrics = {
            "iteration": len(self.history) + 1,
            "outer_loss": value,
            "hypergradient_norm": norm,
            **extra,
        }
        self.history.append(metrics)
        for callback in self.callbacks:
            callback(metrics)
        return metrics

    def run(self, iterations: int) -> list[dict]:
        """`iterations` outer steps; returns their metrics."""
        validate.steps(iterations)
        return [self.step() for _ in range(iterations)]

    def state_dict(self) -> dict:
        """The hyperparameters' values, the optimiser's state, the metrics so far and the inner
        state carried between iterations (copies: later steps do not change them)."""
        return {
            "hparams": _copies(self.hparams),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # its tensors are live
            "history": [dict(m) for m in self.history],
            "inner": self._inner_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state_dict()``'s output (of a loop built the same way)."""
        missing = {"hparams", "optimizer", "history", "inner"} - set(state)
        if missing:
            raise ValueError(f"state: not a loop's state_dict (missing {sorted(missing)})")
        saved = state["hparams"]
        if set(saved) != set(self.hparams):
            raise ValueError(
                f"state: its hparams {sorted(saved)} are not this loop's {sorted(self.hparams)}"
            )
        for key, tensor in self.hparams.items():
            if saved[key].shape != tensor.shape:
                raise ValueError(
                    f"state: hparams[{key!r}] has shape {tuple(saved[key].shape)}, this loop's "
                    f"{tuple(tensor.shape)}"
                )
        with torch.no_grad():
            for key, tensor in self.hparams.items():
                tensor.copy_(saved[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [dict(m) for m in state["history"]]
        self._load_inner_state(state["inner"])

    def _inner_state(self):
        return None

    def _load_inner_state(self, inner) -> None:
        pass


class HyperOptimizer(_OuterLoop):
    """Hyper-iterations: inner run of `steps`, hypergradient by `method`, outer step.

    `inner, outer, params, hparams, dynamics, steps, method, **options` are the problem, as for
    `bilevel.hypergradient` (validated once, here); hparams must be leaves.

    Args:
        optimizer: any torch.optim optimiser over `hparams.values()`.
        warm_start: start each inner run from the last w_T (params must be a dict).
        constraints: {name: projection} applied after every outer step (bilevel.constraints).
        callbacks: called with each iteration's metrics dict.

    `step()` runs one hyper-iteration and returns its metrics (outer_loss, hypergradient_norm,
    seconds, the method's info); `run(n)` runs n; `last` is the last Result.
    """

    def __init__(
        self,
        inner: Objective,
        outer: Objective,
        params: Init,
        hparams: Mapping[str, Tensor],
        dynamics: Dynamics,
        steps: int,
        optimizer: torch.optim.Optimizer,
        *,
        method: str = "reverse",
        warm_start: bool = False,
        constraints: Mapping[str, Callable] | None = None,
        callbacks: Iterable[Callback] = (),
        precision: Precision | str | torch.dtype | None = None,
        **options,
    ):
        super().__init__(hparams, optimizer, constraints, callbacks)
        if warm_start and callable(params):
            raise ValueError("warm_start=True needs params as a dict, not a callable of hparams")
        self.problem = Problem.create(
            inner, outer, params, hparams, dynamics, steps, method, options, precision=precision
        )  # validated once, here
        self.warm_start = warm_start
        self.last = None

    @property
    def params(self) -> Init:
        """w_0 of the next inner run (the last w_T with warm_start)."""
        return self.problem.init

    def step(self) -> dict:
        began = time.perf_counter()
        result = self.problem.hypergradient(self.hparams)
        if self.warm_start:
            self.problem = self.problem.with_params(result.params)
        self.last = result
        return self._update(
            result.value, result.grads, {"seconds": time.perf_counter() - began, **result.info}
        )

    def _inner_state(self):
        # warm start: the next inner run starts from the last w_T (a callable w_0 has no state
        # here; an object with state of its own is the caller's to save)
        return _copies(self.params) if self.warm_start else None

    def _load_inner_state(self, inner) -> None:
        if self.warm_start:
            if inner is None or set(inner) != set(self.params):
                raise ValueError("state: its warm-start params do not match this loop's")
            params = {k: v.to(self.params[k].device).clone() for k, v in inner.items()}
            self.problem = self.problem.with_params(params)


class RealTimeHyperOptimizer(_OuterLoop):
    """Real-time forward mode: one inner run, an outer update every `every` inner steps.

    Args: as for HyperOptimizer, with `every` (inner steps between outer updates) in place of
    `steps` and method; `vectorize` as forward mode's option. `step()` advances the inner run
    by `every` steps, updates the hyperparameters from the tangents and returns the metrics.
    """

    def __init__(
        self,
        inner: Objective,
        outer: Objective,
        params: Init,
        hparams: Mapping[str, Tensor],
        dynamics: Dynamics,
        every: int,
        optimizer: torch.optim.Optimizer,
        *,
        constraints: Mapping[str, Callable] | None = None,
        callbacks: Iterable[Callback] = (),
        vectorize: bool = True,
        precision: Precision | str | torch.dtype | None = None,
    ):
        super().__init__(hparams, optimizer, constraints, callbacks)
        self.every = validate.steps(every)
        problem = Problem.create(
            inner, outer, params, hparams, dynamics, every, "forward", precision=precision
        )
        self.outer = outer
        self.solver = ForwardSolver(problem.inner, params, hparams, vectorize=vectorize)

    @property
    def params(self) -> dict[str, Tensor]:
        return self.solver.params

    def step(self) -> dict:
        began = time.perf_counter()
        self.solver.set_hparams(self.hparams)
        self.solver.advance(self.every)
        lam = leaf_dict(self.hparams)
        value, grads = pull_back(self.outer, self.solver, lam)
        return self._update(
            value, grads, {"seconds": time.perf_counter() - began, "inner_step": self.solver.t}
        )

    def _inner_state(self):
        return self.solver.state_dict()

    def _load_inner_state(self, inner) -> None:
        self.solver.load_state_dict(inner)


def _copies(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}
