"""Mixed precision: the inner objective under torch.autocast, everything the dynamics keep in
float32.

    bilevel.hypergradient(..., precision="bf16")          # or bilevel.Precision(torch.bfloat16)
    bilevel.hypergradient(..., precision=bilevel.Precision(torch.float16, loss_scale=2**8))

What runs in the lower precision: the forward pass of the inner objective (and so its backward
and, for the differentiated steps, its double backward: autograd runs each backward op in the
dtype of its forward op). What stays float32: the parameters, the optimiser's state, the inner
loss (cast before differentiation), the gradient handed to the dynamics, the dynamics' step,
forward mode's tangents, the adjoints, the implicit solves and the hypergradient. The outer
objective runs in float32: it is evaluated once per hypergradient (1/T of the inner cost), and
its gradient seeds every method's pull-back.

float16 uses a FIXED loss scale, a power of two: the loss is multiplied by it before autograd
and the gradient divided by it after, which is exact in binary arithmetic, so the scaled
gradient equals the unscaled one wherever float16 neither overflows nor underflows. A dynamic
scale (torch.amp.GradScaler) skips a step on overflow and changes the scale: a skipped step is
another trajectory than the one differentiated, and every replay (reverse mode's trajectory and
checkpoints) and every method would have to reproduce the scale history. A fixed scale is the
same linear map in every replay and in every method; an overflow is an error (see
`InnerProblem.diagnose`), never a skipped step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import HypergradientError, InnerDivergenceError

DEFAULT_LOSS_SCALE = {torch.bfloat16: 1.0, torch.float16: 2.0**10}
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_SPELLINGS = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_FULL = ("fp32", "float32", "full", torch.float32)  # no autocast


@dataclass(frozen=True)
class Precision:
    """Run the inner objective under `torch.autocast(device, dtype)`; keep the state in float32.

    Attributes:
        dtype: torch.bfloat16 (float32's range, 8 significant bits: no scaling needed) or
            torch.float16 (11 significant bits, largest value 65504: needs a loss scale).
        loss_scale: a fixed power of two multiplying the inner loss before autograd (the
            gradient is divided by it after, exactly). None: 1 for bfloat16, 2**10 for float16.
            Raise it when small gradients flush to zero in float16, lower it when a step
            overflows (the error says so).
    """

    dtype: torch.dtype
    loss_scale: float | None = None

    def __post_init__(self):
        if self.dtype not in DEFAULT_LOSS_SCALE:
            raise ValueError(
                f"precision: dtype must be torch.bfloat16 or torch.float16, got {self.dtype!r} "
                "(precision=None runs everything in the tensors' own dtype)"
            )
        scale = DEFAULT_LOSS_SCALE[self.dtype] if self.loss_scale is None else self.loss_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not _power_of_two(scale)
        ):
            raise ValueError(
                f"precision: loss_scale must be a power of two such as 1024.0 (scaling by it is "
                f"then exact), got {self.loss_scale!r}"
            )
        object.__setattr__(self, "loss_scale", float(scale))

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    def __str__(self) -> str:
        scale = "" if self.loss_scale == 1.0 else f", loss_scale={self.loss_scale:g}"
        return f"{self.name}{scale}"

    def check(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> None:
        """Refuse what autocast would not lower, or could not run: called once per problem."""
        for group, tensors in (("params", params), ("hparams", hparams)):
            for key, tensor in tensors.items():
                if tensor.dtype != torch.float32:
                    raise TypeError(
                        f"precision={self.name!r} needs float32 {group} (the state the dynamics "
                        f"keep, which autocast lowers in each op), but {group}[{key!r}] is "
                        f"{tensor.dtype}: convert with .float(), or pass precision=None"
                    )
        device = next(iter(params.values())).device.type
        available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
        if available is not None and not available(device):
            raise ValueError(f"precision={self.name!r}: torch.autocast does not support {device}")
        if device == "cuda" and self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16': this GPU has no bfloat16; use precision='fp16'")

    def autocast(self, tensors: Sequence[Tensor]):
        """The autocast region for an objective of `tensors` (their device decides its kind)."""
        return torch.autocast(tensors[0].device.type, dtype=self.dtype)

    def gradients(
        self, loss: Tensor, values: Sequence[Tensor], create_graph: bool, retain_graph=None
    ):
        """(loss in float32, d loss / d values): the loss scaled before autograd, the gradient
        unscaled after (None where a value has no path to the loss)."""
        loss = loss.float()
        scale = self.loss_scale
        scaled = loss * scale if scale != 1.0 else loss
        grads = torch.autograd.grad(
            scaled, values, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
        )
        if scale != 1.0:
            grads = tuple(None if g is None else g / scale for g in grads)
        return loss, grads


def as_precision(value) -> Precision | None:
    """A `precision=` argument as a Precision, or None for full precision (no autocast).

    Accepts None, "fp32"/"float32", a Precision, "bf16"/"bfloat16", "fp16"/"float16"/"half",
    or the torch dtypes torch.float32, torch.bfloat16, torch.float16.
    """
    if value is None or isinstance(value, Precision):
        return value
    if isinstance(value, (str, torch.dtype)):
        key = value.lower() if isinstance(value, str) else value
        if key in _FULL:
            return None
        if key in _SPELLINGS:
            return Precision(_SPELLINGS[key])
        if key in DEFAULT_LOSS_SCALE:
            return Precision(key)
    raise ValueError(
        f"precision must be None, 'fp32', 'bf16', 'fp16', a torch dtype or a "
        f"bilevel.Precision, got {value!r}"
    )


def resolve(value, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]):
    """`as_precision(value)`, checked against the problem's tensors (`Precision.check`)."""
    precision = as_precision(value)
    if precision is not None:
        precision.check(params, hparams)
    return precision


def autocast(precision: Precision | None, tensors: Sequence[Tensor]):
    """`precision`'s autocast region, or no region at all for full precision."""
    return contextlib.nullcontext() if precision is None else precision.autocast(tensors)


def flag_overflow(loss: Tensor, grads: Mapping[str, Tensor]) -> Tensor:
    """The loss, or NaN where a gradient is not finite: a run checks its losses once at its end
    (no synchronisation per step), so an overflow in the gradient alone, which a dynamics could
    mask (a clamp, a sign), is still caught and then diagnosed by a replay."""
    finite = torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()
    return torch.where(finite, loss, torch.full_like(loss, math.nan))


def _power_of_two(value: float) -> bool:
    return math.isfinite(value) and value > 0 and math.frexp(value)[0] == 0.5


def overflow_error(
    precision: Precision,
    t: int,
    lowered: tuple[float, Mapping[str, Tensor]],
    full: tuple[Tensor, Mapping[str, Tensor]],
) -> InnerDivergenceError | None:
    """The error for a step t that is not finite under `precision` (its loss and gradients,
    `lowered`) but finite in float32 (`full`); None where float32 fails too (then the problem,
    not the precision, is at fault)."""
    loss, grads = full
    if not (bool(torch.isfinite(loss).all()) and all(_finite(g) for g in grads.values())):
        return None
    value, lowered_grads = lowered
    dtype, biggest = str(precision.dtype).removeprefix("torch."), torch.finfo(precision.dtype).max
    if not math.isfinite(value):
        return InnerDivergenceError(
            f"precision {precision}: the inner objective overflowed at step {t}: it is {value} "
            f"under autocast to {dtype} but {float(loss.detach()):.6g} in float32 (some activation "
            f"exceeds {dtype}'s largest value, {biggest:.5g}). Use precision='bf16' (float32's "
            "range), or compute that part in float32 (torch.autocast(..., enabled=False))"
        )
    bad = [k for k, g in lowered_grads.items() if not _finite(g)]
    largest = max(float(grads[k].abs().max()) for k in bad)
    advice = (
        f"a smaller loss_scale, e.g. bilevel.Precision(torch.float16, loss_scale="
        f"{max(precision.loss_scale / 16, 1.0):g}), or precision='bf16'"
        if precision.loss_scale > 1.0
        else "precision='bf16' (float32's range)"
    )
    return InnerDivergenceError(
        f"precision {precision}: the gradient of the inner objective with respect to {bad} "
        f"overflowed at step {t}: it is NaN or infinite in {dtype} (loss scaled by "
        f"{precision.loss_scale:g}) and finite in float32 (largest |dL/dw| = {largest:.3g}). Use "
        f"{advice}; a step is never skipped, since the hypergradient differentiates every step"
    )


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def check_hypergradient(grads: Mapping[str, Tensor], precision: Precision | None) -> None:
    """Raise HypergradientError if a hypergradient is not finite; under a precision, say that
    its pull-back ran through the lowered graph, and what to try."""
    bad = [k for k, g in grads.items() if not _finite(g)]
    if not bad:
        return
    message = f"the hypergradient of {bad[0]!r} is NaN or infinite"
    if precision is not None:
        message += (
            f" under precision {precision} (the inner run was finite): the pull-back's "
            f"products through the {precision.name} graph of the inner objective overflowed, "
            "or the hypergradient is not finite in float32 either (run with precision=None to "
            "tell)" + ("; try precision='bf16'" if precision.dtype == torch.float16 else "")
        )
    raise HypergradientError(message)
