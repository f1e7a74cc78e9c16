"""Omniglot (Lake et al. 2015) for few-shot learning: 1623 characters x 20 drawings, at 28x28.

The two zips of brendenlake/omniglot ``python/`` are read in place, never extracted. Local zips
are checked by *content* (alphabets, characters, drawings, image size), not by checksum: faithful
copies exist whose bytes differ from the canonical ones (re-encoded PNGs, same pixels), so only
a download is pinned by sha256.

Every 105x105 drawing is resized to 28x28 once and cached as a memory-mapped ``.npy`` in
``cache_root()/omniglot`` with a JSON index beside it (alphabet, character, global id per
class). The cache is named after the zips' paths, sizes and modification times, so a second
start reads neither zip, and a replaced zip is checked and decoded afresh. Pixels are uint8
with strokes high (255) and background 0.

Two resizings are offered. ``"lanczos"`` (the default) is Pillow's antialiased LANCZOS on the
8-bit image. ``"nearest"`` reproduces the ``omniglot_resized`` folder of MAML's
``resize_images.py``, which the hyper-representation experiments of Franceschi et al. (2018)
loaded: that script asks for LANCZOS, but Pillow always resizes 1-bit images with NEAREST, so
those images are binary.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin  # noqa: F401  (imported before any fork)

from ..files import atomic_write, write_atomic
from . import store
from .cache import evict_stale, pool_map, resolve_workers
from .episodes import ClassSet
from .store import (
    DataError,
    cache_root,
    data_root,
    ensure_file,
    fetch_missing,
    require_files,
)

__all__ = [
    "BACKGROUND",
    "EVALUATION",
    "OmniglotData",
    "load_omniglot",
    "omniglot_dir",
    "omniglot_split",
]

Progress = Callable[[int, "int | None"], None]  # (images done, total)

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
# set -> (alphabets, characters); every character has DRAWERS drawings of RAW_SIZE pixels.
COUNTS = {BACKGROUND: (30, 964), EVALUATION: (20, 659)}
DRAWERS, RAW_SIZE, SIZE = 20, 105, 28
N_CHARACTERS = sum(n for _, n in COUNTS.values())

# The canonical zips, for users without a copy. sha256 and size from TensorFlow Datasets'
# url_checksums/omniglot.txt; md5 as hard-coded in torchvision.
CANONICAL = {
    BACKGROUND: ("ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640", 9_464_212),
    EVALUATION: ("1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee", 6_462_886),
}
CANONICAL_MD5 = {
    BACKGROUND: "68d2efa1b9178cc56df9314c21c6e718",
    EVALUATION: "6b91aef0f799c5bb55b94e3f2daec811",
}
MIRRORS = (
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/",
    "https://github.com/brendenlake/omniglot/raw/master/python/",
)

# Vinyals et al. (2016) split as distributed with jakesnell/prototypical-networks (MIT).
VINYALS_SHA256 = {
    "train": "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
    "val": "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
    "test": "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
}
VINYALS_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/"
    "c9bb4d258267c11cb6e23f0a19242d24ca98ad8a/data/omniglot/splits/vinyals/"
)
PAPER_SPLIT = {"train": (0, 1200), "val": (1200, 1300), "test": (1300, N_CHARACTERS)}
ROTATIONS = 4  # quarter turns; each one makes a class of its own

RESIZES = ("lanczos", "nearest")
CACHE_VERSION = 1
_MEMBER = re.compile(r"([^/]+)/([^/]+)/character(\d+)/(\d{4})_(\d{2})\.png")
_CHUNK = 24  # characters per worker task: ~50 tasks keep two workers evenly busy


@dataclass(frozen=True)
class OmniglotData:
    """All 1623 characters, ordered by their global id (the ``IIII`` of ``IIII_DD.png``).

    ``images`` is a read-only memory map [1623, 20, 28, 28] of uint8, strokes 255 and
    background 0, drawings in drawer order 01-20. ``background`` marks the 964 characters of
    ``images_background``.
    """

    images: np.ndarray
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]
    ids: np.ndarray
    background: np.ndarray
    directory: Path
    resize: str
    cache_path: Path

    @cached_property
    def names(self) -> tuple[str, ...]:
        """``Alphabet/characterNN`` per character, as in the Vinyals split files."""
        return tuple(f"{a}/{c}" for a, c in zip(self.alphabets, self.characters))

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def index(self, name: str) -> int:
        """Row of ``images`` for ``Alphabet/characterNN``."""
        try:
            return self._rows[name]
        except KeyError:
            raise KeyError(f"no Omniglot character {name!r}") from None


@dataclass(frozen=True)
class _Character:
    id: int
    alphabet: str
    character: str
    zip_path: Path
    members: tuple[str, ...]  # drawers 01-20


def omniglot_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the zips: ``data_dir`` if it holds one of them, else its ``omniglot/``."""
    root = data_root(data_dir)
    if any((root / f"{name}.zip").is_file() for name in COUNTS):
        return root
    return root / "omniglot"


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    *,
    resize: str = "lanczos",
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> OmniglotData:
    """Load Omniglot at 28x28, decoding the zips on first use and memory-mapping the cache after.

    A missing zip is downloaded (when ``download``) and checked against the canonical sha256 (a
    ``data_dir`` that does not exist is an error, not created); a present one must hold 30+20
    alphabets, 964+659 characters, 20 drawings each, 105x105, else :class:`DataError` says what
    is wrong. ``cache_dir`` defaults to ``cache_root()/omniglot``;
    ``workers`` (default: the usable CPUs) decode in parallel, calling ``progress(done, total)``.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    workers = resolve_workers(workers)
    directory = omniglot_dir(data_dir)
    source = f"get them from {MIRRORS[0]} (the canonical zips)"
    names = [f"{name}.zip" for name in COUNTS]
    missing = require_files(
        "Omniglot", directory, names, source, data_dir=data_dir, download=download
    )
    fetch_missing(missing, lambda name: _zip_path(directory, Path(name).stem, download))
    zips = [_zip_path(directory, name, download) for name in COUNTS]
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "omniglot"
    stem = cache / f"omniglot{SIZE}-{resize}-{_file_key(zips, resize)}"
    cached = _load_cache(stem)
    if cached is None:  # only now are the zips read: a second start needs just two stat calls
        cached = _build_cache(stem, _scan_all(zips), resize, workers, progress)
    images, classes = cached
    return OmniglotData(
        images=images,
        alphabets=tuple(c["alphabet"] for c in classes),
        characters=tuple(c["character"] for c in classes),
        ids=np.array([c["id"] for c in classes]),
        background=np.array([c["set"] == BACKGROUND for c in classes]),
        directory=directory,
        resize=resize,
        cache_path=stem.with_suffix(".npy"),
    )


def omniglot_split(
    data: OmniglotData,
    split: str = "paper",
    part: str = "train",
    seed: int = 0,
    download: bool = True,
) -> ClassSet:
    """The classes of one part of a split; every character gives 4 classes (0/90/180/270 deg).

    ``"paper"``: Franceschi et al.'s procedure, a seeded shuffle of the 1623 characters into
    1200 meta-train, 100 meta-validation and 323 meta-test characters. Their code shuffled the
    ``Alphabet/character`` folders in ``os.listdir`` order with ``RandomState(seed)``; the
    listing order is unknowable, so the sorted names are shuffled here (RandomState streams are
    frozen, so a seed gives the same split on every numpy).
    ``"vinyals"``: the split files ``splits/vinyals/{train,val,test}.txt`` beside the zips
    (1028/172/423 characters), downloaded when missing; ``seed`` is unused.
    """
    if part not in PAPER_SPLIT:
        raise ValueError(f"part must be 'train', 'val' or 'test', got {part!r}")
    if split == "paper":
        base, rotation = _paper_classes(data, part, seed)
    elif split == "vinyals":
        base, rotation = _vinyals_classes(data, part, download)
    else:
        raise ValueError(f"split must be 'paper' or 'vinyals', got {split!r}")
    names = tuple(f"{data.names[b]}/rot{90 * k:03d}" for b, k in zip(base, rotation))
    return ClassSet(data.images, base, rotation, names, note=f"Omniglot {split} split, {part}")


def _paper_classes(data: OmniglotData, part: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    names = sorted(data.names)
    np.random.RandomState(seed).shuffle(names)
    start, stop = PAPER_SPLIT[part]
    chars = np.sort([data.index(name) for name in names[start:stop]])
    return np.repeat(chars, ROTATIONS), np.tile(np.arange(ROTATIONS), len(chars))


def _vinyals_classes(
    data: OmniglotData, part: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    directory = data.directory / "splits" / "vinyals"
    name = f"{part}.txt"
    path = ensure_file(name, directory, VINYALS_SHA256[part], [VINYALS_URL + name], download)
    base, rotation = [], []
    for line in path.read_text().split():
        character, _, angle = line.rpartition("/rot")
        row = data._rows.get(character)
        if row is None or angle not in ("000", "090", "180", "270"):
            raise DataError(f"{path}: {line!r} is not Alphabet/characterNN/rotDDD")
        base.append(row)
        rotation.append(int(angle) // 90)
    return np.array(base), np.array(rotation)


# --- reading and checking the zips ------------------------------------------------------------


def _scan_all(zips: list[Path]) -> list[_Character]:
    """Every character of both zips, sorted by global id, after checking the whole layout."""
    chars = [c for path, name in zip(zips, COUNTS) for c in _scan_zip(path, name)]
    chars.sort(key=lambda c: c.id)
    ids = [c.id for c in chars]
    if ids != list(range(1, N_CHARACTERS + 1)):
        missing = sorted(set(range(1, N_CHARACTERS + 1)) - set(ids))
        raise DataError(
            f"Omniglot in {zips[0].parent}: character ids are not 1..{N_CHARACTERS} "
            f"(missing {missing[:10]}, {len(ids) - len(set(ids))} duplicated)"
        )
    return chars


def _zip_path(directory: Path, name: str, download: bool) -> Path:
    path = directory / f"{name}.zip"
    if path.is_file():
        return path  # checked by content: good copies differ from the canonical bytes
    sha256, _ = CANONICAL[name]
    if not download:
        raise DataError(
            f"{path} is missing and downloading is disabled; get {name}.zip from "
            f"{MIRRORS[0]} (md5 {CANONICAL_MD5[name]}) and save it there."
        )
    return store.download([m + path.name for m in MIRRORS], path, sha256)


def _scan_zip(path: Path, set_name: str) -> list[_Character]:
    """The characters of one zip; raises DataError listing what breaks the expected layout."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable zip ({err})") from err
    groups, problems = _group_members(names, set_name)
    chars = []
    for (alphabet, number), drawings in sorted(groups.items()):
        problems += _check_drawings(alphabet, number, drawings)
        ids = {i for i, _, _ in drawings}
        members = tuple(m for _, _, m in sorted(drawings, key=lambda d: d[1]))
        chars.append(_Character(min(ids), alphabet, f"character{number:02d}", path, members))
    problems += _check_counts(groups, set_name)
    if problems:
        listed = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise DataError(f"{path} is not a complete Omniglot {set_name} set:\n  {listed}{more}")
    return chars


def _group_members(names: list[str], set_name: str) -> tuple[dict, list[str]]:
    groups: dict[tuple[str, int], list[tuple[int, int, str]]] = defaultdict(list)
    problems = []
    for name in names:
        if name.startswith("__MACOSX/") or name.rpartition("/")[2].startswith("."):
            continue  # archiver litter
        match = _MEMBER.fullmatch(name)
        if not match or match[1] != set_name:
            problems.append(f"unexpected member {name}")
            continue
        _, alphabet, number, char_id, drawer = match.groups()
        groups[alphabet, int(number)].append((int(char_id), int(drawer), name))
    return groups, problems


def _check_drawings(alphabet: str, number: int, drawings: list) -> list[str]:
    where = f"{alphabet}/character{number:02d}"
    problems = []
    drawers = sorted(d for _, d, _ in drawings)
    if drawers != list(range(1, DRAWERS + 1)):
        missing = sorted(set(range(1, DRAWERS + 1)) - set(drawers))
        problems.append(f"{where}: drawers {drawers}, expected 01-{DRAWERS} (missing {missing})")
    if len({i for i, _, _ in drawings}) != 1:
        problems.append(f"{where}: drawings carry different character ids")
    return problems


def _check_counts(groups: dict, set_name: str) -> list[str]:
    per_alphabet = defaultdict(list)
    for alphabet, number in groups:
        per_alphabet[alphabet].append(number)
    want_alphabets, want_chars = COUNTS[set_name]
    problems = [
        f"{alphabet}: no character{n:02d}"
        for alphabet, numbers in sorted(per_alphabet.items())
        for n in sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    ]
    if (len(per_alphabet), len(groups)) != (want_alphabets, want_chars):
        problems.append(
            f"{len(per_alphabet)} alphabets and {len(groups)} characters, "
            f"expected {want_alphabets} and {want_chars}"
        )
    return problems


def _file_key(zips: list[Path], resize: str) -> str:
    """Names the cache after the zips' paths, sizes and modification times (a stat each), so a
    second start skips reading them, and a replaced zip gets a cache of its own."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}/{resize}/{SIZE}".encode())
    for path in zips:
        info = path.stat()
        digest.update(f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --- decoding and caching ----------------------------------------------------------------------


def _build_cache(
    stem: Path,
    chars: list[_Character],
    resize: str,
    workers: int,
    progress: Progress | None,
) -> tuple[np.ndarray, list[dict]]:
    images = np.empty((len(chars), DRAWERS, SIZE, SIZE), np.uint8)
    chunks = _chunks(chars)
    tasks = [
        (chars[i].zip_path, [m for c in chars[i:j] for m in c.members], resize) for i, j in chunks
    ]
    done = 0
    try:
        for (i, j), block in zip(chunks, pool_map(_decode_members, tasks, workers)):
            images[i:j] = block.reshape(-1, DRAWERS, SIZE, SIZE)
            done += len(block)
            if progress is not None:
                progress(done, len(chars) * DRAWERS)
    finally:
        _close_zips()  # the serial path opened them in this process
    source = str(chars[0].zip_path.parent.resolve())
    index = {
        "version": CACHE_VERSION,
        "source": source,
        "resize": resize,
        "shape": list(images.shape),
        "classes": [
            {"id": c.id, "alphabet": c.alphabet, "character": c.character, "set": c.zip_path.stem}
            for c in chars
        ],
    }
    write_atomic(stem.with_suffix(".npy"), lambda tmp: _save_array(tmp, images))
    atomic_write(stem.with_suffix(".json"), json.dumps(index))
    evict_stale(stem, source)
    return np.load(stem.with_suffix(".npy"), mmap_mode="r"), index["classes"]


def _save_array(path: Path, images: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: given a name, np.save would add ".npy" to it
        np.save(handle, images)


def _chunks(chars: list[_Character]) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most _CHUNK characters, each within one zip."""
    bounds = [0]
    for i in range(1, len(chars) + 1):
        if (
            i == len(chars)
            or i - bounds[-1] == _CHUNK
            or chars[i].zip_path != chars[i - 1].zip_path
        ):
            bounds.append(i)
    return list(zip(bounds, bounds[1:]))


def _load_cache(stem: Path) -> tuple[np.ndarray, list[dict]] | None:
    """The cached images and class index, or None when absent or unusable (then rebuilt)."""
    try:
        index = json.loads(stem.with_suffix(".json").read_text())
        images = np.load(stem.with_suffix(".npy"), mmap_mode="r")
    except (OSError, ValueError):
        return None
    expected = [N_CHARACTERS, DRAWERS, SIZE, SIZE]
    if list(images.shape) != expected or index.get("shape") != expected:
        return None
    return images, index["classes"]


def _decode_members(task: tuple[Path, list[str], str]) -> np.ndarray:
    """Worker: decode and resize the named PNGs of one zip into uint8 [n, 28, 28]."""
    zip_path, members, resize = task
    zf = _open_zip(zip_path)
    out = np.empty((len(members), SIZE, SIZE), np.uint8)
    for j, member in enumerate(members):
        out[j] = _decode_png(zf.read(member), f"{zip_path.name}:{member}", resize)
    return out


_OPEN_ZIPS: dict[tuple[int, Path], zipfile.ZipFile] = {}


def _open_zip(path: Path) -> zipfile.ZipFile:
    """The zip, opened once per process: its directory takes ~20 ms to read. Keyed by pid
    because a forked worker must not share its parent's file offset."""
    key = (os.getpid(), path)
    if key not in _OPEN_ZIPS:
        _OPEN_ZIPS[key] = zipfile.ZipFile(path)
    return _OPEN_ZIPS[key]


def _close_zips() -> None:
    for key in [k for k in _OPEN_ZIPS if k[0] == os.getpid()]:
        _OPEN_ZIPS.pop(key).close()


def _decode_png(data: bytes, where: str, resize: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != (RAW_SIZE, RAW_SIZE):
                raise DataError(f"{where}: {image.size[0]}x{image.size[1]}, expected 105x105")
            if resize == "nearest":  # what Pillow does to a 1-bit image whatever it is asked
                small = image.resize((SIZE, SIZE), Image.Resampling.NEAREST).convert("L")
            else:
                small = image.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's ways of saying "corrupt"
        raise DataError(f"{where}: unreadable PNG ({err})") from err
    return 255 - np.asarray(small)  # strokes high: the drawings are black on white
