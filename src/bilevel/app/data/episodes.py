"""Few-shot episodes: N-way K-shot classification tasks drawn from a set of classes.

A :class:`ClassSet` is a view of a uint8 image array ``[base classes, examples, H, W(, C)]``:
its classes are base classes, each optionally rotated by quarter turns (Omniglot's rotations
make new classes without storing them). :class:`EpisodeSampler` draws whole meta-batches at
once with numpy fancy indexing, so sampling stays far below the cost of a training step.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["ClassSet", "DeviceEpisodeSampler", "Episodes", "EpisodeSampler"]


@dataclass(frozen=True)
class ClassSet:
    """Classes for few-shot learning: class ``i`` is ``images[base[i]]`` turned by
    ``rotation[i]`` quarter turns counterclockwise.

    ``images`` is uint8 ``[base classes, examples, H, W]`` (grey) or ``[..., H, W, C]``; it may
    be a memory map. ``note`` says where the classes come from (e.g. a held-out validation).
    """

    images: np.ndarray
    base: np.ndarray
    rotation: np.ndarray
    names: tuple[str, ...]
    note: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5) or self.images.dtype != np.uint8:
            raise ValueError(
                "images must be uint8 [classes, examples, H, W(, C)], "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if not len(self.base) == len(self.rotation) == len(self.names):
            raise ValueError("base, rotation and names must have one entry per class")
        object.__setattr__(self, "base", np.asarray(self.base, dtype=np.int64))
        object.__setattr__(self, "rotation", np.asarray(self.rotation, dtype=np.int64) % 4)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def examples_per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensors an episode holds."""
        height, width = self.images.shape[2:4]
        channels = self.images.shape[4] if self.images.ndim == 5 else 1
        return channels, height, width

    def class_images(self, i: int) -> np.ndarray:
        """All examples of class ``i``, rotated: uint8 [examples, H, W(, C)]."""
        return self.gather(np.array([i]), np.arange(self.examples_per_class)[None])[0]

    def gather(self, classes: np.ndarray, examples: np.ndarray) -> np.ndarray:
        """Images of ``classes`` [...] at ``examples`` [..., m]: uint8 [..., m, H, W(, C)]."""
        classes = np.asarray(classes)
        out = self.images[self.base[classes][..., None], examples]
        turns = self.rotation[classes]
        if turns.any():
            axes = (-2, -1) if self.images.ndim == 4 else (-3, -2)
            for k in (1, 2, 3):
                mask = turns == k
                if mask.any():
                    out[mask] = np.rot90(out[mask], k, axes=axes)
        return out


class Episodes(NamedTuple):
    """A meta-batch of B episodes of N classes, K support and Q query examples per class.

    ``support_x`` float32 [B, N*K, C, H, W], ``support_y`` int64 [B, N*K] in 0..N-1 (class-major:
    K examples of class 0, then of class 1, ...); ``query_x``/``query_y`` likewise with Q.
    ``classes`` int64 [B, N] are the class-set indices behind labels 0..N-1.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episodes:
        return Episodes(*(t.to(device, non_blocking=non_blocking) for t in self))


class EpisodeSampler:
    """Seeded sampler of N-way (``ways``) K-shot (``shots``) Q-query (``queries``) meta-batches.

    Each episode takes ``ways`` distinct classes in random order (label j is the j-th) and
    ``shots + queries`` distinct examples of each, so support and query never share an image.
    Pixels become float32 in [0, 1], then ``(x - mean) / std`` per channel when given. ``seed``
    is an int or a ``numpy.random.Generator`` (used, and advanced, in place); the same seed
    and numpy version give the same episodes, and :meth:`state_dict` resumes exactly.
    """

    def __init__(
        self,
        classes: ClassSet,
        ways: int,
        shots: int,
        queries: int,
        batch_size: int = 1,
        seed: int | np.random.Generator = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        for name, value in (
            ("ways", ways),
            ("shots", shots),
            ("queries", queries),
            ("batch_size", batch_size),
        ):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if ways > len(classes):
            raise ValueError(f"ways={ways} exceeds the {len(classes)} classes of the class set")
        if shots + queries > classes.examples_per_class:
            raise ValueError(
                f"shots + queries = {shots} + {queries} exceeds the "
                f"{classes.examples_per_class} examples per class"
            )
        self.classes = classes
        self.ways, self.shots, self.queries, self.batch_size = ways, shots, queries, batch_size
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._affine = _normaliser(classes.image_shape[0], mean, std)
        self._support_y = torch.arange(ways).repeat_interleave(shots).expand(batch_size, -1)
        self._query_y = torch.arange(ways).repeat_interleave(queries).expand(batch_size, -1)

    def sample(self) -> Episodes:
        """The next meta-batch."""
        b, n, k = self.batch_size, self.ways, self.shots
        classes = np.stack([self.rng.choice(len(self.classes), n, replace=False) for _ in range(b)])
        order = self.rng.random((b, n, self.classes.examples_per_class)).argsort(-1)
        support = self._images(classes, order[..., :k])
        query = self._images(classes, order[..., k : k + self.queries])
        return Episodes(
            support.reshape(b, n * k, *support.shape[3:]),
            self._support_y.clone(),
            query.reshape(b, n * self.queries, *query.shape[3:]),
            self._query_y.clone(),
            torch.from_numpy(classes),
        )

    def __iter__(self) -> Iterator[Episodes]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        """The generator state, the episode shape and a digest of the class names: enough to
        resume the same sequence, and to refuse resuming it over other classes."""
        return {"rng": self.rng.bit_generator.state, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        theirs = {k: state.get(k) for k in self._config()}
        if theirs != self._config():
            raise ValueError(f"state is for episodes {theirs}, this sampler draws {self._config()}")
        self.rng.bit_generator.state = state["rng"]

    def _config(self) -> dict:
        names = hashlib.sha256("\n".join(self.classes.names).encode()).hexdigest()[:16]
        return {
            "classes": f"{len(self.classes)} classes, names {names}",
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "batch_size": self.batch_size,
        }

    def _images(self, classes: np.ndarray, examples: np.ndarray) -> torch.Tensor:
        """float32 [B, N, m, C, H, W] of ``classes`` [B, N] at ``examples`` [B, N, m]."""
        return self._to_float(self.classes.gather(classes, examples))

    def _to_float(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, N, m, H, W(, C)] to float32 [B, N, m, C, H, W].

        In numpy on purpose: on a batch this size torch's intra-op threads gain little and, on a
        busy machine, cost tens of milliseconds waiting for each other. Transposing the uint8
        first keeps every later pass contiguous (2-3x faster than casting a strided view).
        """
        x = images[..., None, :, :] if images.ndim == 5 else np.moveaxis(images, -1, -3)
        out = np.ascontiguousarray(x).astype(np.float32)
        scale, shift = self._affine
        out *= scale
        if shift.any():
            out -= shift
        return torch.from_numpy(out)


class DeviceEpisodeSampler(EpisodeSampler):
    """An EpisodeSampler whose class set lives on ``device`` as uint8: on a GPU the whole split
    in its memory (813 MB for mini-ImageNet's training classes), on a CPU a copy in the
    process's memory rather than the memory-mapped cache, whose pages other processes' use of
    memory can evict (then a draw waits for the disk).

    The draws are the host sampler's (the same numpy generator, so the same episodes and
    ``state_dict``); only the gather, the quarter turns and the scaling to float32 run on the
    device, as the same float32 operations (multiply, then subtract), so the pixels equal the
    host sampler's. Images come as [B, n, C, H, W] views of [B, n, H, W, C] memory: the
    channels_last layout a convolution prefers.
    """

    def __init__(self, *args, device: torch.device | str = "cpu", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        self._pixels = _device_copy(self.classes.images, self.device)
        self._base = torch.from_numpy(self.classes.base).to(self.device)
        scale, shift = self._affine  # [C, 1, 1]: one value per channel
        self._scale = torch.from_numpy(scale.reshape(-1)).to(self.device)
        self._shift = torch.from_numpy(shift.reshape(-1)).to(self.device) if shift.any() else None
        self._support_y = self._support_y.to(self.device)
        self._query_y = self._query_y.to(self.device)

    def _images(self, classes: np.ndarray, examples: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(classes).to(self.device)
        picked = self._pixels[self._base[index][..., None], torch.from_numpy(examples).to(index)]
        grey = self._pixels.dim() == 4
        turns = self.classes.rotation[classes]  # decided on the host: no device sync
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                where = torch.from_numpy(mask).to(self.device)
                picked[where] = torch.rot90(picked[where], k, (-2, -1) if grey else (-3, -2))
        x = picked.to(torch.float32)
        x = x[..., None] if grey else x  # [..., H, W, C]
        x = x * self._scale
        if self._shift is not None:
            x = x - self._shift
        return x.permute(*range(x.dim() - 3), -1, -3, -2)


# One copy of each image array per device, for as long as the array lives: the samplers of one
# split (a run's training and each validation's) share it.
_DEVICE_COPIES: dict[tuple[int, str], torch.Tensor] = {}


def _device_copy(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``images`` as a uint8 tensor on ``device`` (on a CPU: a copy out of the memory map)."""
    key = (id(images), str(device))
    if key not in _DEVICE_COPIES:
        with warnings.catch_warnings():  # a read-only memory map: never written through
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(images))
        _DEVICE_COPIES[key] = pixels.to(device, copy=True)
        weakref.finalize(images, _DEVICE_COPIES.pop, key, None)
    return _DEVICE_COPIES[key]


def _normaliser(
    channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with x_float = x_uint8 * scale - shift = (x_uint8 / 255 - mean) / std."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    mean_a = np.zeros(channels) if mean is None else np.asarray(mean, dtype=np.float64)
    std_a = np.ones(channels) if std is None else np.asarray(std, dtype=np.float64)
    if mean_a.shape != (channels,) or std_a.shape != (channels,):
        raise ValueError(f"mean and std need {channels} values, one per channel")
    if (std_a <= 0).any():
        raise ValueError("std must be positive")
    view = (channels, 1, 1)
    scale, shift = 1 / (255 * std_a), mean_a / std_a
    return scale.astype(np.float32).reshape(view), shift.astype(np.float32).reshape(view)
