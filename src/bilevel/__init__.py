"""bilevel: gradient-based bilevel programming on PyTorch.

result = bilevel.hypergradient(inner, outer, params, hparams,
                               dynamics=bilevel.sgd(lr=0.1), steps=100, method="reverse")
result.grads, result.params, result.value
"""

from importlib import metadata as _metadata

from . import constraints, stochastic
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
from .hypergrad import METHODS
from .hypergrad.implicit import custom_argmin, custom_fixed_point, custom_root
from .nn import functional
from .outer import HyperOptimizer, RealTimeHyperOptimizer
from .precision import Precision
from .problem import Problem, Result, hypergradient
from .solve import solve

try:
    __version__ = _metadata.version("bilevel")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
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
    "Precision",
    "Problem",
    "RealTimeHyperOptimizer",
    "SolverWarning",
    "Result",
    "adagrad",
    "adam",
    "adamw",
    "check",
    "constraints",
    "custom_argmin",
    "custom_fixed_point",
    "custom_root",
    "functional",
    "hypergradient",
    "lion",
    "nesterov",
    "rmsprop",
    "sgd",
    "solve",
    "stochastic",
]
