"""Forward mode (FMD): carry the tangents Z_t = dz_t/dlambda along with the inner run.

Z_t = A_t Z_{t-1} + B_t is one Jacobian-vector product per scalar
hyperparameter and step. Memory is O(m d) whatever T is, so this suits few
scalar hyperparameters and long runs. `ForwardSolver` can be advanced and
queried at any time, which is what real-time hyperparameter optimisation (an
outer update every few inner steps, in one run) needs.

The products are taken by reverse over reverse, not by forward-mode AD: each
step runs once with its autograd graph (exactly reverse mode's step), and the m
products come from backward passes through that one graph (`_jvps`). So

- every column sees the primal step's own random draws (dropout), as reverse
  mode does from the same seed;
- only backward formulas are needed: torch.func.jvp needs forward-AD formulas of
  the backward ops, which some losses lack (huber_loss) or get wrong
  (mse_loss's writes into the ZeroTensor that stands for its target's tangent);
- no forward-AD ZeroTensors: every op between a tangent and a constant (the
  data) made one, whose shape PyTorch works out in Python (~0.25 ms an op): that
  made small problems 10x slower than reverse mode (benchmarks/forward_overhead.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import validate
from .problem import (
    Flat,
    Init,
    InnerProblem,
    RandomState,
    check_finite_run,
    check_shapes,
    detach,
    leaf_dict,
    leaves,
)


def forward(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    vectorize: bool = True,
) -> ForwardSolver:
    """Run T steps carrying the tangents; the result pulls back a cotangent with Z_T^T.

    vectorize: take each step's m Jacobian-vector products as one backward pass batched
    by vmap (True), or as m backward passes in turn (False: less memory, same numbers).
    """
    solver = ForwardSolver(problem, init, hparams, vectorize=vectorize)
    solver.advance(steps)
    return solver


class ForwardSolver:
    """The inner state and its tangents with respect to every scalar hyperparameter."""

    def __init__(self, problem: InnerProblem, init: Init, hparams, *, vectorize: bool = True):
        self.problem, self.vectorize = problem, validate.boolean("vectorize", vectorize)
        self.init = init
        self.info: dict = {}  # the Solution contract; forward mode has nothing to report
        self.hparams = detach(hparams)
        self.basis = _basis(self.hparams)
        self.z, self.tangents = self._start(init)
        self.t = 0

    @property
    def params(self):
        return self.problem.params_of(self.z)

    def _start(self, init: Init) -> tuple[Flat, Flat]:
        """z_0 and its tangents: zeros for a constant w_0, Phi_0's jvps for a callable one."""
        problem = self.problem
        if not callable(init):
            z = problem.start(init, self.hparams)
            return z, tuple(v.new_zeros((self.size,) + v.shape) for v in z)
        lam = leaf_dict(self.hparams)
        with torch.enable_grad():  # one call of Phi_0: a random one is drawn once
            params = init(lam)
            params = {k: params[k] for k in problem.keys}
            z = problem.pack(params, problem.dynamics.init(params))
            tangents = _jvps(z, tuple(lam.values()), tuple(self.basis.values()), self.vectorize)
        return tuple(v.detach() for v in z), tangents

    @property
    def size(self) -> int:
        return sum(v.numel() for v in self.hparams.values())

    def set_hparams(self, hparams: Mapping[str, Tensor]) -> None:
        """Continue with new values of the hyperparameters, keeping the tangents (real-time
        mode): the same keys and shapes, which the tangents and the basis are laid out by."""
        new = detach(hparams)
        layout = {k: tuple(v.shape) for k, v in new.items()}
        expected = {k: tuple(v.shape) for k, v in self.hparams.items()}
        if layout != expected:
            raise ValueError(
                f"hparams: the solver started with keys and shapes {expected}, got {layout}"
            )
        self.hparams = new

    def advance(self, count: int) -> None:
        """Take `count` inner steps, updating the tangents."""
        losses = None  # one buffer, as in InnerProblem.run
        start, hparams, first = self.z, self.hparams, self.t + 1
        random = RandomState.capture(start)  # to replay the run if it goes non-finite
        for i in range(count):
            self.t += 1
            z, self.tangents, loss = self._step(self.t)
            check_shapes(self.problem.keys, self.z, z)
            if i == 0:
                losses = loss.new_empty(count)
            losses[i] = loss.detach()
            self.z = z
        if losses is not None:
            check_finite_run(
                losses,
                self.z,
                first,
                lambda: self.problem.diagnose(start, hparams, first, count, random),
            )

    def _step(self, t: int):
        """z_t, its tangents and the inner loss: one step with its graph, then m products."""
        z, lam = leaves(self.z), leaf_dict(self.hparams)
        z_next, loss = self.problem.step(z, lam, t)
        directions = (*self.tangents, *self.basis.values())
        with torch.enable_grad():
            tangents = _jvps(z_next, (*z, *lam.values()), directions, self.vectorize)
        return tuple(v.detach() for v in z_next), tangents, loss.detach()

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
        self.z = tuple(v.to(now).clone() for v, now in zip(state["z"], self.z))  # device, dtype
        self.tangents = tuple(v.to(now).clone() for v, now in zip(state["tangents"], self.tangents))
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


def _jvps(outputs: Flat, inputs: Flat, directions: Flat, vectorize: bool) -> Flat:
    """J v for m directions v at once, J = d outputs / d inputs: `directions` holds one
    batch [m, *shape] per input, the result one batch [m, *shape] per output (zeros for
    outputs that no input reaches). Inputs must be leaves that require grad."""
    live = [i for i, v in enumerate(outputs) if v.requires_grad]
    found = {}
    if live:
        products = _products([outputs[i] for i in live], inputs, directions, vectorize)
        found = dict(zip(live, products))
    size = directions[0].shape[0]
    return tuple(
        v.new_zeros((size,) + v.shape) if found.get(i) is None else found[i]
        for i, v in enumerate(outputs)
    )


def _products(outputs: list[Tensor], inputs: Flat, directions: Flat, vectorize: bool):
    """Reverse over reverse: u -> J^T u is linear, so J v is the gradient of <J^T u, v>
    with respect to u (at u = 0). One backward builds J^T u with its graph; the m
    products are backward passes through it, batched by vmap (`vectorize`) or in turn.
    None where an output does not depend on the inputs."""
    dummies = [torch.zeros_like(v, requires_grad=True) for v in outputs]
    pulled = torch.autograd.grad(outputs, inputs, dummies, create_graph=True, allow_unused=True)
    # an input's J^T u that does not require grad is a zero from a flat derivative (sign)
    pairs = [(p, v) for p, v in zip(pulled, directions) if p is not None and p.requires_grad]
    if not pairs:
        return [None] * len(outputs)
    adjoints, batches = zip(*pairs)
    if vectorize:
        return torch.autograd.grad(
            adjoints, dummies, batches, is_grads_batched=True, allow_unused=True
        )
    size = batches[0].shape[0]
    columns = [
        torch.autograd.grad(
            adjoints, dummies, [v[j] for v in batches], retain_graph=j < size - 1,
            allow_unused=True,
        )
        for j in range(size)
    ]  # fmt: skip
    return [None if c[0] is None else torch.stack(c) for c in zip(*columns)]


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
