"""SRBA: SOBA's three directions with SARAH recursive estimates and periodic full passes."""

from __future__ import annotations

import math

from torch import Tensor

from .. import validate
from .soba import directions, project_onto_ball
from .solver import StochasticSolver, positive


class SRBA(StochasticSolver):
    """SRBA, the Stochastic Recursive Bilevel Algorithm: Dagreou, Moreau, Vaiter & Ablin, "A lower
    bound and a near-optimal algorithm for bilevel empirical risk minimization", AISTATS 2024,
    Algorithm 1 (SRBA).

    SOBA's directions D = (D_z, D_v, D_x) at (x, z, v) (soba.directions), estimated by SARAH: every
    `period` iterations they are computed on ALL the samples; in between, each iteration draws
    one inner and one outer minibatch and corrects the last directions by the change of the
    minibatch's directions between the previous iterates and the current ones:

        k = 0 mod q:  D_k = D(x_k, z_k, v_k)                            (full pass)
        otherwise:    D_k = D_{k-1} + D_{B,J}(x_k, z_k, v_k) - D_{B,J}(x_{k-1}, z_{k-1}, v_{k-1})
        z_{k+1} = z_k - rho D_z,   v_{k+1} = Proj(v_k - rho D_v),   x_{k+1} = x_k - gamma D_x

    The correction's mean is the full-batch change, so the error D_k - D(x_k, z_k, v_k) is a
    martingale started at zero by each full pass, whose increments shrink with the steps:
    constant steps converge (the paper's analysis uses constant rho, gamma and q ~ n + m).

    Choices where the paper leaves room: minibatches instead of the paper's single samples i, j
    (drawn without replacement within a batch, independently between iterations); the default
    period makes the minibatches between two full passes draw as many samples as a full pass,
    q = ceil((n_inner + n_outer) / (inner_batch + outer_batch)); a full pass uses every sample
    in order (no draw) and counts n_inner + n_outer samples; the projection of v onto a ball is
    applied only when a radius is given (the paper's analysis bounds v, as MA-SOBA's does);
    linear_step is the step on v (rho by default, as in the paper).

    Args (besides StochasticSolver's):
        period: q >= 1, iterations between full passes (the first iteration makes one).
        radius: the radius of the ball v is projected onto, or None (no projection).
    """

    name = "srba"

    def __init__(
        self, problem, *, period: int | None = None, radius: float | None = None, **settings
    ):
        super().__init__(problem, **settings)
        if period is None:
            batches = self.settings["inner_batch"] + self.settings["outer_batch"]
            period = math.ceil((problem.n_inner + problem.n_outer) / batches)
        self._set("period", period, validate.positive_int)
        self.settings["radius"] = (
            None if radius is None else self._check("radius", radius, positive)
        )
        self._directions = [self._z.new_zeros(self._z.shape) for _ in "zv"]
        self._directions.append(self._x.new_zeros(self._x.shape))
        self._previous: list[Tensor] = []  # [x, z, v] before the last step; empty at first

    def _full_pass(self) -> tuple[Tensor, Tensor]:
        """Every inner and outer index, counted as samples."""
        problem = self.problem
        self.samples["inner"] += problem.n_inner
        self.samples["outer"] += problem.n_outer
        return problem.everything(problem.n_inner), problem.everything(problem.n_outer)

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        x, z, v = self._x, self._z, self._v
        if (self.iteration - 1) % self.settings["period"] == 0:
            self._directions = list(directions(self.problem, x, z, v, *self._full_pass()))
        else:
            inner, outer = self._draw_inner(), self._draw_outer()
            new = directions(self.problem, x, z, v, inner, outer)
            old = directions(self.problem, *self._previous, inner, outer)
            self._directions = [d + n - o for d, n, o in zip(self._directions, new, old)]
        self._previous = [x.clone(), z.clone(), v.clone()]
        d_z, d_v, d_x = self._directions
        z.add_(d_z, alpha=-inner_rate)
        v.add_(d_v, alpha=-linear_rate)
        project_onto_ball(v, self.settings["radius"])
        x.add_(d_x, alpha=-outer_rate)

    def _memory(self) -> dict:
        return {"directions": self._directions, "previous": self._previous}

    def _load_memory(self, memory: dict) -> None:
        self._directions, self._previous = memory["directions"], memory["previous"]
