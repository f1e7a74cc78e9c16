"""Checks of user input, so that a mistake is reported where it is made and by name."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def objective(name: str, value) -> None:
    if not callable(value):
        raise TypeError(
            f"{name} must be a callable (params, hparams) -> scalar tensor, got "
            f"{type(value).__name__}"
        )


def tensor_dict(name: str, value, *, allow_empty: bool = False) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of str -> Tensor, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for key, tensor in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating-point tensor, got {tensor.dtype}")


def hyperparameters(hparams) -> None:
    tensor_dict("hparams", hparams)
    for key, tensor in hparams.items():
        if not tensor.requires_grad:
            raise ValueError(
                f"hparams[{key!r}] does not require grad: create it with requires_grad=True "
                "(or call .requires_grad_()) so that it can have a hypergradient"
            )


def same_kind(params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> None:
    """All tensors share one dtype and device, or the first mismatch is named."""
    items = [("params", k, v) for k, v in params.items()]
    items += [("hparams", k, v) for k, v in hparams.items()]
    _, key0, first = items[0]
    for group, key, tensor in items[1:]:
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise TypeError(
                f"{group}[{key!r}] is {tensor.dtype} on {tensor.device} but {key0!r} is "
                f"{first.dtype} on {first.device}: use one dtype and device for all tensors"
            )


def positive_int(name: str, value) -> int:
    """An integer >= 1 (numpy integers too; bools and floats are refused)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {number}")
    return number


def steps(value) -> int:
    return positive_int("steps", value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    """Autograd's None (no path) as the zero it means."""
    return torch.zeros_like(like) if grad is None else grad


def options(method: str, function: Callable, given: Mapping[str, object]) -> None:
    """Every option is a keyword-only parameter of the method's function."""
    accepted = [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for method {method!r}; it accepts: {', '.join(accepted) or 'no options'}"
        )
    required = [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    for name in required:
        if name not in given:
            raise TypeError(f"method {method!r} needs the option {name}=...")


def finite(what: str, grads: Mapping[str, Tensor], error: type[Exception]) -> None:
    for key, grad in grads.items():
        if not bool(torch.isfinite(grad).all()):
            raise error(f"the {what} of {key!r} is NaN or infinite")
