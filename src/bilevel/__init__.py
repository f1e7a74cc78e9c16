"""bilevel: gradient-based bilevel programming on PyTorch.

result = bilevel.hypergradient(inner, outer, params, hparams,
                               dynamics=bilevel.sgd(lr=0.1), steps=100, method="reverse")
result.grads, result.params, result.value
"""

from importlib import metadata as _metadata

from . import constraints
from .check import CheckReport, check
from .dynamics import Dynamics, adam, nesterov, sgd
from .errors import BilevelError, HypergradientError, InnerDivergenceError, SolverWarning
from .hypergrad import METHODS, Result, hypergradient
from .nn import functional
from .outer import HyperOptimizer, RealTimeHyperOptimizer
from .solve import solve

try:
    __version__ = _metadata.version("bilevel")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "BilevelError",
    "CheckReport",
    "Dynamics",
    "HyperOptimizer",
    "HypergradientError",
    "InnerDivergenceError",
    "RealTimeHyperOptimizer",
    "SolverWarning",
    "Result",
    "adam",
    "check",
    "constraints",
    "functional",
    "hypergradient",
    "nesterov",
    "sgd",
    "solve",
]
