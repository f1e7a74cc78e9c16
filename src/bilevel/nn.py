"""Any torch.nn.Module as an inner model: its parameters as a dict, its forward as a function."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.func import functional_call


def functional(module: nn.Module) -> tuple[dict[str, Tensor], Callable[..., Tensor]]:
    """(w_0, apply) for a module: `apply(params, *inputs)` runs it with `params`.

    w_0 is a detached copy of the module's parameters, so the module itself is
    never changed by an inner run. Buffers (batch-norm statistics) are copied
    at every call: in training mode batch norm normalises with the batch's own
    statistics, as it must inside an inner problem, and the running statistics
    it would update are discarded rather than written into the module from
    inside a differentiated (possibly vectorised) computation.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def apply(weights: dict[str, Tensor], *inputs, **kwargs) -> Tensor:
        state = {k: v.clone() for k, v in buffers.items()}
        state.update(weights)
        return functional_call(module, state, inputs, kwargs)

    return params, apply


__all__ = ["functional"]
