"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split.

Expected layout, the common processed one (MAML's ``proc_images.py``)::

    <data_root>/miniimagenet/{train,val,test}/<wnid>/<file>.jpg   84x84 RGB, 600 per class
    <data_root>/miniimagenet/splits/ravi/{train,val,test}.csv     filename,label

The CSVs are pinned by sha256 (downloaded when missing); each image folder must hold exactly
the files its CSV names. ``val/`` may be absent (copies often leave it out for size): then
:func:`miniimagenet_split` holds out 16 seeded train classes for meta-validation and says so in
the returned class set's ``note``; results are then not comparable with the Ravi validation.

Each part is decoded once into a memory-mapped uint8 ``.npy`` [classes, 600, 84, 84, 3] in
``cache_root()/miniimagenet`` (train 813 MB, test 254 MB), named after every file's name, size
and modification time: a changed file rebuilds that part instead of going unnoticed, and the
superseded cache of the same folder is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin  # noqa: F401  (imported before any fork)

from ..files import atomic_write, write_atomic
from .cache import evict_stale, pool_map, resolve_workers
from .episodes import ClassSet
from .store import DataError, absent_root, cache_root, data_root, ensure_file, missing_root

__all__ = ["MiniImageNetData", "load_miniimagenet", "miniimagenet_dir", "miniimagenet_split"]

Progress = Callable[[int, "int | None"], None]  # (images done, total)

PARTS = ("train", "val", "test")  # 64, 16 and 20 classes in the Ravi split
IMAGE_SHAPE = (84, 84, 3)
HOLDOUT = 16  # train classes held out when val/ is absent: as many as Ravi's validation has

RAVI_SHA256 = {
    "train": "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f",
    "val": "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9",
    "test": "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa",
}
RAVI_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/"
    "c9bb4d258267c11cb6e23f0a19242d24ca98ad8a/data/miniImagenet/splits/ravi/"
)
CACHE_VERSION = 1
LAYOUT = (
    "train/<wnid>/*.jpg and test/<wnid>/*.jpg (84x84 RGB, 600 per class; val/<wnid>/*.jpg "
    "optional) and splits/ravi/{train,val,test}.csv (filename,label; downloaded when missing)"
)


@dataclass(frozen=True)
class MiniImageNetData:
    """The decoded parts: ``images[part]`` is a read-only memory map [classes, n, 84, 84, 3]
    of uint8 RGB (n = 600 for the Ravi split), classes in CSV order, named by ``wnids[part]``.

    ``"val"`` is present only when the data directory has ``val/``.
    """

    images: dict[str, np.ndarray]
    wnids: dict[str, tuple[str, ...]]
    directory: Path

    @property
    def has_val(self) -> bool:
        return "val" in self.images

    @property
    def note(self) -> str:
        """Where meta-validation classes come from; worth printing with every result."""
        if self.has_val:
            return "meta-validation: the 16 Ravi validation classes of val/"
        return (
            f"val/ is absent: miniimagenet_split holds out {HOLDOUT} seeded train classes for "
            "meta-validation, so results are not comparable with the Ravi validation split"
        )


def miniimagenet_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory with ``train/``: ``data_dir`` if it has one, else its ``miniimagenet/``."""
    root = data_root(data_dir)
    return root if (root / "train").is_dir() else root / "miniimagenet"


def load_miniimagenet(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> MiniImageNetData:
    """Load ``train``, ``test`` and (when present) ``val``, decoding them on first use.

    Missing CSVs are downloaded when ``download``; missing, extra or undecodable images raise
    :class:`DataError` naming them. ``workers`` processes (default: the usable CPUs) decode,
    calling ``progress(done, total)`` after each class.
    """
    workers = resolve_workers(workers)
    directory = miniimagenet_dir(data_dir)
    _check_layout(directory, missing_root(data_dir))
    parts = [p for p in PARTS if p != "val" or (directory / "val").is_dir()]
    listings = {p: _listing(directory, p, download) for p in parts}
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "miniimagenet"
    stems = {p: cache / f"{p}-{_fingerprint(listings[p])}" for p in parts}
    images = {p: _load_cache(stems[p], listings[p]) for p in parts}
    todo = [p for p in parts if images[p] is None]
    counter = _Counter(sum(_count(listings[p]) for p in todo), progress)
    for p in todo:
        images[p] = _build_cache(stems[p], directory / p, listings[p], workers, counter)
    wnids = {p: tuple(listings[p]) for p in parts}
    return MiniImageNetData(images, wnids, directory)


def _check_layout(directory: Path, root: Path | None) -> None:
    """Raise DataError, with the layout expected and where the data comes from, when the image
    folders are absent (mini-ImageNet cannot be downloaded: its images are ImageNet's). ``root``:
    the chosen data root, when it does not exist."""
    absent = [str(directory / p) for p in ("train", "test") if not (directory / p).is_dir()]
    if not absent:
        return
    message = (
        f"mini-ImageNet: {' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} missing. "
        f"Expected in {directory}: {LAYOUT}. It is not downloaded (its images are ImageNet's, "
        "under ImageNet's terms): make it from the images.zip of Ravi & Larochelle's release "
        "with data/miniImagenet/proc_images.py of github.com/cbfinn/maml, which resizes the "
        "images to 84x84 and sorts them into <part>/<wnid>/ by the CSVs; see docs/experiments.md"
    )
    raise DataError(message if root is None else f"{absent_root(root)}. {message}")


def miniimagenet_split(data: MiniImageNetData, part: str = "train", seed: int = 0) -> ClassSet:
    """The classes of ``part``; without ``val/``, ``seed`` picks 16 train classes to hold out.

    Then ``"val"`` is those 16 and ``"train"`` the other 48, and ``note`` says so.
    """
    if part not in PARTS:
        raise ValueError(f"part must be 'train', 'val' or 'test', got {part!r}")
    if data.has_val or part == "test":
        return _class_set(data, part, np.arange(len(data.wnids[part])), f"mini-ImageNet {part}")
    n_train = len(data.wnids["train"])
    if n_train <= HOLDOUT:
        raise DataError(f"mini-ImageNet: {n_train} train classes, too few to hold out {HOLDOUT}")
    held = np.sort(np.random.RandomState(seed).permutation(n_train)[:HOLDOUT])
    if part == "val":
        note = (
            f"mini-ImageNet val/ is absent: meta-validation uses {HOLDOUT} of the {n_train} "
            f"train classes, held out with seed {seed} (not the Ravi validation classes)"
        )
        return _class_set(data, "train", held, note)
    note = (
        f"mini-ImageNet val/ is absent: meta-train uses {n_train - HOLDOUT} of the {n_train} "
        f"train classes; {HOLDOUT} are held out for meta-validation with seed {seed}"
    )
    return _class_set(data, "train", np.setdiff1d(np.arange(n_train), held), note)


def _class_set(data: MiniImageNetData, part: str, classes: np.ndarray, note: str) -> ClassSet:
    names = tuple(data.wnids[part][i] for i in classes)
    return ClassSet(data.images[part], classes, np.zeros_like(classes), names, note=note)


# --- checking the files ----------------------------------------------------------------------


def _listing(directory: Path, part: str, download: bool) -> dict[str, list[tuple[str, int, int]]]:
    """wnid -> [(file, size, mtime_ns)] in CSV order, after matching the folder to the CSV."""
    name = f"{part}.csv"
    csv = ensure_file(
        name, directory / "splits" / "ravi", RAVI_SHA256[part], [RAVI_URL + name], download
    )
    listing = {}
    for wnid, files in _read_csv(csv).items():
        folder = directory / part / wnid
        try:
            entries = {e.name: e.stat() for e in os.scandir(folder) if not e.name.startswith(".")}
        except OSError as err:
            raise DataError(f"mini-ImageNet: cannot list {folder} ({err})") from err
        _compare(folder, files, entries)
        listing[wnid] = [(f, entries[f].st_size, entries[f].st_mtime_ns) for f in files]
    return listing


def _read_csv(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().split()
    if not lines or lines[0] != "filename,label":
        raise DataError(f"{path}: expected the header 'filename,label'")
    classes: dict[str, list[str]] = {}
    for line in lines[1:]:
        filename, _, label = line.partition(",")
        classes.setdefault(label, []).append(filename)
    if len({len(files) for files in classes.values()}) != 1:
        raise DataError(f"{path}: no rows, or classes with different numbers of images")
    return classes


def _compare(folder: Path, expected: list[str], found: dict) -> None:
    missing = [f for f in expected if f not in found]
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise DataError(
            f"mini-ImageNet: {folder} does not match the split CSV: "
            f"{len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}"
        )


def _count(listing: dict) -> int:
    return sum(len(files) for files in listing.values())


def _fingerprint(listing: dict) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}/{IMAGE_SHAPE}".encode())
    for wnid, files in listing.items():
        digest.update(f"{wnid}:{files}\n".encode())
    return digest.hexdigest()[:16]


# --- decoding and caching ----------------------------------------------------------------------


class _Counter:
    """Counts decoded images across parts for one ``progress(done, total)``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _build_cache(
    stem: Path, folder: Path, listing: dict, workers: int, counter: _Counter
) -> np.ndarray:
    """Decode one part; workers write their classes straight into the temporary .npy."""
    shape = (len(listing), len(next(iter(listing.values()))), *IMAGE_SHAPE)
    tasks = [
        (i, [folder / wnid / name for name, _, _ in files])
        for i, (wnid, files) in enumerate(listing.items())
    ]

    def decode(tmp: Path) -> None:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
        for n in pool_map(_decode_class, [(tmp, *task) for task in tasks], workers):
            counter.add(n)

    write_atomic(stem.with_suffix(".npy"), decode)
    source = str(folder.resolve())
    index = {
        "version": CACHE_VERSION,
        "source": source,
        "shape": list(shape),
        "wnids": list(listing),
    }
    atomic_write(stem.with_suffix(".json"), json.dumps(index))
    evict_stale(stem, source)
    return np.load(stem.with_suffix(".npy"), mmap_mode="r")


def _load_cache(stem: Path, listing: dict) -> np.ndarray | None:
    """The cached part, or None when absent or not this listing's (then it is rebuilt)."""
    try:
        index = json.loads(stem.with_suffix(".json").read_text())
        images = np.load(stem.with_suffix(".npy"), mmap_mode="r")
    except (OSError, ValueError):
        return None
    shape = [len(listing), len(next(iter(listing.values()))), *IMAGE_SHAPE]
    if list(images.shape) != shape or index.get("wnids") != list(listing):
        return None
    return images


def _decode_class(task: tuple[Path, int, list[Path]]) -> int:
    """Worker: decode one class's JPEGs into row ``index`` of the array file at ``path``."""
    path, index, files = task
    out = np.load(path, mmap_mode="r+")
    for j, file in enumerate(files):
        out[index, j] = _decode_jpeg(file)
    out.flush()
    return len(files)


def _decode_jpeg(path: Path) -> np.ndarray:
    try:
        with Image.open(path, formats=["JPEG"]) as image:
            if image.size != IMAGE_SHAPE[:2]:
                raise DataError(f"{path}: {image.size[0]}x{image.size[1]}, expected 84x84")
            # A few ImageNet JPEGs are greyscale or CMYK; the array is RGB throughout.
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's ways of saying "corrupt"
        raise DataError(f"{path}: not a readable JPEG ({err})") from err
