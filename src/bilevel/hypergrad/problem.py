"""The inner problem shared by every method: one optimisation step, and runs of them.

The full inner state z is a flat tuple of tensors: the parameters in key order,
then each optimiser slot (velocity, moments) in the same order. Methods work on
these tuples so that autograd and torch.func see plain sequences of tensors.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..dynamics import Dynamics, Params
from ..errors import InnerDivergenceError
from ..precision import Precision, autocast, flag_overflow, overflow_error

Objective = Callable[[Params, Mapping[str, Tensor]], Tensor]
Flat = tuple[Tensor, ...]
Init = Params | Callable[[Mapping[str, Tensor]], Params]


@dataclass(frozen=True)
class InnerProblem:
    """An inner objective L(w, lambda, t) optimised by `dynamics` over parameters named `keys`.

    `inner` here always takes the step number t (1..T) as a third argument, so that
    minibatch objectives can pick their batch by t (see `with_step`). With a `precision`, the
    objective runs under autocast and everything else in float32 (bilevel.precision).
    """

    inner: Callable[[Params, Mapping[str, Tensor], int], Tensor]
    dynamics: Dynamics
    keys: tuple[str, ...]
    precision: Precision | None = None

    @property
    def full_precision(self) -> InnerProblem:
        """This problem without autocast: for the implicit system at w_T, formed once, whose
        solve would amplify a lowered precision's error by its condition number."""
        return self if self.precision is None else replace(self, precision=None)

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
    def gradients(
        self, params: Params, hparams, t: int, create_graph: bool, retain_graph: bool = False
    ):
        """L and dL/dw by autograd; parameters the objective ignores get zeros. Under a
        precision, L is reported as NaN where dL/dw overflowed (see `flag_overflow`).
        `retain_graph` keeps L's own graph (its activations) for a later `gradients_of`."""
        loss, grads = self._gradients(params, hparams, t, create_graph, retain_graph)
        return (loss if self.precision is None else flag_overflow(loss, grads)), grads

    def _gradients(
        self, params: Params, hparams, t: int, create_graph: bool, retain_graph: bool = False
    ):
        with torch.enable_grad():
            with autocast(self.precision, [params[k] for k in self.keys]):
                loss = evaluate("inner", self.inner, params, hparams, t)
            if not loss.requires_grad:
                raise ValueError(
                    "the inner objective does not depend on params (its value has no autograd "
                    "graph): did it detach, or go through .item() or numpy?"
                )
            return self.gradients_of(loss, params, create_graph, retain_graph)

    def gradients_of(self, loss: Tensor, params: Params, create_graph: bool, retain_graph=False):
        """(L, dL/dw) from L's graph, built by the objective at `params` (zeros where unused)."""
        values = [params[k] for k in self.keys]
        retain = retain_graph or create_graph
        with torch.enable_grad():
            if self.precision is None:
                grads = torch.autograd.grad(
                    loss, values, create_graph=create_graph, retain_graph=retain, allow_unused=True
                )
            else:  # float32 loss, scaled and unscaled
                loss, grads = self.precision.gradients(loss, values, create_graph, retain)
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
        leaves = leaf_dict(params)
        loss, grads = self.gradients(leaves, hparams, t, create_graph=False)
        with torch.no_grad():
            new_params, new_state = self.dynamics.step(params, state, grads, hparams, t)
        return self.pack(new_params, new_state), loss.detach()

    def step_keeping(self, z: Sequence[Tensor], hparams, t: int, kept) -> tuple[Flat, Tensor]:
        """Phi_t without the graph of its update, keeping the graph of L (its activations):
        appends (t, z as leaves, L) to `kept` (reverse.ActivationStore) for `step_kept`."""
        z = kept.place(z)  # as leaves
        params, state = self.unpack(z)
        with kept.watching():
            loss, grads = self.gradients(params, hparams, t, create_graph=False, retain_graph=True)
        with torch.no_grad():
            new_params, new_state = self.dynamics.step(params, state, grads, hparams, t)
        kept.append((t, z, loss))
        return self.pack(new_params, new_state), loss.detach()

    def step_kept(self, z: Flat, loss: Tensor, hparams, t: int) -> Flat:
        """Phi_t with its graph, from what `step_keeping` kept: L's graph is reused (the
        objective is not evaluated again), only dL/dw and the update are built."""
        params, state = self.unpack(z)
        _, grads = self.gradients_of(loss, params, create_graph=True)
        with torch.enable_grad():
            new_params, new_state = self.dynamics.step(params, state, grads, hparams, t)
        return self.pack(new_params, new_state)

    # -- runs -----------------------------------------------------------------------
    def run(
        self,
        z: Flat,
        hparams,
        first: int,
        count: int,
        graph: bool = False,
        checkpoints=None,  # anything with append((t, z, random state)): reverse.StateStore
        every: int = 0,
        check: bool = True,
        kept=None,  # reverse.ActivationStore
    ) -> Flat:
        """Steps first .. first+count-1 from z: shapes checked after the first step, divergence
        once at the end (replays of steps already checked pass check=False).

        With `checkpoints`, appends (t, z_{t-1}, the random state) before every `every`-th
        step, so that a replay from there draws what the step first drew (dropout masks).
        With `kept`, each step keeps its objective's graph there (`step_keeping`).
        """
        if not graph and kept is None:
            hparams = detach(hparams)
        start, random = z, RandomState.capture(z) if check else None
        if kept is not None:
            step = functools.partial(self.step_keeping, kept=kept)
        else:
            step = self.step if graph else self.step_detached
        losses = None  # one buffer: a small tensor kept per step would fragment the heap
        for i, t in enumerate(range(first, first + count)):
            if checkpoints is not None and i % every == 0:
                checkpoints.append((t, z, RandomState.capture(z)))
            z_next, loss = step(z, hparams, t)
            if i == 0:
                losses = loss.new_empty(count)
                if check:  # metadata only: before a wrong shape breaks the next step
                    check_shapes(self.keys, z, z_next)
            losses[i] = loss.detach()
            z = z_next
        if losses is not None and check:
            check_finite_run(
                losses, z, first, lambda: self.diagnose(start, hparams, first, count, random)
            )
        return z

    def diagnose(self, z: Flat, hparams, first: int, count: int, random: RandomState):
        """Why a run from z went non-finite: replays it (same random draws), checking the loss,
        the gradient and the new state of every step, and returns the error that says which
        failed first (naming the precision where the step is finite in float32). Only called
        after a failure, so its cost does not matter."""
        hparams, losses = detach(hparams), []  # |loss| so far: has the run blown up?
        with random.restored():
            for t in range(first, first + count):
                params, state = self.unpack(z)
                leaves = leaf_dict(params)
                drawn = RandomState.capture(z)  # this step's draws, to recompute it in float32
                loss, grads = self._gradients(leaves, hparams, t, create_graph=False)
                value = float(loss.detach())
                losses += [abs(value)] if math.isfinite(value) else []
                grew = bool(losses) and max(losses) > 1e6 * (losses[0] + 1.0)
                finite = math.isfinite(value) and all(
                    bool(torch.isfinite(g).all()) for g in grads.values()
                )
                if not finite and self.precision is not None:
                    with drawn.restored():
                        full = self.full_precision._gradients(leaves, hparams, t, False)
                    blame = overflow_error(self.precision, t, (value, grads), full)
                    if blame is not None:
                        return blame
                if not math.isfinite(value):
                    return _objective_error(value, t, grew, params)
                if not finite:
                    return _gradient_error(value, t, grew, grads)
                with torch.no_grad():
                    new_params, new_state = self.dynamics.step(params, state, grads, hparams, t)
                z = self.pack(new_params, new_state)
                if not all(bool(torch.isfinite(v).all()) for v in z):
                    return _divergence(f"the inner state became NaN or infinite at step {t}")
        return _divergence(f"the inner run from step {first} became NaN or infinite")


@dataclass(frozen=True)
class RandomState:
    """The random generators a step may draw from: the CPU one and those of the CUDA devices
    the state lives on. Replaying a step under the state it first ran with redraws the same
    dropout masks, as torch.utils.checkpoint does; without it a replay differentiates another
    trajectory than the one that ran."""

    cpu: Tensor
    cuda: tuple[tuple[int, Tensor], ...]

    @staticmethod
    def capture(tensors: Sequence[Tensor]) -> RandomState:
        devices = sorted({v.device.index or 0 for v in tensors if v.device.type == "cuda"})
        return RandomState(
            torch.get_rng_state(), tuple((d, torch.cuda.get_rng_state(d)) for d in devices)
        )

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Run a block from this state; the generators come back to where they were."""
        with torch.random.fork_rng(devices=[d for d, _ in self.cuda], device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda:
                torch.cuda.set_rng_state(state, device)
            yield


class SavedTensors:
    """The tensors autograd saves for backward inside `recording()`, held weakly: a tensor
    leaves the record when the graph that saved it is freed. Measures what graphs keep."""

    def __init__(self):
        self.records: weakref.WeakSet = weakref.WeakSet()

    def recording(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _Saved.unpack)

    def _pack(self, tensor: Tensor) -> _Saved:
        record = _Saved(tensor)
        self.records.add(record)
        return record

    def __len__(self) -> int:
        return len(self.records)

    def tensors(self) -> list[Tensor]:
        return [record.tensor for record in list(self.records)]

    def storages(self) -> dict:
        """{storage: bytes} of the recorded tensors: views of one storage count once."""
        return {storage_key(t): _storage_bytes(t) for t in self.tensors()}

    def bytes_not_in(self, other: SavedTensors) -> int:
        """Bytes of the storages recorded here and not in `other` (alive together: no address
        is shared): what one step adds beyond what persists across steps (data)."""
        before = other.storages()
        return sum(size for key, size in self.storages().items() if key not in before)


def storage_key(tensor: Tensor):
    """What identifies the memory a tensor lives in: (device, address) of its storage, or the
    tensor itself where it has no plain storage (a wrapper subclass)."""
    try:
        return (tensor.device, tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return id(tensor)


def _storage_bytes(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return tensor.numel() * tensor.element_size()


class _Saved:
    """What a graph holds in place of a saved tensor while it is recorded; alive exactly as
    long as the graph keeps the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def unpack(self) -> Tensor:
        return self.tensor


def detach(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in tensors.items()}


def leaves(z: Sequence[Tensor]) -> Flat:
    """Fresh leaves that require grad, to start a differentiated segment of steps."""
    return tuple(v.detach().requires_grad_(True) for v in z)


def leaf_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`leaves` for a dict: detached copies that require grad, to differentiate from."""
    return {k: v.detach().requires_grad_(True) for k, v in tensors.items()}


def vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], **options
):
    """Vector-Jacobian product through an existing graph; zeros where no path exists.
    `options` go to torch.autograd.grad (retain_graph, create_graph)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    wanted = [i for i in inputs if i.requires_grad]
    grads = iter(
        torch.autograd.grad(
            [o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True, **options
        )
        if pairs and wanted
        else [None] * len(wanted)
    )
    result = []
    for i in inputs:
        g = next(grads) if i.requires_grad else None
        result.append(torch.zeros_like(i) if g is None else g)
    return tuple(result)


STEP_NAMES = ("step", "t")


def with_step(inner: Callable) -> Callable[[Params, Mapping[str, Tensor], int], Tensor]:
    """The inner objective as a function of (params, hparams, t).

    Users write `inner(params, hparams)`, or declare the step number t (1..T) when the
    objective changes with it (a minibatch chosen by t): as a third positional parameter
    without a default, or as a parameter named `step` or `t` (passed by keyword). Any other
    extra parameter (`scale=1.0`, `*args`) keeps its own value. The objective must be a pure
    function of t: reverse mode replays steps and must see the same batch again.
    """
    try:
        parameters = list(inspect.signature(inner).parameters.values())
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return lambda params, hparams, t: inner(params, hparams)
    named = [p.name for p in parameters[2:] if p.name in STEP_NAMES and p.kind in _NAMED]
    if named:
        name = named[0]
        return lambda params, hparams, t: inner(params, hparams, **{name: t})
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    if len(positional) >= 3 and positional[2].default is inspect.Parameter.empty:
        return inner
    return lambda params, hparams, t: inner(params, hparams)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


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


def check_finite_run(
    losses: Tensor, z: Sequence[Tensor], first: int, diagnose: Callable[[], Exception] | None = None
) -> None:
    """One synchronisation per run: raise if any inner loss or the final state is not finite;
    `diagnose()` (a replay) says why, else the first non-finite loss is named."""
    finite = torch.stack([torch.isfinite(losses).all(), *(torch.isfinite(v).all() for v in z)])
    if bool(finite.all()):
        return
    if diagnose is not None:
        raise diagnose()
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step = first + int(bad.nonzero()[0, 0])
        value = float(losses[step - first])
        raise _divergence(f"the inner objective became {value} at step {step}")
    raise _divergence(f"the inner state became NaN or infinite by step {first + len(losses) - 1}")


def _divergence(what: str) -> InnerDivergenceError:
    return InnerDivergenceError(
        f"{what}: the inner trajectory diverged; try a smaller inner learning rate"
    )


def _largest(tensors: Mapping[str, Tensor]) -> float:
    return max(float(v.detach().abs().max()) if v.numel() else 0.0 for v in tensors.values())


def _objective_error(value: float, t: int, grew: bool, params: Params) -> InnerDivergenceError:
    if grew or math.isinf(value) or not math.isfinite(_largest(params)):
        return _divergence(f"the inner objective became {value} at step {t}")
    return InnerDivergenceError(
        f"the inner objective returned {value} at step {t} although the parameters were finite "
        f"(largest |w| = {_largest(params):.3g}) and the objective had not grown: the objective "
        "itself produces it there (log or sqrt of a negative number, 0/0, inf - inf, ...)"
    )


def _gradient_error(value: float, t: int, grew: bool, grads: Params) -> InnerDivergenceError:
    if grew:
        return _divergence(f"the inner gradient became NaN or infinite at step {t}")
    bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    return InnerDivergenceError(
        f"the gradient of the inner objective with respect to {bad} is NaN or infinite at step "
        f"{t} although its value ({value:.6g}) is finite: the objective is not differentiable "
        "there (sqrt or norm at 0, for instance: write sqrt(x + eps) or add eps inside the norm)"
    )
