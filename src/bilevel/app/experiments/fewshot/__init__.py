"""Few-shot learning with a hyper-representation (Franceschi et al. 2018, E2 and E3).

``bilevel fewshot train`` meta-learns a representation network by bilevel programming,
``bilevel fewshot classical`` trains the same network single-level on all meta-training
classes (the E3 baseline), and ``bilevel fewshot test RUN`` evaluates either on seeded
meta-test episodes with fresh linear heads, for several numbers of inner steps.
``bilevel fewshot export RUN --name NAME`` writes a run's network as a weights file with its
measured row (weights.py, export.py); ``fewshot test`` takes such a file or its name too.
"""

from __future__ import annotations

from functools import partial

from .. import Experiment, Group
from .commands import compare_command, export_command, test_command
from .config import PRESETS, FewshotConfig, FewshotTestConfig
from .evaluation import run_test, test_overrides
from .identity import identity, older_identities
from .train import run_training, training_run, upgrade

__all__ = [
    "CLASSICAL",
    "GROUP",
    "TEST",
    "TRAIN",
    "FewshotConfig",
    "FewshotTestConfig",
    "PRESETS",
    "test_overrides",
    "training_run",
]

TRAIN = Experiment(
    name="fewshot-train",
    command="train",
    summary="Meta-train a representation: per-episode linear heads by T gradient steps.",
    config=FewshotConfig,
    presets=PRESETS,
    run=partial(run_training, mode="bilevel"),
    identity=partial(identity, mode="bilevel"),
    upgrade=upgrade,
    older_identities=partial(older_identities, mode="bilevel"),
)
CLASSICAL = Experiment(
    name="fewshot-classical",
    command="classical",
    summary="Train the same network single-level on all meta-training classes (E3 baseline).",
    config=FewshotConfig,
    presets=PRESETS,
    run=partial(run_training, mode="classical"),
    identity=partial(identity, mode="classical"),
    upgrade=upgrade,
    older_identities=partial(older_identities, mode="classical"),
)
TEST = Experiment(
    name="fewshot-test",
    summary="Meta-test a trained run: accuracy ± 95% CI on seeded episodes, by inner steps.",
    config=FewshotTestConfig,
    presets={},
    run=run_test,
    build=test_command,
)
GROUP = Group(
    "fewshot",
    "Few-shot learning with a hyper-representation (train, classical, test, compare, export).",
    (TRAIN, CLASSICAL, TEST, compare_command, export_command),
)
