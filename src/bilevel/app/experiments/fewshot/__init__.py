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

from .. import Experiment
from .config import PRESETS, FewshotConfig, FewshotTestConfig
from .evaluation import run_test, test_overrides
from .train import Resume, prepare_resume, run_training, training_run

__all__ = [
    "CLASSICAL",
    "TEST",
    "TRAIN",
    "FewshotConfig",
    "FewshotTestConfig",
    "PRESETS",
    "Resume",
    "prepare_resume",
    "test_overrides",
    "training_run",
]

TRAIN = Experiment(
    name="fewshot-train",
    summary="Meta-train a representation: per-episode linear heads by T gradient steps.",
    config=FewshotConfig,
    presets=PRESETS,
    run=partial(run_training, mode="bilevel", resume=None),
)
CLASSICAL = Experiment(
    name="fewshot-classical",
    summary="Train the same network single-level on all meta-training classes (E3 baseline).",
    config=FewshotConfig,
    presets=PRESETS,
    run=partial(run_training, mode="classical", resume=None),
)
TEST = Experiment(
    name="fewshot-test",
    summary="Meta-test a trained run: accuracy ± 95% CI on seeded episodes, by inner steps.",
    config=FewshotTestConfig,
    presets={},
    run=run_test,
)
