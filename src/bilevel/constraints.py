"""Euclidean projections for constrained hyperparameters.

Projected hypergradient descent keeps hyperparameters feasible by mapping them back onto their
set after every outer step. Each projection here is a small immutable callable so that it can be
stored in a configuration, compared and printed. All of them treat the tensor as one flat vector,
return a new tensor of the input's shape, dtype and device, and are vectorised (sorting at most),
so they stay cheap next to the hypergradient itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Box", "L1Ball", "Simplex", "project"]

Projection = Callable[[Tensor], Tensor]


def _real(name: str, value: object) -> float:
    # bool is an int subclass; accepting True as 1.0 would hide a swapped argument.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return value


def _positive_finite(name: str, value: object) -> float:
    value = _real(name, value)
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return value


def _check_tensor(x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {x.dtype}")


def _work_dtype(x: Tensor) -> torch.dtype:
    # The threshold comes from long prefix sums, whose rounding error grows with n; float32 misses
    # the budget by ~1e-5 relative at n = 1e6. Use float64 wherever the device has it (not MPS).
    return torch.float32 if x.device.type == "mps" else torch.float64


@dataclass(frozen=True)
class Box:
    """Clamp every entry into ``[low, high]``; infinite ends leave that side open."""

    low: float
    high: float

    def __post_init__(self) -> None:
        low = _real("low", self.low)
        high = _real("high", self.high)
        if low > high:
            raise ValueError(f"low must be <= high, got low={low!r}, high={high!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def __call__(self, x: Tensor) -> Tensor:
        _check_tensor(x)
        low = self.low if self.low > -math.inf else None
        high = self.high if self.high < math.inf else None
        if low is None and high is None:
            return x.clone()
        return torch.clamp(x, min=low, max=high)


@dataclass(frozen=True)
class L1Ball:
    """Projection onto ``{x : sum|x_i| <= radius, |x_i| <= bound, x_i >= 0 if nonnegative}``.

    With ``bound=1.0, nonnegative=True`` this is the feasible set of data hyper-cleaning
    (per-example weights in [0, 1] with a budget on their sum). The projection has the form
    ``sign(x) * clip(|x| - tau, 0, bound)``; ``tau`` is found exactly from the sorted breakpoints
    of that piecewise-linear function rather than by bisection, so the budget is met to rounding.
    """

    radius: float
    bound: float | None = None
    nonnegative: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", _positive_finite("radius", self.radius))
        if self.bound is not None:
            object.__setattr__(self, "bound", _positive_finite("bound", self.bound))
        if not isinstance(self.nonnegative, bool):
            raise ValueError(f"nonnegative must be a bool, got {self.nonnegative!r}")

    def __call__(self, x: Tensor) -> Tensor:
        _check_tensor(x)
        flat = x.reshape(-1).to(_work_dtype(x))
        if self.nonnegative:
            y = flat.clamp(min=0.0)
            sign = None
        else:
            y = flat.abs()
            sign = torch.sign(flat)
        n = y.numel()
        b = self.bound
        # The box alone decides when the budget cannot bind (bound * n <= radius).
        if n > 0 and not (b is not None and b * n <= self.radius):
            y = y - self._threshold(y)
        z = y.clamp(min=0.0, max=b)
        if sign is not None:
            z = z * sign
        return z.reshape(x.shape).to(x.dtype)

    def _threshold(self, y: Tensor) -> Tensor:
        """Smallest ``tau >= 0`` with ``sum(clip(y - tau, 0, bound)) <= radius`` (0-d tensor).

        ``f(tau) = sum(clip(y - tau, 0, bound))`` is continuous, decreasing and linear between
        the breakpoints ``y_i`` and ``y_i - bound``. Evaluating ``f`` at every breakpoint with
        prefix sums and ``searchsorted`` brackets the root in O(n log n); on the bracketing
        piece the active set is fixed, so the root is the solution of one linear equation.
        """
        b = self.bound
        r = self.radius
        ys, _ = torch.sort(y)
        n = ys.numel()
        prefix = torch.cat([ys.new_zeros(1), torch.cumsum(ys, 0)])
        zero = ys.new_zeros(1)
        cands = [zero, ys] if b is None else [zero, ys, (ys - b).clamp(min=0.0)]
        t, _ = torch.sort(torch.cat(cands))

        def f(tau: Tensor) -> tuple[Tensor, Tensor]:
            # Entries with y > tau + bound sit at the bound; tau < y <= tau + bound are active.
            lo = torch.searchsorted(ys, tau, right=True)
            if b is None:
                hi = torch.full_like(lo, n)
                capped = torch.zeros_like(tau)
            else:
                hi = torch.searchsorted(ys, tau + b, right=True)
                capped = b * (n - hi).to(ys.dtype)
            active = (hi - lo).to(ys.dtype)
            return capped + (prefix[hi] - prefix[lo]), active

        base, active = f(t)
        values = base - t * active
        if not bool(values[0] > r):  # already inside the ball: no shrinkage
            return t.new_zeros(())
        k = ((values >= r).sum() - 1).clamp(0, t.numel() - 2)
        left, right = t[k], t[k + 1]
        mid_base, mid_active = f(((left + right) / 2).reshape(1))
        tau = (mid_base[0] - r) / mid_active[0].clamp(min=1.0)
        tau = torch.where(mid_active[0] > 0, tau, left)
        return torch.minimum(torch.maximum(tau, left), right)


@dataclass(frozen=True)
class Simplex:
    """Projection onto ``{x : x_i >= 0, sum x_i = total}``, e.g. for mixture weights.

    Uses the sort-based threshold: the result is ``max(x - theta, 0)`` and, after sorting in
    decreasing order, ``theta`` is fixed by the largest prefix whose entries stay positive.
    """

    total: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", _positive_finite("total", self.total))

    def __call__(self, x: Tensor) -> Tensor:
        _check_tensor(x)
        if x.numel() == 0:
            raise ValueError("cannot project an empty tensor onto a simplex")
        flat = x.reshape(-1).to(_work_dtype(x))
        u, _ = torch.sort(flat, descending=True)
        excess = torch.cumsum(u, 0) - self.total
        k = torch.arange(1, u.numel() + 1, device=u.device, dtype=u.dtype)
        support = u * k > excess  # entry k stays positive if it is in the support
        rho = torch.where(support, k, torch.zeros_like(k)).max()
        theta = excess[rho.long() - 1] / rho
        z = (flat - theta).clamp(min=0.0)
        return z.reshape(x.shape).to(x.dtype)


def project(hparams: Mapping[str, Tensor], constraints: Mapping[str, Projection]) -> None:
    """Project each constrained hyperparameter in place after an outer step.

    In-place, so that optimiser state keyed on the tensors stays valid; under ``no_grad`` because
    the projection is not part of the hypergradient and leaves may require grad. Every key is
    checked before anything is modified, so a typo leaves all tensors untouched.
    """
    for key, proj in constraints.items():
        if key not in hparams:
            known = ", ".join(repr(k) for k in hparams) or "none"
            raise KeyError(f"constraint {key!r} names no hyperparameter (known: {known})")
        if not callable(proj):
            raise ValueError(f"constraint {key!r} must be callable, got {proj!r}")
    with torch.no_grad():
        for key, proj in constraints.items():
            tensor = hparams[key]
            projected = proj(tensor)
            if projected.shape != tensor.shape:
                raise ValueError(
                    f"constraint {key!r} changed the shape from {tuple(tensor.shape)} "
                    f"to {tuple(projected.shape)}"
                )
            tensor.copy_(projected)
