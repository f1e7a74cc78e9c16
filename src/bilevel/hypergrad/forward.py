"""Forward mode (FMD): carry the tangents Z_t = dz_t/dlambda along with the inner run.

Z_t = A_t Z_{t-1} + B_t is one Jacobian-vector product per scalar
hyperparameter and step; all m of them go through `torch.func.vmap` of
`torch.func.jvp` in one batched call. Memory is O(m d) whatever T is, so this
suits few scalar hyperparameters and long runs. `ForwardSolver` can be advanced
and queried at any time, which is what real-time hyperparameter optimisation
(an outer update every few inner steps, in one run) needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import grad_and_value, jvp, vmap

from .. import validate
from .problem import (
    Flat,
    Init,
    InnerProblem,
    check_finite_run,
    check_shapes,
    detach,
    evaluate,
)


def forward(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    vectorize: bool = True,
) -> ForwardSolver:
    """Run T steps carrying the tangents; the result pulls back a cotangent with Z_T^T."""
    solver = ForwardSolver(problem, init, hparams, vectorize=vectorize)
    solver.advance(steps)
    return solver


class ForwardSolver:
    """The inner state and its tangents with respect to every scalar hyperparameter."""

    def __init__(self, problem: InnerProblem, init: Init, hparams, *, vectorize: bool = True):
        self.problem, self.vectorize = problem, validate.boolean("vectorize", vectorize)
        self.hparams = detach(hparams)
        self.basis = _basis(self.hparams)
        self.z = problem.start(init, self.hparams)
        self.tangents = self._initial_tangents(init)
        self.t = 0

    @property
    def params(self):
        return self.problem.params_of(self.z)

    def _initial_tangents(self, init: Init) -> Flat:
        if not callable(init):
            return tuple(v.new_zeros((self.size,) + v.shape) for v in self.z)
        problem, hparams = self.problem, self.hparams

        # Phi_0 depends on lambda: its tangents are jvp's of Phi_0 along the basis.
        def tangent(direction):
            return jvp(lambda h: _undetached_start(problem, init, h), (hparams,), (direction,))[1]

        return vmap(tangent)(self.basis)

    @property
    def size(self) -> int:
        return sum(v.numel() for v in self.hparams.values())

    def set_hparams(self, hparams: Mapping[str, Tensor]) -> None:
        """Continue with new hyperparameters, keeping the tangents (real-time mode)."""
        self.hparams = detach(hparams)

    def advance(self, count: int) -> None:
        """Take `count` inner steps, updating the tangents."""
        losses = None  # one buffer, as in InnerProblem.run
        for i in range(count):
            self.t += 1
            z, self.tangents, loss = self._step(self.t)
            check_shapes(self.problem.keys, self.z, z)
            if i == 0:
                losses = loss.new_empty(count)
            losses[i] = loss.detach()
            self.z = z
        if losses is not None:
            check_finite_run(losses, self.z, self.t - count + 1)

    def _step(self, t: int):
        problem, hparams = self.problem, self.hparams

        def phi(z, h):
            return _functional_step(problem, z, h, t)

        def push(tangent_z, tangent_h):
            return jvp(phi, (self.z, hparams), (tangent_z, tangent_h), has_aux=True)

        if self.vectorize:
            return vmap(push, out_dims=(None, 0, None))(self.tangents, self.basis)
        columns = [
            push(tuple(v[j] for v in self.tangents), {k: v[j] for k, v in self.basis.items()})
            for j in range(self.size)
        ]
        z, _, loss = columns[0]
        tangents = tuple(torch.stack(c) for c in zip(*(col[1] for col in columns)))
        return z, tangents, loss

    def state_dict(self) -> dict:
        """The inner state, its tangents and the step count (copies)."""
        return {
            "z": [v.detach().clone() for v in self.z],
            "tangents": [v.detach().clone() for v in self.tangents],
            "t": self.t,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state_dict()``'s output (of a solver of the same problem)."""
        for name, now in (("z", self.z), ("tangents", self.tangents)):
            shapes = [tuple(v.shape) for v in state[name]]
            if shapes != [tuple(v.shape) for v in now]:
                raise ValueError(f"state: its {name} have shapes {shapes}, not this solver's")
        self.z = tuple(v.to(now.device).clone() for v, now in zip(state["z"], self.z))
        self.tangents = tuple(
            v.to(now.device).clone() for v, now in zip(state["tangents"], self.tangents)
        )
        self.t = int(state["t"])

    def vjp(self, adjoint: Mapping[str, Tensor], initial: bool = False):
        """Z_T^T times a cotangent on w_T, as a dict like the hyperparameters (no w_0 part:
        that would be a d x d Jacobian)."""
        n = len(self.problem.keys)
        flat = sum(
            tangent.reshape(self.size, -1) @ adjoint[k].reshape(-1)  # 0-dim parameters too
            for k, tangent in zip(self.problem.keys, self.tangents[:n])
        )
        return _unflatten(flat, self.hparams), None


def _functional_step(problem: InnerProblem, z, hparams, t: int):
    params, state = problem.unpack(z)

    grads, loss = grad_and_value(lambda p: evaluate("inner", problem.inner, p, hparams, t))(params)
    new_params, new_state = problem.dynamics.step(params, state, grads, hparams, t)
    return problem.pack(new_params, new_state), loss


def _undetached_start(problem: InnerProblem, init, hparams) -> Flat:
    params = init(hparams)
    params = {k: params[k] for k in problem.keys}
    return problem.pack(params, problem.dynamics.init(params))


def _basis(hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The m unit directions of the hyperparameters, as a batch of dicts [m, *shape]."""
    total = sum(v.numel() for v in hparams.values())
    some = next(iter(hparams.values()))
    eye = torch.eye(total, dtype=some.dtype, device=some.device)
    return _unflatten(eye, hparams, batch=(total,))


def _unflatten(flat: Tensor, like: Mapping[str, Tensor], batch: tuple[int, ...] = ()):
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = flat[..., offset : offset + v.numel()].reshape(batch + v.shape)
        offset += v.numel()
    return out
