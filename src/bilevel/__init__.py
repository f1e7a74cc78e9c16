"""bilevel: gradient-based bilevel programming on PyTorch.

result = bilevel.hypergradient(inner, outer, params, hparams,
                               dynamics=bilevel.sgd(lr=0.1), steps=100, method="reverse")
result.grads, result.params, result.value
"""

from importlib.metadata import PackageNotFoundError, version

from . import constraints
from .check import CheckReport, check
from .dynamics import Dynamics, adagrad, adam, adamw, lion, nesterov, rmsprop, sgd
from .errors import (
    BilevelError,
    BilevelWarning,
    HypergradientError,
    HypergradientWarning,
    InnerDivergenceError,
    SolverWarning,
)
from .hypergrad import METHODS, Result, hypergradient
from .nn import functional
from .outer import HyperOptimizer, RealTimeHyperOptimizer
from .solve import solve

try:
    __version__ = version("bilevel")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "BilevelError",
    "BilevelWarning",
    "CheckReport",
    "Dynamics",
    "HyperOptimizer",
    "HypergradientError",
    "HypergradientWarning",
    "InnerDivergenceError",
    "RealTimeHyperOptimizer",
    "SolverWarning",
    "Result",
    "adagrad",
    "adam",
    "adamw",
    "check",
    "constraints",
    "functional",
    "hypergradient",
    "lion",
    "nesterov",
    "rmsprop",
    "sgd",
    "solve",
]
