"""Omniglot from the shared zips: layout checks, the 28x28 cache, the paper and Vinyals splits.

The cache is built once for this module in a temporary directory (a few seconds).
"""

import hashlib
import io
import shutil
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import DATA

from bilevel.app.data import omniglot
from bilevel.app.data.omniglot import (
    BACKGROUND,
    EVALUATION,
    load_omniglot,
    omniglot_dir,
    omniglot_split,
)
from bilevel.app.data.store import DataError

ZIPS = [f"{BACKGROUND}.zip", f"{EVALUATION}.zip"]


def _source_dir() -> Path:
    """The shared Omniglot (under tests.conftest.DATA)."""
    directory = omniglot_dir(DATA)
    if not all((directory / name).is_file() for name in ZIPS):
        pytest.skip(f"Omniglot zips not found in {directory}")
    return directory


@pytest.fixture(scope="module")
def source():
    return _source_dir()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def data(source, cache_dir):  # decodes all 32,460 drawings: the tests that use it are e2e
    return load_omniglot(source, download=False, cache_dir=cache_dir)


def _pillow(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    """The reference pipeline: Pillow's LANCZOS on the 8-bit drawing, then inverted."""
    image = Image.open(io.BytesIO(zf.read(member))).convert("L")
    return 255 - np.asarray(image.resize((28, 28), Image.Resampling.LANCZOS))


def _copy_zip_without(source: Path, dest: Path, prefix: str) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            if not info.filename.startswith(prefix):
                zout.writestr(info.filename, zin.read(info))


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (size, size), 1).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.e2e
def test_contents(data):
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == np.uint8
    assert isinstance(data.images, np.memmap)
    assert data.ids.tolist() == list(range(1, 1624))
    assert data.background.sum() == 964 and not data.background[964:].any()
    assert len(set(data.alphabets)) == 50 and len(set(data.names)) == 1623
    assert data.index("Angelic/character01") == 964  # the first evaluation character, 0965
    assert data.names[708] == "Alphabet_of_the_Magi/character01"  # 0709, as in the zip
    # Strokes are high: most of a drawing is background, now 0.
    assert (data.images == 0).mean() > 0.7 and data.images.max() == 255


@pytest.mark.e2e
def test_pixels_are_pillow_lanczos_inverted(data, source):
    zips = {name: zipfile.ZipFile(source / f"{name}.zip") for name in (BACKGROUND, EVALUATION)}
    for char_id, drawer in [(1, 1), (709, 3), (964, 20), (965, 1), (1200, 11), (1623, 7)]:
        row = char_id - 1
        set_name = BACKGROUND if data.background[row] else EVALUATION
        member = f"{set_name}/{data.names[row]}/{char_id:04d}_{drawer:02d}.png"
        assert np.array_equal(data.images[row, drawer - 1], _pillow(zips[set_name], member))


def test_nearest_is_what_maml_resize_images_made(source):
    with zipfile.ZipFile(source / ZIPS[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".png"))
        raw = zf.read(member)
    # MAML's resize_images.py: Image.open(f).resize((28, 28), resample=Image.LANCZOS).
    maml = np.asarray(Image.open(io.BytesIO(raw)).resize((28, 28), Image.Resampling.LANCZOS))
    ours = omniglot._decode_png(raw, member, "nearest")
    assert np.array_equal(ours, np.where(maml, 0, 255))
    assert set(np.unique(ours)) <= {0, 255}


@pytest.mark.e2e
def test_second_load_reads_the_cache(data, source, cache_dir, monkeypatch):
    monkeypatch.setattr(omniglot, "_build_cache", lambda *a: pytest.fail("cache rebuilt"))
    start = time.perf_counter()
    again = load_omniglot(source, download=False, cache_dir=cache_dir)
    assert time.perf_counter() - start < 1.0
    assert again.cache_path == data.cache_path and again.names == data.names
    assert np.array_equal(again.images[::97], data.images[::97])
    assert data.cache_path.with_suffix(".json").is_file()


@pytest.mark.e2e
def test_damaged_cache_is_rebuilt(data, source, tmp_path, monkeypatch):
    for suffix in (".npy", ".json"):
        shutil.copy(data.cache_path.with_suffix(suffix), tmp_path)
    copy = tmp_path / data.cache_path.name
    copy.write_bytes(copy.read_bytes()[:1000])
    monkeypatch.setattr(omniglot, "_build_cache", lambda *a: pytest.fail("rebuilt"))
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):
        load_omniglot(source, download=False, cache_dir=tmp_path)


def test_zip_missing_a_character_is_refused(source, tmp_path):
    _copy_zip_without(source / ZIPS[0], tmp_path / ZIPS[0], f"{BACKGROUND}/Tifinagh/character10/")
    shutil.copy(source / ZIPS[1], tmp_path)
    with pytest.raises(DataError, match="Tifinagh: no character10") as err:
        load_omniglot(tmp_path, download=False, cache_dir=tmp_path / "cache")
    assert "963 characters, expected 30 and 964" in str(err.value)


def test_layout_problems_are_listed(source, tmp_path):
    with zipfile.ZipFile(tmp_path / ZIPS[0], "w") as zf:
        for drawer in range(1, 20):  # one drawing short
            zf.writestr(f"{BACKGROUND}/Latin/character01/0001_{drawer:02d}.png", _png(105))
        zf.writestr(f"{BACKGROUND}/Latin/notes.txt", "stray")
        zf.writestr(f"{BACKGROUND}/.DS_Store", "ignored")
    shutil.copy(source / ZIPS[1], tmp_path)
    with pytest.raises(DataError) as err:
        load_omniglot(tmp_path, download=False, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "missing [20]" in message and "unexpected member" in message
    assert "1 alphabets and 1 characters, expected 30 and 964" in message
    assert ".DS_Store" not in message


def test_bad_images_are_refused(tmp_path):
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("small.png", _png(104))
        zf.writestr("broken.png", _png(105)[:60])
    with pytest.raises(DataError, match="small.png: 104x104, expected 105x105"):
        omniglot._decode_members((path, ["small.png"], "lanczos"))
    with pytest.raises(DataError, match="broken.png: unreadable PNG"):
        omniglot._decode_members((path, ["broken.png"], "lanczos"))
    omniglot._close_zips()


def test_not_a_zip_is_refused(source, tmp_path):
    (tmp_path / ZIPS[0]).write_bytes(b"not a zip")
    shutil.copy(source / ZIPS[1], tmp_path)
    with pytest.raises(DataError, match="not a readable zip"):
        load_omniglot(tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_missing_zip_without_download(tmp_path):
    with pytest.raises(DataError, match="downloading is disabled"):
        load_omniglot(tmp_path, download=False)


def test_missing_zips_are_all_named_with_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_omniglot(tmp_path)
    message = str(info.value)
    assert all(name in message for name in ZIPS) and omniglot.MIRRORS[0] in message
    assert str(tmp_path / "omniglot") in message
    typo = tmp_path / "typo"
    monkeypatch.delenv("BILEVEL_OFFLINE")
    with pytest.raises(DataError, match=f"data directory {typo} does not exist"):
        load_omniglot(typo, cache_dir=tmp_path / "cache")
    assert not typo.exists()


def test_download_is_pinned_to_the_canonical_zip(source, tmp_path, monkeypatch):
    # A local mirror: urllib reads file:// URLs like any other.
    monkeypatch.setattr(omniglot, "MIRRORS", (source.as_uri() + "/",))
    with pytest.raises(DataError, match="sha256 mismatch"):  # re-encoded copy, other bytes
        omniglot._zip_path(tmp_path, BACKGROUND, download=True)
    sha256 = hashlib.sha256((source / ZIPS[0]).read_bytes()).hexdigest()
    monkeypatch.setitem(omniglot.CANONICAL, BACKGROUND, (sha256, 0))
    path = omniglot._zip_path(tmp_path, BACKGROUND, download=True)
    assert path == tmp_path / ZIPS[0] and path.stat().st_size == (source / ZIPS[0]).stat().st_size


@pytest.mark.e2e
@pytest.mark.parametrize("part, n", [("train", 1200), ("val", 100), ("test", 323)])
def test_paper_split_sizes(data, part, n):
    classes = omniglot_split(data, "paper", part, seed=0)
    assert len(classes) == 4 * n and len(set(classes.base.tolist())) == n
    assert np.bincount(classes.rotation).tolist() == [n] * 4
    assert classes.names[0].endswith("/rot000") and classes.names[1].endswith("/rot090")
    assert classes.examples_per_class == 20 and classes.image_shape == (1, 28, 28)


@pytest.mark.e2e
def test_paper_split_is_a_seeded_partition(data):
    def chars(seed, part):
        return set(omniglot_split(data, "paper", part, seed=seed).base.tolist())

    parts = [chars(0, p) for p in ("train", "val", "test")]
    assert set().union(*parts) == set(range(1623)) and sum(map(len, parts)) == 1623
    assert chars(0, "val") == chars(0, "val")
    assert chars(1, "val") != chars(0, "val")


@pytest.mark.e2e
def test_vinyals_split_follows_the_files(data, source):
    parts = {}
    for part, n in [("train", 1028), ("val", 172), ("test", 423)]:
        classes = omniglot_split(data, "vinyals", part, download=False)
        lines = (source / "splits" / "vinyals" / f"{part}.txt").read_text().split()
        assert list(classes.names) == lines
        assert len(classes) == 4 * n and len(set(classes.base.tolist())) == n
        parts[part] = set(classes.base.tolist())
    assert set().union(*parts.values()) == set(range(1623))
    assert not parts["train"] & parts["test"]


@pytest.mark.e2e
def test_vinyals_split_file_missing_without_download(data, tmp_path):
    with pytest.raises(DataError, match="downloading is disabled"):
        omniglot_split(replace(data, directory=tmp_path), "vinyals", "test", download=False)


@pytest.mark.e2e
def test_rotated_class_images(data):
    classes = omniglot_split(data, "paper", "test")
    i = int(np.flatnonzero(classes.rotation == 1)[0])
    base = data.images[classes.base[i]]
    assert np.array_equal(classes.class_images(i), np.rot90(base, 1, axes=(1, 2)))


@pytest.mark.e2e
def test_bad_arguments(data, source):
    with pytest.raises(ValueError, match="split"):
        omniglot_split(data, "lake", "train")
    with pytest.raises(ValueError, match="part"):
        omniglot_split(data, "paper", "trainval")
    with pytest.raises(ValueError, match="resize"):
        load_omniglot(source, download=False, resize="bicubic")
    with pytest.raises(ValueError, match="workers"):
        load_omniglot(source, download=False, workers=0)
    with pytest.raises(KeyError, match="no Omniglot character"):
        data.index("Klingon/character01")
