"""Data sets of the LIBSVM site in its text format (``label index:value ...``, bzip2'ed):
ijcnn1 (binary, 22 features) and covtype (7 classes, 54 features, scaled to [0, 1]).

The files are looked for in ``<data_root>/libsvm`` (or in ``data_dir`` itself when it holds
them) and downloaded there from the LIBSVM site when absent. The site publishes no checksums,
and none is pinned here: the sha256 of each file is RECORDED the first time it is used (in
``cache_root()/libsvm/sha256.json``, by file name) and every later use checks the file against
it, so a file that changes afterwards is refused; the first copy is trusted as it is. Each
file's row count, which the site states, is checked on every decode. The decoded arrays are
cached beside the record, named after the file's digest.

Where the files are absent and cannot be fetched, :func:`stand_in` makes a generated data set
of the same shape (feature and class counts, a planted logistic model, seeded); whoever uses it
must say so (`StandIn.label`).
"""

from __future__ import annotations

import bz2
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..files import atomic_write, write_atomic
from . import store
from .store import DataError, cache_root, data_root, fetch_missing, require_files, sha256_file

__all__ = [
    "DATASETS",
    "SITE",
    "LibsvmFile",
    "LibsvmSet",
    "LibsvmSplit",
    "StandIn",
    "libsvm_dir",
    "load_libsvm",
    "parse_libsvm",
    "stand_in",
]

SITE = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/"


@dataclass(frozen=True)
class LibsvmFile:
    """One file of the site: its name, the page folder it is under, the rows it holds."""

    name: str
    folder: str
    rows: int

    @property
    def url(self) -> str:
        return f"{SITE}{self.folder}/{self.name}"


@dataclass(frozen=True)
class LibsvmSet:
    """A data set: its feature and class counts and its files by split."""

    name: str
    features: int
    classes: int
    files: dict[str, LibsvmFile]


DATASETS = {
    "ijcnn1": LibsvmSet(
        "ijcnn1",
        features=22,
        classes=2,
        files={
            "train": LibsvmFile("ijcnn1.bz2", "binary", 49_990),
            "test": LibsvmFile("ijcnn1.t.bz2", "binary", 91_701),
        },
    ),
    "covtype": LibsvmSet(
        "covtype",
        features=54,
        classes=7,
        files={"all": LibsvmFile("covtype.scale01.bz2", "multiclass", 581_012)},
    ),
}


class LibsvmSplit(NamedTuple):
    """``features`` float32 [n, d]; ``labels`` int64 [n]: -1/+1 for a binary set, else the
    class index 0 .. classes - 1 (the file's 1 .. classes, less one)."""

    features: torch.Tensor
    labels: torch.Tensor


def libsvm_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the LIBSVM files: ``data_dir`` if it holds any of them, else its
    ``libsvm/``."""
    root = data_root(data_dir)
    names = [f.name for s in DATASETS.values() for f in s.files.values()]
    if any((root / name).is_file() for name in names):
        return root
    return root / "libsvm"


def load_libsvm(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> dict[str, LibsvmSplit]:
    """The data set `name` ("ijcnn1": splits "train" and "test"; "covtype": split "all").

    Missing files are downloaded from the LIBSVM site into :func:`libsvm_dir` when
    ``download`` is true; otherwise, or when $BILEVEL_OFFLINE is set or the chosen data root
    does not exist, :class:`DataError` names every missing file and where it comes from. A file
    whose sha256 differs from the one recorded at its first use, or that is malformed, or whose
    row count is not the site's, raises :class:`DataError`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown LIBSVM data set {name!r}; choose one of {', '.join(DATASETS)}")
    dataset, directory = DATASETS[name], libsvm_dir(data_dir)
    files = {f.name: f for f in dataset.files.values()}
    source = f"get them from {SITE} ({dataset.name})"
    missing = require_files(
        f"LIBSVM {name}", directory, list(files), source, data_dir=data_dir, download=download
    )
    fetch_missing(missing, lambda file: store.download([files[file].url], directory / file, None))
    return {
        split: _decoded(directory / file.name, file, dataset)
        for split, file in dataset.files.items()
    }


def _decoded(path: Path, file: LibsvmFile, dataset: LibsvmSet) -> LibsvmSplit:
    """The file's arrays, from the decoded cache when it holds this file's digest."""
    digest = _verified_digest(path)
    cached = cache_root() / "libsvm" / f"{path.name}-{digest[:16]}.npz"
    if cached.is_file():
        with np.load(cached) as arrays:
            return LibsvmSplit(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
    with bz2.open(path, "rt", encoding="ascii", errors="replace") as text:
        try:
            features, labels = parse_libsvm(text, dataset.features, path.name)
        except (OSError, EOFError) as error:  # not bzip2, or truncated
            raise DataError(f"{path}: unreadable bzip2 stream ({error})") from None
    if len(labels) != file.rows:
        raise DataError(
            f"{path} has {len(labels)} rows; the LIBSVM site's {file.name} has {file.rows}: "
            "delete it to download it again"
        )
    labels = _class_labels(labels, dataset, path.name)
    write_atomic(cached, lambda t: _save(t, features, labels))
    return LibsvmSplit(torch.from_numpy(features), torch.from_numpy(labels))


def _save(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, x=features, y=labels)


def _verified_digest(path: Path) -> str:
    """The file's sha256, checked against the one recorded at its first use (recorded now if
    this is the first)."""
    record = cache_root() / "libsvm" / "sha256.json"
    try:
        known = json.loads(record.read_text()) if record.is_file() else {}
    except ValueError:
        message = f"{record} is not JSON: delete it (the digests are recorded again)"
        raise DataError(message) from None
    actual = sha256_file(path)
    expected = known.get(path.name)
    if expected is None:
        atomic_write(record, json.dumps({**known, path.name: actual}, indent=1, sort_keys=True))
    elif expected != actual:
        raise DataError(
            f"{path} is not the file first used (sha256 {actual}, recorded {expected} in "
            f"{record}): delete it to download it again, or delete the record to trust it"
        )
    return actual


def parse_libsvm(lines, features: int, name: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [n, features], labels float64 [n]) of lines ``label index:value ...``
    with 1-based indices up to `features` (absent ones are zero). A malformed line raises
    :class:`DataError` naming `name`, the line number and what was expected."""
    rows, labels = [], []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        row = np.zeros(features, dtype=np.float32)
        try:
            labels.append(float(tokens[0]))
            for token in tokens[1:]:
                index, value = token.split(":")
                column = int(index)
                if not 1 <= column <= features:
                    raise IndexError(column)
                row[column - 1] = float(value)
        except IndexError as error:
            raise DataError(
                f"{name}: line {number}: feature index {error} outside 1..{features}"
            ) from None
        except ValueError:
            raise DataError(
                f"{name}: line {number}: expected 'label index:value ...', got {line.strip()!r:.80}"
            ) from None
        rows.append(row)
    if not rows:
        raise DataError(f"{name}: no rows")
    return np.stack(rows), np.asarray(labels)


def _class_labels(labels: np.ndarray, dataset: LibsvmSet, name: str) -> np.ndarray:
    """-1/+1 for a binary set, 0 .. classes - 1 from the file's 1 .. classes otherwise."""
    allowed = [-1.0, 1.0] if dataset.classes == 2 else list(range(1, dataset.classes + 1))
    bad = ~np.isin(labels, allowed)
    if bad.any():
        raise DataError(
            f"{name}: label {labels[bad][0]:g} on row {int(np.argmax(bad)) + 1}; "
            f"{dataset.name}'s labels are {', '.join(f'{v:g}' for v in allowed)}"
        )
    labels = labels.astype(np.int64)
    return labels if dataset.classes == 2 else labels - 1


# -- generated stand-ins -------------------------------------------------------------------------


@dataclass(frozen=True)
class StandIn:
    """A generated data set in place of a LIBSVM one: `label` says so, in every output."""

    name: str
    splits: dict[str, LibsvmSplit]

    @property
    def label(self) -> str:
        return f"generated stand-in for {self.name}"


def stand_in(name: str, rows: dict[str, int], seed: int = 0) -> StandIn:
    """A generated data set of the shape of LIBSVM's `name`: its feature and class counts,
    features uniform in [-1, 1] (ijcnn1) or [0, 1] (covtype, scaled to [0, 1]), labels drawn
    from a planted logistic (softmax) model with N(0, 9/d) weights, `rows[split]` rows per split.
    Seeded by `seed` (its own generator)."""
    if name not in DATASETS:
        raise ValueError(f"unknown LIBSVM data set {name!r}; choose one of {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    generator = torch.Generator().manual_seed(seed)
    d, classes = dataset.features, dataset.classes
    planted = 3 * torch.randn(d, classes, generator=generator) / d**0.5
    splits = {}
    for split, n in rows.items():
        features = torch.rand(n, d, generator=generator)  # [0, 1]: centred at 1/2
        if name == "ijcnn1":
            features = 2 * features - 1  # [-1, 1]: centred at 0
        centre = 0.0 if name == "ijcnn1" else 0.5
        probabilities = torch.softmax((features - centre) @ planted, dim=1)
        labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        splits[split] = LibsvmSplit(features, 2 * labels - 1 if classes == 2 else labels)
    return StandIn(name, splits)
