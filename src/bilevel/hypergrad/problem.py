"""The inner problem shared by every method: one optimisation step, and runs of them.

The full inner state z is a flat tuple of tensors: the parameters in key order,
then each optimiser slot (velocity, moments) in the same order. Methods work on
these tuples so that autograd and torch.func see plain sequences of tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dynamics import Dynamics, Params
from ..errors import InnerDivergenceError

Objective = Callable[[Params, Mapping[str, Tensor]], Tensor]
Flat = tuple[Tensor, ...]
Init = Params | Callable[[Mapping[str, Tensor]], Params]


@dataclass(frozen=True)
class InnerProblem:
    """An inner objective L(w, lambda, t) optimised by `dynamics` over parameters named `keys`.

    `inner` here always takes the step number t (1..T) as a third argument, so that
    minibatch objectives can pick their batch by t (see `with_step`).
    """

    inner: Callable[[Params, Mapping[str, Tensor], int], Tensor]
    dynamics: Dynamics
    keys: tuple[str, ...]

    # -- layout of the flat state -------------------------------------------------
    def pack(self, params: Params, state) -> Flat:
        return tuple(params[k] for k in self.keys) + tuple(
            slot[k] for slot in state for k in self.keys
        )

    def unpack(self, z: Sequence[Tensor]):
        n = len(self.keys)
        params = dict(zip(self.keys, z[:n]))
        state = tuple(dict(zip(self.keys, z[i : i + n])) for i in range(n, len(z), n))
        return params, state

    def params_of(self, z: Sequence[Tensor]) -> Params:
        return dict(zip(self.keys, z[: len(self.keys)]))

    def start(self, init: Init, hparams: Mapping[str, Tensor]) -> Flat:
        """z_0 from w_0 (a dict, or Phi_0(hparams)); detached, optimiser state at its init."""
        params = init(hparams) if callable(init) else init
        params = {k: params[k].detach() for k in self.keys}
        return self.pack(params, self.dynamics.init(params))

    def adjoint(self, params_adjoint: Mapping[str, Tensor], z: Sequence[Tensor]) -> Flat:
        """A cotangent on the whole state from one on the parameters (slots get zeros)."""
        n = len(self.keys)
        return tuple(params_adjoint[k] for k in self.keys) + tuple(
            torch.zeros_like(s) for s in z[n:]
        )

    # -- one step -------------------------------------------------------------------
    def gradients(self, params: Params, hparams, t: int, create_graph: bool):
        """L and dL/dw by autograd; parameters the objective ignores get zeros."""
        with torch.enable_grad():
            loss = evaluate("inner", self.inner, params, hparams, t)
            if not loss.requires_grad:
                raise ValueError(
                    "the inner objective does not depend on params (its value has no autograd "
                    "graph): did it detach, or go through .item() or numpy?"
                )
            values = [params[k] for k in self.keys]
            grads = torch.autograd.grad(loss, values, create_graph=create_graph, allow_unused=True)
        grads = {
            k: torch.zeros_like(v) if g is None else g for k, v, g in zip(self.keys, values, grads)
        }
        return loss, grads

    def step(self, z: Sequence[Tensor], hparams, t: int) -> tuple[Flat, Tensor]:
        """Phi_t with its autograd graph: z's tensors must require grad or be in a graph."""
        params, state = self.unpack(z)
        loss, grads = self.gradients(params, hparams, t, create_graph=True)
        with torch.enable_grad():
            new_params, new_state = self.dynamics.step(params, state, grads, hparams, t)
        return self.pack(new_params, new_state), loss

    def step_detached(self, z: Sequence[Tensor], hparams, t: int) -> tuple[Flat, Tensor]:
        """Phi_t without any graph: the cheapest step, for the parts nobody differentiates."""
        params, state = self.unpack(z)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss, grads = self.gradients(leaves, hparams, t, create_graph=False)
        with torch.no_grad():
            new_params, new_state = self.dynamics.step(params, state, grads, hparams, t)
        return self.pack(new_params, new_state), loss.detach()

    # -- runs -----------------------------------------------------------------------
    def run(
        self,
        z: Flat,
        hparams,
        first: int,
        count: int,
        graph: bool = False,
        checkpoints=None,  # anything with append((t, z)): a list, or reverse.StateStore
        every: int = 0,
        check: bool = True,
    ) -> Flat:
        """Steps first .. first+count-1 from z: shapes checked after the first step, divergence
        once at the end (replays of steps already checked pass check=False).

        With `checkpoints`, appends (t, z_{t-1}) before every `every`-th step.
        """
        if not graph:
            hparams = detach(hparams)
        step = self.step if graph else self.step_detached
        losses = None  # one buffer: a small tensor kept per step would fragment the heap
        for i, t in enumerate(range(first, first + count)):
            if checkpoints is not None and i % every == 0:
                checkpoints.append((t, z))
            z_next, loss = step(z, hparams, t)
            if i == 0:
                losses = loss.new_empty(count)
                if check:  # metadata only: before a wrong shape breaks the next step
                    check_shapes(self.keys, z, z_next)
            losses[i] = loss.detach()
            z = z_next
        if losses is not None and check:
            check_finite_run(losses, z, first)
        return z


def detach(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in tensors.items()}


def leaves(z: Sequence[Tensor]) -> Flat:
    """Fresh leaves that require grad, to start a differentiated segment of steps."""
    return tuple(v.detach().requires_grad_(True) for v in z)


def vjp(outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor]):
    """Vector-Jacobian product through an existing graph; zeros where no path exists."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    wanted = [i for i in inputs if i.requires_grad]
    grads = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True)
        if pairs and wanted
        else [None] * len(wanted)
    )
    result = []
    for i in inputs:
        g = next(grads) if i.requires_grad else None
        result.append(torch.zeros_like(i) if g is None else g)
    return tuple(result)


def with_step(inner: Callable) -> Callable[[Params, Mapping[str, Tensor], int], Tensor]:
    """The inner objective as a function of (params, hparams, t).

    Users write `inner(params, hparams)`, or `inner(params, hparams, t)` when the
    objective changes with the step (a minibatch chosen by t). It must be a pure
    function of t: reverse mode replays steps and must see the same batch again.
    """
    try:
        signature = inspect.signature(inner)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return lambda params, hparams, t: inner(params, hparams)
    kinds = [p.kind for p in signature.parameters.values()]
    positional = [
        k
        for k in kinds
        if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) >= 3 or inspect.Parameter.VAR_POSITIONAL in kinds:
        return inner
    return lambda params, hparams, t: inner(params, hparams)


def evaluate(which: str, objective: Callable, params, hparams, *step) -> Tensor:
    """objective(params, hparams[, t]) as a 0-dim tensor; a missing key is explained.

    A one-element result of any shape, (1,) or (1, 1), is taken as the scalar it holds.
    """
    try:
        value = objective(params, hparams, *step)
    except KeyError as error:
        key = error.args[0] if error.args else None
        if isinstance(key, str) and key not in params and key not in hparams:
            raise KeyError(
                f"the {which} objective asked for {key!r}, which is neither in params "
                f"{sorted(params)} nor in hparams {sorted(hparams)}"
            ) from error
        raise
    check_scalar(which, value)
    return value.reshape(())  # so that every method sees the same 0-dim value


def check_scalar(which: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"the {which} objective must return a tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"the {which} objective must return a scalar, got a tensor of shape "
            f"{tuple(value.shape)} (reduce it with .sum() or .mean())"
        )


def check_shapes(keys: Sequence[str], before: Sequence[Tensor], after: Sequence[Tensor]) -> None:
    """A step must keep every shape; a setting that broadcasts would silently change them."""
    for i, (old, new) in enumerate(zip(before, after)):
        if old.shape != new.shape:
            key = keys[i % len(keys)]
            raise ValueError(
                f"an inner step changed the shape of {key!r} from {tuple(old.shape)} to "
                f"{tuple(new.shape)}: a setting of the dynamics (lr, momentum, weight decay, "
                "...) has a shape that broadcasts against it"
            )


def check_finite_run(losses: Tensor, z: Sequence[Tensor], first: int) -> None:
    """One synchronisation per run: find the first non-finite inner loss, if any."""
    finite = torch.stack([torch.isfinite(losses).all(), *(torch.isfinite(v).all() for v in z)])
    if bool(finite.all()):
        return
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step = first + int(bad.nonzero()[0, 0])
        value = float(losses[step - first])
        raise InnerDivergenceError(
            f"the inner objective became {value} at step {step}: the inner trajectory "
            "diverged; try a smaller inner learning rate"
        )
    raise InnerDivergenceError(
        f"the inner state became NaN or infinite at step {first + len(losses) - 1}: the "
        "inner trajectory diverged; try a smaller inner learning rate"
    )
