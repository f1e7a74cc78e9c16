"""The base of the solvers that take no step on a linear system (BOME, PZOBO, the engine's
references): the frame's linear_step means nothing to them, so it is refused by name, never
silently ignored."""

from __future__ import annotations

from .solver import StochasticSolver


class NoLinearStep(StochasticSolver):
    """A StochasticSolver without the linear_step setting."""

    def __init__(self, problem, **settings):
        if "linear_step" in settings:
            raise TypeError(
                f"{self.name}: linear_step does not apply ({self.name} takes no step on a "
                "linear system)"
            )
        super().__init__(problem, **settings)

    @classmethod
    def accepted_settings(cls) -> tuple[list[str], list[str]]:
        names, required = super().accepted_settings()
        return [n for n in names if n != "linear_step"], required
