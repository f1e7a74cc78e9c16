"""What a few-shot checkpoint is bound to, and reading one back under that binding.

A checkpoint's identity is every setting that shapes the training trajectory or the choice of
its best network (``FewshotConfig.hashed``), and the mode (bilevel or classical). Test
settings are not part of it: any trained run is tested with any of them.
"""

from __future__ import annotations

from pathlib import Path

from ... import checkpoints
from .config import EPISODE_KEYS, FewshotConfig


def identity(config: FewshotConfig, mode: str) -> dict:
    """The settings a checkpoint is bound to."""
    return {**config.hashed(), "mode": mode}


def older_identities(config: FewshotConfig, mode: str) -> list[dict]:
    """What earlier versions bound a run of ``config`` and ``mode`` to (for Experiment)."""
    return [legacy_identity(config, mode)]


def legacy_identity(config: FewshotConfig, mode: str) -> dict:
    """The identity of checkpoints written before ``val_batch_norm`` existed: validation then
    used ``test_batch_norm``, which was bound under that name."""
    bound = identity(config, mode)
    bound["test_batch_norm"] = bound.pop("val_batch_norm")
    return bound


def load_checkpoint(path: str | Path, config: FewshotConfig, mode: str) -> dict:
    """The state of the checkpoint at ``path``, verified and bound to ``config`` and ``mode``
    (or to their legacy identity); raises CheckpointError naming the settings that differ."""
    try:
        return checkpoints.load(path, identity(config, mode))
    except checkpoints.CheckpointError as error:
        try:
            return checkpoints.load(path, legacy_identity(config, mode))
        except checkpoints.CheckpointError:
            raise error from None


def as_trained(config: FewshotConfig, trained: dict) -> FewshotConfig:
    """A test's ``config`` with the episode settings it may change set back to those of the
    run's config.json ``trained``: the config its checkpoints are bound to."""
    update = {k: trained[k] for k in EPISODE_KEYS}
    if "val_batch_norm" not in trained:  # a run from before it: validation used test_batch_norm
        update["val_batch_norm"] = trained.get("test_batch_norm", "transductive")
    return config.model_copy(update=update)
