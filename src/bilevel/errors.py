"""Exceptions raised by bilevel; each message names the argument at fault."""


class BilevelError(Exception):
    """Base class of the errors bilevel raises on purpose."""


class InnerDivergenceError(BilevelError, FloatingPointError):
    """The inner trajectory became NaN or infinite."""


class HypergradientError(BilevelError, FloatingPointError):
    """A hypergradient came out NaN or infinite."""


class BilevelWarning(UserWarning):
    """Base class of the warnings bilevel gives: a result to distrust, and why."""


class SolverWarning(BilevelWarning):
    """An implicit method's linear solve stopped before reaching its tolerance."""


class HypergradientWarning(BilevelWarning):
    """A hypergradient that is exactly zero by construction: a hyperparameter nothing depends
    on, or a learned initialisation outside a truncated window."""
