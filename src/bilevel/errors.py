"""Exceptions raised by bilevel; each message names the argument at fault."""


class BilevelError(Exception):
    """Base class of the errors bilevel raises on purpose."""


class InnerDivergenceError(BilevelError, FloatingPointError):
    """The inner trajectory became NaN or infinite."""


class HypergradientError(BilevelError, FloatingPointError):
    """A hypergradient came out NaN or infinite."""


class SolverWarning(UserWarning):
    """An implicit method's linear solve stopped before reaching its tolerance."""
