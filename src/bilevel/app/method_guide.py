"""What `bilevel methods` prints: each hypergradient method and each of its options in a
sentence or two, in a user's words. The defaults come from the methods' own signatures, and a
test holds this guide to `bilevel.METHODS` (every method, every option, nothing else)."""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass

WIDTH = 100  # of the printed lines


@dataclass(frozen=True)
class MethodGuide:
    """One method: what it computes and costs, and what each option does."""

    summary: str
    options: dict[str, str]


_MEMORY = (
    "what the backward pass keeps of the inner steps: 'graph' keeps every step's autograd "
    "graph (fastest, the most memory); 'activations' keeps each step's state and the values "
    "its loss computed, and recomputes only the step's gradient (in between); 'trajectory' "
    "keeps each step's state and recomputes one step's graph at a time; 'checkpoint' keeps "
    "the state every few steps and recomputes the steps between (the least memory)"
)
_CHECKPOINT_EVERY = (
    "with memory='checkpoint': inner steps between kept states (None: the square root of the "
    "number of steps differentiated)"
)
_TOLERANCE = "relative residual of the linear solve at which it stops"

GUIDE: dict[str, MethodGuide] = {
    "reverse": MethodGuide(
        "Back-propagation through the inner steps: the exact hypergradient of the steps taken. "
        "The fastest method while its memory fits.",
        {
            "memory": _MEMORY,
            "checkpoint_every": _CHECKPOINT_EVERY,
            "window": "differentiate only the last `window` steps, the state before them "
            "taken as a constant (as 'truncated' does with k); None: all the steps",
        },
    ),
    "truncated": MethodGuide(
        "Back-propagation through the last k inner steps only: cheaper, and an "
        "approximation (the earlier steps are taken as constants, so a learned initialisation "
        "gets no hypergradient unless k = steps).",
        {
            "k": "the number of last steps differentiated (required; k = steps is 'reverse')",
            "memory": _MEMORY,
            "checkpoint_every": _CHECKPOINT_EVERY,
        },
    ),
    "forward": MethodGuide(
        "Forward mode: carries the derivatives of the inner state with respect to every "
        "hyperparameter along the steps. Exact; its memory does not grow with the number of "
        "steps, its time grows with the number of hyperparameters: for a few of them, and for "
        "hyperparameter updates during a single inner run (RealTimeHyperOptimizer).",
        {
            "vectorize": "compute each step's derivatives for all the hyperparameters in one "
            "batched pass (faster); False: one hyperparameter at a time (less memory, the same "
            "numbers)",
        },
    ),
    "implicit-cg": MethodGuide(
        "Implicit differentiation at the last inner state, taken as a minimum of the inner "
        "objective: one linear system with its Hessian, solved by conjugate gradient. Time and "
        "memory do not depend on the number of steps; as exact as the inner run is converged.",
        {"iterations": "the most conjugate-gradient iterations", "tolerance": _TOLERANCE},
    ),
    "implicit-neumann": MethodGuide(
        "As implicit-cg, the linear system solved by a Neumann series (repeated steps like "
        "the inner gradient steps).",
        {
            "iterations": "the most terms of the series",
            "tolerance": _TOLERANCE,
            "alpha": "step of the series; None: the inner learning rate, which only plain "
            "gradient descent (bilevel.sgd without momentum) allows",
        },
    ),
    "fixed-point": MethodGuide(
        "Implicit differentiation of the inner optimiser's whole step, its state (momentum, "
        "moment estimates) included, at the last inner state taken as its fixed point; solved "
        "by fixed-point iteration. As exact as the inner run is converged.",
        {"iterations": "the most iterations", "tolerance": _TOLERANCE},
    ),
    "auto": MethodGuide(
        "Measures one inner step, then picks the fastest exact method whose memory fits: "
        "reverse keeping all it can (the whole graph, else checkpoints as far apart as fit, "
        "else each step's state), else forward (few hyperparameters only). result.info['auto'] "
        "says what was chosen and why.",
        {
            "memory_budget": "bytes the method may use; None: half of the memory free now "
            "(of the GPU, or of the machine)",
        },
    ),
}


def option_defaults(function) -> dict[str, str]:
    """A method function's options (its keyword-only parameters) as `name=default`, or
    `name` for one without a default."""
    found = {}
    for option in inspect.signature(function).parameters.values():
        if option.kind is inspect.Parameter.KEYWORD_ONLY:
            required = option.default is inspect.Parameter.empty
            found[option.name] = option.name if required else f"{option.name}={option.default!r}"
    return found


def describe_methods(methods) -> str:
    """The text of `bilevel methods`.

    Args:
        methods: the methods by name (`bilevel.METHODS`); each needs an entry in GUIDE.
    Returns:
        A short header, then each method: its summary and an indented line per option.
    """
    lines = [
        "Pass a method and its options to bilevel.hypergradient, solve, check or HyperOptimizer,",
        "e.g. method='reverse', memory='trajectory'. Options are shown as option=default.",
    ]
    for name, function in methods.items():
        guide = GUIDE[name]
        lines += ["", name, *_wrap(guide.summary, "    ", "    ")]
        for option, shown in option_defaults(function).items():
            lines += _wrap(f"{shown}: {guide.options[option]}", "    - ", "      ")
    return "\n".join(lines)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest)
