"""What every workload shares: synthetic data, the implementation list, errors, references."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

Run = Callable[[], Tensor | None]  # one timed call; returns the flat hypergradient or None
LOWER_BOUND = "lower-bound"
# Each peer and what `import` of it needs beyond torch, numpy and typing-extensions (which
# bilevel's own install brings): the distributions to `pip install --no-deps` so that pip keeps
# your torch. torchopt imports optree, and graphviz in torchopt.visual, on `import torchopt`.
PEERS = {"higher": ("higher",), "torchopt": ("torchopt", "optree", "graphviz")}


@dataclass(frozen=True)
class Impl:
    """One row of a workload: `needs` names a peer package that must be importable; `skip`
    says why the row is listed but not run."""

    name: str
    needs: str | None = None
    note: str = ""
    skip: str | None = None


def missing_peer(impl: Impl) -> str | None:
    """Why the row cannot run here, or None."""
    if impl.skip:
        return impl.skip
    if impl.needs:
        needed = PEERS[impl.needs]
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install --no-deps {' '.join(needed)})"
    return None


def size_key(size: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(size.items()))


def flat(tensors) -> Tensor:
    """One float64 vector of a tensor, a dict or a sequence of tensors (for error measures)."""
    if isinstance(tensors, Tensor):
        return tensors.detach().double().flatten()
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([v.detach().double().flatten() for v in values])


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    estimate, reference = flat(estimate).cpu(), flat(reference).cpu()
    return float((estimate - reference).norm() / reference.norm().clamp_min(1e-300))


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "bilevel" / "bench"
    path = Path(os.environ.get("BILEVEL_BENCH_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def reference_path(workload: str, size: dict) -> Path:
    return cache_dir() / f"{workload}-{size_key(size)}.pt"


def classification_data(n: int, n_val: int, dim: int = 784, classes: int = 10, seed: int = 0):
    """MNIST-sized synthetic data: a random linear teacher with label noise on half the
    training set (the data hyper-cleaning setting). Returns float32 (X, y, X_val, y_val)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=g) / dim**0.5
    X = torch.randn(n + n_val, dim, generator=g)
    y = (X @ teacher + 0.5 * torch.randn(n + n_val, classes, generator=g)).argmax(1)
    corrupt = torch.rand(n, generator=g) < 0.5
    y[:n] = torch.where(corrupt, torch.randint(0, classes, (n,), generator=g), y[:n])
    return X[:n], y[:n], X[n:], y[n:]
