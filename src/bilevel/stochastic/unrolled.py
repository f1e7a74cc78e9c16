"""The unrolled reference: reverse-mode differentiation through the T warm-started steps."""

from __future__ import annotations

from .reference import EngineReference


class Unrolled(EngineReference):
    """Iterative differentiation (ITD) on the stochastic frame: each iteration, T warm-started
    inner SGD steps by the engine and the exact gradient of x -> F_J(x, z_T(x)) by reverse mode
    through them (`bilevel.Problem` with method="reverse", memory="graph"): Franceschi, Donini,
    Frasconi & Pontil, "Forward and reverse gradient-based hyperparameter optimization", ICML
    2017, with the warm start of Ji, Yang & Liang (ICML 2021, ITD-BiO).

        z_T = T steps  z -= rho grad_z g_{B_t}(x, z)  from the last z (held constant in x)
        x  -= gamma d/dx F_J(x, z_T(x))

    The direction is the hypergradient of the truncated problem: for a quadratic G and full
    batches it is grad_x F + (dz_T/dx)^T grad_z F at z_T with dz_T/dx = (I - (I - rho A)^T)
    dz*/dx, so it equals grad h(x) once z_T = z*(x) and (1 - rho mu)^T is negligible. v stays
    zero. Settings: StochasticSolver's (without linear_step), and inner_steps: T >= 1.
    """

    name = "unrolled"
    method = "reverse"

    def _hypergradient(self, engine, x):
        result = engine.hypergradient(x)
        return result.grads, result.params
