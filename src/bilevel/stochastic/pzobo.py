"""PZOBO: the inner output's Jacobian in x by Gaussian perturbations of x (zeroth order)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validate
from .no_linear_step import NoLinearStep
from .solver import positive


class PZOBO(NoLinearStep):
    """PZOBO, Partial Zeroth-Order-like Bilevel Optimizer: Sow, Ji & Liang, "On the convergence
    theory for Hessian-free bilevel algorithms", NeurIPS 2022, Algorithm 1 (PZOBO), in its
    stochastic form (PZOBO-S: minibatch gradients throughout).

    The hypergradient of x -> F(x, z_N(x)), with z_N the output of N inner gradient steps,
    needs the Jacobian dz_N/dx. PZOBO estimates it from differences of inner trajectories at
    Gaussian perturbations of x, with gradients only (no second derivative). Each iteration,
    from z_0 = the last iteration's z_N (warm start):

        z_N      = N steps  z -= rho grad_z g_{B_t}(x, z)            from z_0 (inner_step rho)
        u_j      ~ N(0, I_dx),  j = 1..Q
        delta_j  = (z_N(x + mu u_j) - z_N(x)) / mu                   (the same N steps, same z_0)
        D_x      = grad_x f_J(x, z_N) + 1/Q sum_j u_j <delta_j, grad_z f_J(x, z_N)>
        x       -= gamma D_x                                         (outer_step gamma)

    1/Q sum_j delta_j u_j^T is the Gaussian-smoothing estimate of dz_N/dx: E[u u^T] = I, and
    delta_j = (dz_N/dx) u_j + O(mu). Where z_N is affine in x (a quadratic G) the estimate is
    exactly unbiased for any mu, and its expectation over u is dz_N/dx, which tends to
    dz*/dx = -[d2_zz G]^{-1} d2_zx G as N grows.

    Choices where the paper leaves room: the perturbed trajectories reuse the unperturbed
    trajectory's minibatches B_1..B_N (common random numbers: otherwise delta_j would carry
    the batches' differences divided by mu); the Gaussian vectors are drawn from the solver's
    seeded sampler after the batches; grad_x f and grad_z f come from one outer minibatch J.
    The frame's v stays zero (no linear system). Samples: every gradient counts its batch, so
    an iteration counts (Q + 1) N inner batches (the Q perturbed trajectories evaluate g again
    on the same samples) and one outer batch.

    Args (besides StochasticSolver's, without linear_step):
        inner_steps: N >= 1, gradient steps in each trajectory.
        perturbation: mu > 0, the size of the perturbation of x.
        directions: Q >= 1, Gaussian vectors per iteration.
    """

    name = "pzobo"

    def __init__(
        self,
        problem,
        *,
        inner_steps: int = 10,
        perturbation: float = 0.01,
        directions: int = 1,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._set("perturbation", perturbation, positive)
        self._set("directions", directions, validate.positive_int)

    def _trajectory(self, x: Tensor, start: Tensor, batches: list[Tensor], rate: float):
        """z_N from `start` at `x`, one gradient step on each batch."""
        z = start.clone()
        for batch in batches:
            z.add_(self.problem.inner_gradient(x, z, batch), alpha=-rate)
        return z

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        problem, x, start = self.problem, self._x, self._z
        mu, count = self.settings["perturbation"], self.settings["directions"]
        batches = [self._draw_inner() for _ in range(self.settings["inner_steps"])]
        z = self._trajectory(x, start, batches, inner_rate)
        directions = self.sampler.gaussian(count, x.numel(), x.dtype).to(x.device)
        deltas = [
            (self._trajectory(x + mu * u, start, batches, inner_rate) - z) / mu for u in directions
        ]
        self.samples["inner"] += count * sum(len(b) for b in batches)
        outer_x, outer_z = problem.outer_gradients(x, z, self._draw_outer())
        projections = torch.stack(deltas) @ outer_z  # <delta_j, grad_z f>
        x.add_(outer_x + directions.T @ projections / count, alpha=-outer_rate)
        self._z = z
