"""The class sets of a few-shot config, and the samplers that draw from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...data import (
    ClassSet,
    DeviceEpisodeSampler,
    EpisodeSampler,
    load_miniimagenet,
    load_omniglot,
    miniimagenet_split,
    omniglot_split,
)
from . import speed
from .config import FewshotConfig

PARTS = ("train", "val", "test")


def class_sets(config: FewshotConfig, data_dir: Path | None, parts=PARTS) -> dict[str, ClassSet]:
    """The meta-train, meta-validation and meta-test classes, sliced as the config says."""
    if config.dataset == "omniglot":
        data = load_omniglot(data_dir)
        sets = {p: omniglot_split(data, config.split, p, seed=config.split_seed) for p in parts}
    else:
        data = load_miniimagenet(data_dir)
        sets = {p: miniimagenet_split(data, p, seed=config.split_seed) for p in parts}
    limits = {"train": config.train_classes, "val": config.val_classes, "test": config.test_classes}
    return {p: _first(s, limits[p]) for p, s in sets.items()}


def _first(classes: ClassSet, n: int | None) -> ClassSet:
    if n is None or n >= len(classes):
        return classes
    note = f"{classes.note} (first {n} of {len(classes)} classes)"
    return ClassSet(classes.images, classes.base[:n], classes.rotation[:n], classes.names[:n], note)


def episodes(config: FewshotConfig, classes: ClassSet, batch: int, seed) -> EpisodeSampler:
    """The config's episodes of ``classes``, ``batch`` per draw: drawn on the device when
    ``episodes_on_device`` says so (the same episodes either way)."""
    shape = (classes, config.ways, config.shots, config.queries, batch, seed)
    if speed.episodes_on_device(config):
        return DeviceEpisodeSampler(*shape, device=config.device)
    return EpisodeSampler(*shape)


class ImageSampler:
    """Seeded minibatches of (image, class) over every class of a set, for classical training.

    Pixels are scaled to [0, 1] as EpisodeSampler does; ``state_dict`` resumes the sequence.
    """

    def __init__(self, classes: ClassSet, batch_size: int, seed: int) -> None:
        self.classes, self.batch_size = classes, batch_size
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.rng.integers(len(self.classes), size=self.batch_size)
        drawn = self.rng.integers(self.classes.examples_per_class, size=(self.batch_size, 1))
        images = self.classes.gather(labels, drawn)[:, 0]
        if images.ndim == 3:  # grey: add the channel axis
            images = images[:, None]
        else:
            images = np.moveaxis(images, -1, 1)
        x = torch.from_numpy(
            np.ascontiguousarray(images).astype(np.float32) * np.float32(1 / 255)
        )  # as EpisodeSampler
        return x, torch.from_numpy(labels)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "classes": len(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("classes") != len(self.classes):
            raise ValueError(
                f"state is for {state.get('classes')} classes, not {len(self.classes)}"
            )
        self.rng.bit_generator.state = state["rng"]
