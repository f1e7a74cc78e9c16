"""The engine's deterministic hypergradients as stochastic solvers, to compare every solver on
one interface: each iteration runs T warm-started inner SGD steps with bilevel.Problem and moves
x along the engine's hypergradient of F(x, z_T(x)) (unrolled or implicit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from .. import validate
from ..dynamics import sgd
from ..hypergrad.problem import leaf_dict
from ..problem import Problem
from .no_linear_step import NoLinearStep


class EngineReference(NoLinearStep):
    """An outer loop around the engine: `bilevel.Problem` with `bilevel.sgd` as the inner
    dynamics (inner_step, decayed by inner_decay), the method `method` with `_options()`.

    Each iteration draws T inner minibatches (step t of the engine's run uses the t-th; with
    inner_batch = n_inner every step is full-batch) and one outer minibatch for F, runs the T
    steps from the last z (the warm start: z_0 is a constant for the hypergradient), moves x
    by outer_step along the hypergradient and keeps z_T. Samples: T inner batches and the
    outer one, the per-sample gradients the steps and F touch (the hypergradient differentiates
    those same gradients again; a subclass counts any further evaluation).
    """

    method: ClassVar[str] = ""

    def __init__(self, problem, *, inner_steps: int = 10, **settings):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._inner_rate = self.settings["inner_step"]
        self._batches: list[Tensor] = []
        self._outer_batch: Tensor | None = None
        self.engine = Problem.create(
            self._engine_inner,
            self._engine_outer,
            problem.z_layout.unflatten(self._z.clone()),
            leaf_dict(problem.x_layout.unflatten(self._x)),
            sgd(lr=self._current_rate),  # a callable: the rate decays with inner_decay
            self.settings["inner_steps"],
            self.method,
            self._options(),
        )

    def _options(self) -> dict:
        """The engine method's options."""
        return {}

    # the engine's objectives: params are z, hparams are x; step t (1..T) uses the t-th batch
    def _engine_inner(self, params, hparams, t):
        return self.problem.inner(hparams, params, self._batches[t - 1])

    def _engine_outer(self, params, hparams):
        return self.problem.outer(hparams, params, self._outer_batch)

    def _current_rate(self, hparams) -> float:
        return self._inner_rate

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        self._inner_rate = inner_rate
        self._batches = [self._draw_inner() for _ in range(self.settings["inner_steps"])]
        self._outer_batch = self._draw_outer()
        x_layout, z_layout = self.problem.x_layout, self.problem.z_layout
        engine = self.engine.with_params(z_layout.unflatten(self._z.clone()))
        grads, z_T = self._hypergradient(engine, x_layout.unflatten(self._x.clone()))
        self._z = z_layout.flatten(z_T)
        self._x.add_(x_layout.flatten(grads), alpha=-outer_rate)

    def _hypergradient(
        self, engine: Problem, x: Mapping[str, Tensor]
    ) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
        """(the hypergradient at x, z_T) from `engine`, whose run starts at the last z."""
        raise NotImplementedError
