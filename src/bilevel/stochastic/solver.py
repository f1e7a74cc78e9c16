"""The frame every stochastic solver shares: settings, minibatch draws, step sizes, evaluations
(metrics and callbacks), and state_dict/load_state_dict for exact resumption.

A solver holds flat vectors x, z and v (v approximates v*(x) = -[d2_zz G]^{-1} grad_z F, so the
hypergradient is grad_x F + d2_xz G v), and `step()` advances them by one outer iteration: the
subclass's `_advance(inner_rate, linear_rate, outer_rate)`.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from .. import validate
from ..errors import BilevelError
from .problem import Sampler, StochasticProblem

Callback = Callable[[dict], None]

# settings that a resumed solver may change: they do not enter the numbers of the iterations
# (the seed is replaced by the sampler's saved state)
_FREE_SETTINGS = {"seed"}


class DivergenceError(BilevelError, FloatingPointError):
    """A stochastic solver's iterate became NaN or infinite."""


class StochasticSolver:
    """One outer loop over a StochasticProblem.

    Args:
        problem: the StochasticProblem.
        inner_step: the step size on z (rho in Dagreou et al.; alpha in Ji et al.).
        outer_step: the step size on x (gamma; beta in Ji et al.).
        linear_step: the step size on v (the linear system), or of the Neumann series in
            StocBiO; None uses inner_step (SOBA's and SABA's single rho).
        inner_batch: the inner minibatch size, at most n_inner.
        outer_batch: the outer minibatch size, at most n_outer.
        inner_decay: the exponent of decreasing inner and linear steps: at iteration k >= 1
            they are multiplied by k^-inner_decay (0: constant steps, the default).
        outer_decay: the same for the outer step, k^-outer_decay.
        seed: seeds the minibatch sampler.
        evaluate_every: iterations between evaluations: full-batch metrics (not counted as
            samples nor in `seconds`), appended to `history` and passed to each callback.
        callbacks: called with each evaluation's metrics dict.

    `step()` runs one iteration and returns its metrics (iteration, samples drawn, seconds of
    solver time, and the evaluation's entries when it evaluated); `run(n)` runs n and returns
    the evaluations among them. `x`, `z`, `v` are copies of the iterates as dicts.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        problem: StochasticProblem,
        *,
        inner_step: float,
        outer_step: float,
        linear_step: float | None = None,
        inner_batch: int = 1,
        outer_batch: int = 1,
        inner_decay: float = 0.0,
        outer_decay: float = 0.0,
        seed: int = 0,
        evaluate_every: int = 100,
        callbacks: Iterable[Callback] = (),
    ):
        if not isinstance(problem, StochasticProblem):
            raise TypeError(
                f"{self.name}: problem must be a bilevel.stochastic.StochasticProblem, got "
                f"{type(problem).__name__}"
            )
        self.problem = problem
        self.settings: dict[str, object] = {}
        self._set("inner_step", inner_step, positive)
        self._set("outer_step", outer_step, positive)
        self._set("linear_step", inner_step if linear_step is None else linear_step, positive)
        self._set("inner_batch", inner_batch, batch_size, problem.n_inner, "n_inner")
        self._set("outer_batch", outer_batch, batch_size, problem.n_outer, "n_outer")
        self._set("inner_decay", inner_decay, non_negative)
        self._set("outer_decay", outer_decay, non_negative)
        self._set("seed", seed, integer)
        self.evaluate_every = self._check("evaluate_every", evaluate_every, validate.positive_int)
        self.callbacks = list(callbacks)
        self.sampler = Sampler(seed)
        self._x, self._z = problem.x0.clone(), problem.z0.clone()
        self._v = torch.zeros_like(self._z)
        self.iteration = 0
        self.samples = {"inner": 0, "outer": 0}
        self.seconds = 0.0
        self.history: list[dict] = []

    # -- settings ----------------------------------------------------------------------------

    def _check(self, name: str, value, check: Callable, *args):
        """`check(name, value, *args)`, its error prefixed with this solver's name."""
        try:
            return check(name, value, *args)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{self.name}: {error}") from None

    def _set(self, name: str, value, check: Callable, *args) -> None:
        self.settings[name] = self._check(name, value, check, *args)

    @classmethod
    def accepted_settings(cls) -> tuple[list[str], list[str]]:
        """(every setting's name, those without a default), from the constructors' keyword-only
        parameters (a subclass's own, its bases', then the common ones it passes on)."""
        names, required = [], []
        for klass in cls.__mro__[: cls.__mro__.index(StochasticSolver) + 1]:
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names:
                    names.append(p.name)
                    if p.default is inspect.Parameter.empty:
                        required.append(p.name)
        return names, required

    # -- the iterates ------------------------------------------------------------------------

    @property
    def x(self) -> dict[str, Tensor]:
        return _copies(self.problem.x_layout.unflatten(self._x))

    @property
    def z(self) -> dict[str, Tensor]:
        return _copies(self.problem.z_layout.unflatten(self._z))

    @property
    def v(self) -> dict[str, Tensor]:
        return _copies(self.problem.z_layout.unflatten(self._v))

    # -- iterations --------------------------------------------------------------------------

    def _draw_inner(self, size: int | None = None) -> Tensor:
        size = self.settings["inner_batch"] if size is None else size
        self.samples["inner"] += size
        return self.sampler.batch(self.problem.n_inner, size).to(self.problem.device)

    def _draw_outer(self, size: int | None = None) -> Tensor:
        size = self.settings["outer_batch"] if size is None else size
        self.samples["outer"] += size
        return self.sampler.batch(self.problem.n_outer, size).to(self.problem.device)

    def _rates(self) -> tuple[float, float, float]:
        """(inner, linear, outer) step sizes at the current iteration k >= 1."""
        k, s = self.iteration, self.settings
        inner_scale = k ** -s["inner_decay"]
        return (
            s["inner_step"] * inner_scale,
            s["linear_step"] * inner_scale,
            s["outer_step"] * k ** -s["outer_decay"],
        )

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        raise NotImplementedError

    def step(self) -> dict:
        """One iteration; returns its metrics (with the evaluation's when it evaluates)."""
        began = time.perf_counter()
        self.iteration += 1
        self._advance(*self._rates())
        self.seconds += time.perf_counter() - began
        metrics = {
            "iteration": self.iteration,
            "samples": self.samples["inner"] + self.samples["outer"],
            "inner_samples": self.samples["inner"],
            "outer_samples": self.samples["outer"],
            "seconds": self.seconds,
        }
        if self.iteration % self.evaluate_every == 0:
            metrics.update(self.evaluate())
            self.history.append(metrics)
            for callback in self.callbacks:
                callback(metrics)
        return metrics

    def run(self, iterations: int) -> list[dict]:
        """`iterations` steps; returns the evaluations made during them."""
        validate.positive_int("iterations", iterations)
        start = len(self.history)
        for _ in range(iterations):
            self.step()
        self._check_finite()
        return self.history[start:]

    def evaluate(self) -> dict[str, float]:
        """Full-batch metrics at the current iterates: outer_value F(x, z), inner_value G(x, z),
        inner_gradient_norm ||grad_z G(x, z)||, and the problem's reference_metrics (closed
        forms, where it has them)."""
        self._check_finite()
        problem = self.problem
        everything_outer = problem.everything(problem.n_outer)
        everything_inner = problem.everything(problem.n_inner)
        gradient = problem.inner_gradient(self._x, self._z, everything_inner)
        return {
            "outer_value": float(problem.outer_value(self._x, self._z, everything_outer)),
            "inner_value": float(problem.inner_value(self._x, self._z, everything_inner)),
            "inner_gradient_norm": float(torch.linalg.vector_norm(gradient)),
            **problem.reference_metrics(self.x, self.z, self.v),
        }

    def _check_finite(self) -> None:
        for label, value in (("x", self._x), ("z", self._z), ("v", self._v)):
            if not bool(torch.isfinite(value).all()):
                raise DivergenceError(
                    f"{self.name}: {label} is NaN or infinite after iteration {self.iteration}: "
                    f"try smaller steps (inner_step={self.settings['inner_step']}, "
                    f"linear_step={self.settings['linear_step']}, "
                    f"outer_step={self.settings['outer_step']})"
                )

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """All the next iterations depend on (copies): iterates, the sampler's state, counters,
        history and the solver's own memory."""
        return {
            "solver": self.name,
            "settings": dict(self.settings),
            "x": self._x.clone(),
            "z": self._z.clone(),
            "v": self._v.clone(),
            "iteration": self.iteration,
            "samples": dict(self.samples),
            "seconds": self.seconds,
            "history": [dict(m) for m in self.history],
            "sampler": self.sampler.state_dict(),
            "memory": {k: _clone(v) for k, v in self._memory().items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state_dict()`'s output of a solver built the same way."""
        missing = sorted({"solver", "settings", "x", "z", "v", "sampler", "memory"} - set(state))
        if missing:
            raise ValueError(f"{self.name}: state is not a solver's state_dict (missing {missing})")
        if state["solver"] != self.name:
            raise ValueError(f"{self.name}: state was saved by solver {state['solver']!r}")
        changed = [
            f"{k}={state['settings'].get(k)!r} there, {v!r} here"
            for k, v in self.settings.items()
            if k not in _FREE_SETTINGS and state["settings"].get(k) != v
        ]
        if changed:
            raise ValueError(f"{self.name}: state has other settings: {'; '.join(changed)}")
        for label, mine in (("x", self._x), ("z", self._z), ("v", self._v)):
            if state[label].shape != mine.shape:
                raise ValueError(
                    f"{self.name}: state's {label} has {state[label].numel()} entries, this "
                    f"problem's {mine.numel()}"
                )
        device = self.problem.device
        self._x, self._z, self._v = (state[k].to(device).clone() for k in ("x", "z", "v"))
        self.iteration = int(state["iteration"])
        self.samples = dict(state["samples"])
        self.seconds = float(state["seconds"])
        self.history = [dict(m) for m in state["history"]]
        self.sampler.load_state_dict(state["sampler"])
        self._load_memory({k: _clone(v, device) for k, v in state["memory"].items()})

    def _memory(self) -> dict:
        """The solver's own state besides x, z, v (tensors, lists of them, plain values)."""
        return {}

    def _load_memory(self, memory: dict) -> None:
        pass


# -- checks of settings: each raises with the setting's name (the solver adds its own) --------


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive(name: str, value) -> float:
    if not _number(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def non_negative(name: str, value) -> float:
    if not _number(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def fraction(name: str, value) -> float:
    if not _number(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def batch_size(name: str, value, available: int, size_name: str) -> int:
    size = validate.positive_int(name, value)
    if size > available:
        raise ValueError(f"{name}={size} is larger than the data ({size_name}={available})")
    return size


def _copies(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


def _clone(value, device=None):
    """A copy of a tensor (on `device` if given), of a list of them, or a plain value."""
    if isinstance(value, Tensor):
        return value.to(device).clone() if device is not None else value.clone()
    if isinstance(value, list):
        return [_clone(v, device) for v in value]
    return value
