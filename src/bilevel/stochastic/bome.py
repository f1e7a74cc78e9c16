"""BOME: the value-function constraint q <= 0 handled by a dynamic barrier, first order only."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validate
from .no_linear_step import NoLinearStep
from .solver import positive


class BOME(NoLinearStep):
    """BOME, Bilevel Optimization Made Easy: Liu, Ye, Wright, Stone & Liu, "BOME! Bilevel
    optimization made easy: a simple first-order approach", NeurIPS 2022, Algorithm 1.

    The bilevel problem is the constrained problem min_{x, y} F(x, y) subject to
    q(x, y) = G(x, y) - min_z G(x, z) <= 0. Each iteration approximates the value function by
    T steps of gradient descent on G(x, .) from the current y, theta_0 = y:

        theta_{t+1} = theta_t - rho grad_z g_B(x, theta_t)          (t < T; inner_step rho)
        q^(x, y) = G(x, y) - G(x, theta_T)                          (theta_T held fixed)

    and moves (x, y) together along the dynamic barrier combination of grad F and grad q^
    (gradients in (x, y); grad q^ = (grad_x G(x, y) - grad_x G(x, theta_T), grad_z G(x, y))):

        phi = eta ||grad q^||^2
        lam = max(phi - <grad F, grad q^>, 0) / ||grad q^||^2
        (x, y) -= xi (grad F + lam grad q^)                          (outer_step xi)

    so that <grad F + lam grad q^, grad q^> >= phi: every step decreases q^ at least at rate
    phi (to first order), and follows -grad F as far as that allows.

    Choices where the paper leaves room: the paper is deterministic; here each theta step draws
    its own inner minibatch, grad q^ is evaluated at y and at theta_T on ONE inner minibatch
    (its x part is a difference) and grad F on one outer minibatch, and lam is computed from
    these estimates (so the stochastic direction is biased: lam is not linear in them). x and
    y move with the one step xi = outer_step (the paper's single step on (x, y)); inner_step
    is only theta's. Where grad q^ is exactly zero (y minimises G(x, .) on the batch, as at the
    start z = 0 of a problem whose inner gradient vanishes there) lam is 0 and the step is
    -grad F. With a constant xi, lam grows until the step on q^ is at its stability limit
    (xi lam ~ 4 on the test quadratic) and (x, y) settle into a 2-cycle whose distance to x*
    shrinks with xi (full batches: 9.0%, 3.9%, 1.7% at xi = 0.4, 0.2, 0.1; the paper's
    analysis takes xi small). The frame's z is y; v stays zero (no linear system). Samples:
    every gradient counts its batch, the one on which q^ is differentiated twice (at y and at
    theta_T) twice.

    Args (besides StochasticSolver's, without linear_step):
        inner_steps: T >= 1, gradient steps to approximate min_z G(x, z).
        eta: eta > 0 in phi = eta ||grad q^||^2.
    """

    name = "bome"

    def __init__(self, problem, *, inner_steps: int = 10, eta: float = 0.5, **settings):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._set("eta", eta, positive)
        self.multiplier = 0.0  # lam of the last step

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        problem, x, y = self.problem, self._x, self._z
        theta = y.clone()
        for _ in range(self.settings["inner_steps"]):
            theta.add_(problem.inner_gradient(x, theta, self._draw_inner()), alpha=-inner_rate)
        batch = self._draw_inner()
        self.samples["inner"] += len(batch)  # G is differentiated twice on it
        inner_x, inner_y = problem.inner_gradients(x, y, batch)
        inner_x_theta, _ = problem.inner_gradients(x, theta, batch)
        outer = torch.cat(problem.outer_gradients(x, y, self._draw_outer()))
        constraint = torch.cat([inner_x - inner_x_theta, inner_y])
        self.multiplier = barrier_multiplier(outer, constraint, self.settings["eta"])
        direction = outer.add_(constraint, alpha=self.multiplier)
        step_x, step_y = direction.split([x.numel(), y.numel()])
        x.add_(step_x, alpha=-outer_rate)
        y.add_(step_y, alpha=-outer_rate)


def barrier_multiplier(objective: Tensor, constraint: Tensor, eta: float) -> float:
    """BOME's lam = max(phi - <grad F, grad q>, 0) / ||grad q||^2 with phi = eta ||grad q||^2,
    or 0 where grad q is zero (no constraint direction to follow).

    Args:
        objective: grad F, flat.
        constraint: grad q, flat, the same size.
        eta: the barrier's rate, > 0.
    Returns:
        lam >= 0, a float.
    """
    squared = float(constraint @ constraint)
    if squared == 0.0:
        return 0.0
    return max(eta * squared - float(objective @ constraint), 0.0) / squared
