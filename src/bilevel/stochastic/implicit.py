"""The implicit reference: T warm-started inner steps, then the implicit function theorem with
conjugate gradient warm-started from the last linear-system solution."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .. import validate
from ..hypergrad import linear
from ..hypergrad.problem import leaf_dict
from ..problem import Problem, pull_back
from .reference import EngineReference
from .solver import non_negative


class Implicit(EngineReference):
    """Approximate implicit differentiation (AID) on the stochastic frame: each iteration, T
    warm-started inner SGD steps by the engine, then the engine's implicit-cg hypergradient at
    z_T (`bilevel.Problem` with method="implicit-cg": the stationarity map grad_z g of the
    LAST step's minibatch, its Hessian-vector products by autograd, the pull to x by the
    engine's RootSystem), with conjugate gradient started from the last iteration's solution
    instead of zero: Pedregosa, "Hyperparameter optimization with approximate gradient", ICML
    2016, with the warm starts of Ji, Yang & Liang (ICML 2021, AID-BiO) and Arbel & Mairal
    (ICLR 2022).

        z_T = T steps  z -= rho grad_z g_{B_t}(x, z)   from the last z
        q   = CG on  d2_zz g_{B_T}(x, z_T) q = grad_z f_J(x, z_T),  from q_0 = -v
        x  -= gamma (grad_x f_J(x, z_T) - d2_xz g_{B_T}(x, z_T) q),   v = -q

    The warm start solves for the correction e = q - q_0, A e = b - A q_0, by the engine's CG
    (`bilevel.hypergrad.linear.conjugate_gradient`) to the residual a cold solve would stop at
    (cg_tolerance relative to ||b||, not to the smaller ||b - A q_0||): one product more than a
    cold solve, and none once q_0 solves the system. `linear_info` holds the last solve's
    iterations and residual (relative to ||b||); an unconverged solve warns as the engine does
    (bilevel.SolverWarning). v is -q, the frame's v (it tends to v*(x) with z_T -> z*(x)).
    Samples: the T inner batches, the outer batch and the system's batch B_T once more (its
    gradient at z_T).

    Args (besides StochasticSolver's, without linear_step):
        inner_steps: T >= 1.
        cg_iterations: the most CG iterations per solve (>= 1).
        cg_tolerance: CG's target relative residual (>= 0).
    """

    name = "implicit"
    method = "implicit-cg"

    def __init__(
        self,
        problem,
        *,
        cg_iterations: int = 100,
        cg_tolerance: float = 1e-10,
        **settings,
    ):
        # checked before the engine is built, so a bad value is named here, by this solver
        self._cg = {
            "iterations": self._check("cg_iterations", cg_iterations, validate.positive_int),
            "tolerance": self._check("cg_tolerance", cg_tolerance, non_negative),
        }
        super().__init__(problem, **settings)
        self.settings["cg_iterations"], self.settings["cg_tolerance"] = self._cg.values()
        self.linear_info: dict = {}

    def _options(self) -> dict:
        return dict(self._cg)

    def _hypergradient(
        self, engine: Problem, x: Mapping[str, Tensor]
    ) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
        lam = leaf_dict(x)
        solution = engine.solution(lam)  # the T steps, without a graph
        solution.solve = self._warm_conjugate_gradient  # the engine's system, CG from -v
        _, grads = pull_back(engine.outer, solution, lam)
        self.samples["inner"] += len(self._batches[-1])
        return grads, solution.params

    def _warm_conjugate_gradient(self, matvec, b: tuple[Tensor, ...], rmatvec=None):
        """The engine's LinearSolve signature: (q, info) for A q = b, from q_0 = -v."""
        layout = self.problem.z_layout
        start = tuple(layout.unflatten(-self._v).values())
        residual = linear.axpy(-1.0, matvec(start), b)
        scale, remaining = float(linear.norm(b)), float(linear.norm(residual))
        relative = scale / remaining if remaining > 0 else 1.0
        correction, info = linear.conjugate_gradient(
            matvec,
            residual,
            iterations=self._cg["iterations"],
            tolerance=self._cg["tolerance"] * relative,
        )
        q = linear.axpy(1.0, correction, start)
        self._v = -layout.flatten(dict(zip(layout.keys, q)))
        self.linear_info = {**info, "residual": info["residual"] / relative}
        return q, self.linear_info
