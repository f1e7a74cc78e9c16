"""MNIST, read from the four canonical gzip IDX files and checked against their sha256.

The files are looked for in ``<data_root>/mnist`` (or directly in ``data_dir`` when it already
holds them) and downloaded there when absent. Decoding streams the gzip body straight into a
preallocated array, so a full load takes a fraction of a second and no derived cache is needed.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import store
from .store import DataError, data_root, ensure_file, fetch_missing, require_files

__all__ = ["FILES", "MIRRORS", "Split", "load_mnist", "mnist_dir", "read_idx"]

# The mirrors torchvision uses, in its order; yann.lecun.com is often down, hence the S3 copy.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# split -> ((images file, sha256), (labels file, sha256)); the canonical distribution's values.
FILES = {
    "train": (
        (
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
    ),
    "test": (
        (
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
}

# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


class Split(NamedTuple):
    """One split: ``images`` uint8 [N, 28, 28] in 0..255, ``labels`` int64 [N] in 0..9."""

    images: torch.Tensor
    labels: torch.Tensor


def mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the MNIST files: ``data_dir`` if it holds any of them, else its ``mnist/``.

    Accepting both lets a user point at the MNIST folder or at the root of all data sets.
    """
    root = data_root(data_dir)
    names = [name for pair in FILES.values() for name, _ in pair]
    if any((root / name).is_file() for name in names):
        return root
    return root / "mnist"


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Decode a gzip IDX file of unsigned bytes whose header must start with ``magic``.

    Raises :class:`DataError` on a wrong magic number, a truncated or overlong body, or a
    damaged gzip stream.
    """
    try:
        with gzip.open(path, "rb") as f:
            found = _read_exact(f, 4, path)
            if int.from_bytes(found, "big") != magic:
                raise DataError(f"{path}: IDX magic 0x{found.hex()}, expected 0x{magic:08x}")
            ndim = magic & 0xFF
            shape = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path))
            out = np.empty(shape, dtype=np.uint8)
            if _read_into(f, out.reshape(-1)) != out.size or f.read(1):
                raise DataError(f"{path}: body does not match header shape {shape}")
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # truncated, CRC, not gzip
        raise DataError(f"{path}: unreadable gzip stream ({err})") from err
    return out


def _read_exact(f, n: int, path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated IDX header")
    return data


def _read_into(f, buf: np.ndarray) -> int:
    # Decompressing straight into the array avoids a 47 MB intermediate bytes object and a copy.
    got = 0
    view = memoryview(buf)
    while got < len(buf) and (n := f.readinto(view[got:])):
        got += n
    return got


def _load_split(directory: Path, split: str, download: bool) -> Split:
    (images_name, images_sha), (labels_name, labels_sha) = FILES[split]
    paths = [
        ensure_file(name, directory, sha, [m + name for m in MIRRORS], download=download)
        for name, sha in ((images_name, images_sha), (labels_name, labels_sha))
    ]
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def load_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = True
) -> dict[str, Split]:
    """Load MNIST as ``{"train": Split, "test": Split}`` (60,000 and 10,000 examples).

    Every file is checked against its canonical sha256 first; the missing ones are downloaded
    into :func:`mnist_dir` when ``download`` is true, and a corrupt one raises
    :class:`DataError`. A ``data_dir`` (or $BILEVEL_DATA) that does not exist is an error, not
    created; so are missing files that cannot be downloaded, all of them named.
    """
    directory = mnist_dir(data_dir)
    pinned = {name: sha256 for pair in FILES.values() for name, sha256 in pair}
    source = f"get them from {MIRRORS[0]}"
    missing = require_files(
        "MNIST", directory, list(pinned), source, data_dir=data_dir, download=download
    )
    fetch_missing(missing, lambda name: _fetch(directory, name, pinned[name]))
    return {split: _load_split(directory, split, download) for split in FILES}


def _fetch(directory: Path, name: str, sha256: str) -> None:
    store.download([mirror + name for mirror in MIRRORS], directory / name, sha256)
