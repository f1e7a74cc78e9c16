"""The stochastic bilevel problem and its minibatch sampler.

    min_x h(x) = F(x, z*(x)),   z*(x) = argmin_z G(x, z),
    G(x, z) = 1/n_inner sum_i g_i(x, z),   F(x, z) = 1/n_outer sum_j f_j(x, z).

The user gives `inner(x, z, batch)` and `outer(x, z, batch)`: the MEAN of g_i (f_j) over the
indices in `batch`, a 1-D LongTensor. The stochastic solvers need only these products, all
computed by autograd without forming a matrix (one backward, and one double backward, each):

    inner_gradient      grad_z g_B
    inner_products      (grad_z g_B, d2_zz g_B v, d2_xz g_B v), one double backward for all three
    outer_gradients     (grad_x f_B, grad_z f_B)
    inner_gradients     (grad_x g_B, grad_z g_B), for the first-order solvers

With v*(x) = -[d2_zz G]^{-1} grad_z F at z*(x) (the sign of Dagreou et al. 2022), the
hypergradient is grad h(x) = grad_x F + d2_xz G v*: every solver here approximates z*, v* and
that sum. The problem works on flat 1-D copies of x and z (their dicts are views of them inside
the objectives), so solvers do their arithmetic, and keep their memories, on plain vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .. import validate

StochasticObjective = Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], Tensor]


class Layout:
    """The keys and shapes of a dict of tensors, to flatten it into one vector and back."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.keys = list(tensors)
        self.shapes = [tensors[k].shape for k in self.keys]
        self.sizes = [tensors[k].numel() for k in self.keys]
        self.size = sum(self.sizes)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[k].detach().reshape(-1) for k in self.keys])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of `flat` (gradients reach it through them)."""
        parts = torch.split(flat, self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes)}


class Sampler:
    """Seeded minibatch draws from one CPU torch.Generator; its state travels in the solver's
    state_dict, so a resumed run draws the batches the uninterrupted run would have drawn.

    Args:
        seed: an int.
    """

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def batch(self, n: int, size: int) -> Tensor:
        """`size` distinct indices of range(n), uniformly at random (without replacement within
        the batch, independently between batches)."""
        return torch.randperm(n, generator=self.generator)[:size]

    def index(self, n: int) -> int:
        """One index of range(n), uniformly at random."""
        return int(torch.randint(n, (1,), generator=self.generator))

    def gaussian(self, rows: int, columns: int, dtype: torch.dtype) -> Tensor:
        """A (rows, columns) CPU tensor of independent N(0, 1) entries, in `dtype`."""
        return torch.randn(rows, columns, generator=self.generator, dtype=dtype)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])


class StochasticProblem:
    """A bilevel problem whose objectives are means over samples, validated once.

    Args:
        inner: `inner(x, z, batch) -> scalar`, the mean of g_i(x, z) over the indices in `batch`
            (a 1-D LongTensor on the tensors' device); strongly convex in z.
        outer: `outer(x, z, batch) -> scalar`, the mean of f_j(x, z) over `batch`.
        x: the outer variables' starting values, a dict of str -> Tensor.
        z: the inner variables' starting values, a dict of str -> Tensor (the linear-system
            variable v has the same structure and starts at zero).
        n_inner: the number of inner samples (indices 0 .. n_inner - 1).
        n_outer: the number of outer samples.

    The objectives are called once here on the batch [0, n - 1], so a wrong signature, a
    non-scalar value or a size larger than the data fails here, by name.
    """

    def __init__(
        self,
        inner: StochasticObjective,
        outer: StochasticObjective,
        x: Mapping[str, Tensor],
        z: Mapping[str, Tensor],
        n_inner: int,
        n_outer: int,
    ):
        validate.objective("inner", inner)
        validate.objective("outer", outer)
        validate.tensor_dict("x", x)
        validate.tensor_dict("z", z)
        _same_kind({f"{name}[{k!r}]": t for name, d in (("x", x), ("z", z)) for k, t in d.items()})
        self.inner, self.outer = inner, outer
        self.n_inner = validate.positive_int("n_inner", n_inner)
        self.n_outer = validate.positive_int("n_outer", n_outer)
        self.x_layout, self.z_layout = Layout(x), Layout(z)
        self.x0, self.z0 = self.x_layout.flatten(x), self.z_layout.flatten(z)
        self.dtype, self.device = self.x0.dtype, self.x0.device
        self._check("inner", inner, self.n_inner, needs_z=True)
        self._check("outer", outer, self.n_outer, needs_z=False)

    # -- products ----------------------------------------------------------------------------

    def inner_value(self, x: Tensor, z: Tensor, batch: Tensor) -> Tensor:
        """g_B(x, z), without a graph."""
        return self._value(self.inner, x, z, batch)

    def outer_value(self, x: Tensor, z: Tensor, batch: Tensor) -> Tensor:
        """f_B(x, z), without a graph."""
        return self._value(self.outer, x, z, batch)

    def _value(self, objective, x: Tensor, z: Tensor, batch: Tensor) -> Tensor:
        with torch.no_grad():
            return objective(self.x_layout.unflatten(x), self.z_layout.unflatten(z), batch)

    def inner_gradient(self, x: Tensor, z: Tensor, batch: Tensor) -> Tensor:
        """grad_z g_B(x, z)."""
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.inner(self.x_layout.unflatten(x), self.z_layout.unflatten(z), batch)
            return _grads(value, [z])[0]

    def inner_products(self, x: Tensor, z: Tensor, v: Tensor, batch: Tensor):
        """(grad_z g_B, d2_zz g_B v, d2_xz g_B v) at (x, z): one backward with its graph and one
        backward through it (g_B's Hessian is symmetric, so the vector-Jacobian product of
        grad_z g_B with v is the Hessian-vector product)."""
        x, z = x.detach().requires_grad_(True), z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.inner(self.x_layout.unflatten(x), self.z_layout.unflatten(z), batch)
            (gradient,) = _grads(value, [z], create_graph=True)
            hessian_v, cross_v = _grads(gradient, [z, x], v)
        return gradient.detach(), hessian_v, cross_v

    def outer_gradients(self, x: Tensor, z: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(grad_x f_B, grad_z f_B) at (x, z)."""
        return self._gradients(self.outer, x, z, batch)

    def inner_gradients(self, x: Tensor, z: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(grad_x g_B, grad_z g_B) at (x, z), by one backward: the oracle of the first-order
        solvers (F2SA, BOME), which need g's gradient in x and never its second derivatives."""
        return self._gradients(self.inner, x, z, batch)

    def _gradients(self, objective, x: Tensor, z: Tensor, batch: Tensor):
        x, z = x.detach().requires_grad_(True), z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = objective(self.x_layout.unflatten(x), self.z_layout.unflatten(z), batch)
            gx, gz = _grads(value, [x, z])
        return gx, gz

    def everything(self, n: int) -> Tensor:
        """The batch of all n indices."""
        return torch.arange(n, device=self.device)

    def reference_metrics(
        self, x: dict[str, Tensor], z: dict[str, Tensor], v: dict[str, Tensor]
    ) -> dict[str, float]:
        """Metrics a problem with a closed form adds to each evaluation (none here)."""
        return {}

    # -- validation --------------------------------------------------------------------------

    def _check(self, name: str, objective, n: int, needs_z: bool) -> None:
        """Call `objective` once on the batch [0, n - 1]: a scalar, finite, depending on z."""
        batch = torch.tensor(sorted({0, n - 1}), device=self.device)
        z = self.z0.clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                value = objective(
                    self.x_layout.unflatten(self.x0), self.z_layout.unflatten(z), batch
                )
        except (IndexError, RuntimeError) as error:
            raise ValueError(
                f"{name}(x, z, batch) failed on batch {batch.tolist()} (is n_{name}={n} the "
                f"number of {name} samples?): {type(error).__name__}: {error}"
            ) from None
        if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(
                f"{name}(x, z, batch) must return a floating-point scalar tensor (the mean over "
                f"the batch), got {shape}"
            )
        if not bool(torch.isfinite(value)):
            raise ValueError(f"{name}(x, z, batch) is {float(value)} at the starting point")
        if needs_z and not value.requires_grad:
            raise ValueError(f"{name}(x, z, batch) does not depend on z: nothing to minimise")


def _same_kind(tensors: Mapping[str, Tensor]) -> None:
    """One dtype and device for all of x and z, or the first mismatch named."""
    (first, reference), *others = tensors.items()
    for name, tensor in others:
        if (tensor.dtype, tensor.device) != (reference.dtype, reference.device):
            raise TypeError(
                f"{name} is {tensor.dtype} on {tensor.device} but {first} is {reference.dtype} "
                f"on {reference.device}: use one dtype and device for x and z"
            )


def _grads(output: Tensor, inputs: list[Tensor], cotangent: Tensor | None = None, **options):
    """Gradients of `output` (with cotangent) w.r.t. `inputs`, zeros where there is no path."""
    if not output.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(output, inputs, cotangent, allow_unused=True, **options)
    return [validate.zeros_if_none(g, t) for g, t in zip(grads, inputs)]
