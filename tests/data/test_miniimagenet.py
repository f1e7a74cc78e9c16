"""mini-ImageNet on small copies of the shared folders: checks, cache, the val-absent holdout.

Each test gets its own copy of a small data directory of real JPEGs (8 per class, with CSVs to
match, whose checksums are patched in), so decoding stays well under a second.
"""

import csv
import functools
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import DATA

from bilevel.app.data import miniimagenet
from bilevel.app.data.miniimagenet import load_miniimagenet, miniimagenet_dir, miniimagenet_split
from bilevel.app.data.store import DataError

PER_CLASS = 8


def _source_dir() -> Path:
    """The shared copy (tests.conftest.DATA)."""
    directory = miniimagenet_dir(DATA)
    if not (directory / "train").is_dir() or not (directory / "splits" / "ravi").is_dir():
        pytest.skip(f"mini-ImageNet not found in {directory}")
    return directory


@pytest.fixture(scope="module")
def source():
    return _source_dir()


@functools.lru_cache
def _rows(source: Path, part: str) -> dict[str, list[str]]:
    with open(source / "splits" / "ravi" / f"{part}.csv") as f:
        rows: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            rows.setdefault(row["label"], []).append(row["filename"])
    return rows


def _make_subset(source: Path, root: Path, parts: tuple[str, ...]) -> dict[str, str]:
    """PER_CLASS real images per class under ``root`` and CSVs listing them; their sha256s."""
    (root / "splits" / "ravi").mkdir(parents=True)
    spare = next((source / "train").iterdir()).iterdir()  # stand-ins for the absent val images
    sha256 = {}
    for part in parts:
        lines = ["filename,label"]
        for wnid, files in _rows(source, part).items():
            (root / part / wnid).mkdir(parents=True)
            for name in files[:PER_CLASS]:
                real = source / part / wnid / name
                shutil.copy(real if part != "val" else next(spare), root / part / wnid / name)
                lines.append(f"{name},{wnid}")
        path = root / "splits" / "ravi" / f"{part}.csv"
        path.write_text("\n".join(lines) + "\n")
        sha256[part] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sha256


@pytest.fixture(scope="module")
def templates(source, tmp_path_factory):
    """Built once: a subset without val/ and one with it (val images stand in from train)."""
    made = {}
    for parts in [("train", "test"), ("train", "val", "test")]:
        root = tmp_path_factory.mktemp("mini") / "miniimagenet"
        made[len(parts)] = root, _make_subset(source, root, parts)
    return made


def _copy(templates, n_parts: int, dest: Path, monkeypatch) -> Path:
    root, sha256 = templates[n_parts]
    shutil.copytree(root, dest / "miniimagenet")
    for part, digest in sha256.items():
        monkeypatch.setitem(miniimagenet.RAVI_SHA256, part, digest)
    return dest / "miniimagenet"


@pytest.fixture
def subset(templates, tmp_path, monkeypatch):
    return _copy(templates, 2, tmp_path, monkeypatch)


def _load(root: Path, **kwargs):
    return load_miniimagenet(root, download=False, cache_dir=root.parent / "cache", **kwargs)


def test_real_folders_match_the_ravi_csvs(source):
    for part, n in [("train", 64), ("test", 20)]:
        listing = miniimagenet._listing(source, part, download=False)
        assert len(listing) == n and {len(files) for files in listing.values()} == {600}


def test_decoded_pixels_and_layout(subset, source):
    data = _load(subset, workers=2)
    assert set(data.images) == {"train", "test"} and not data.has_val
    assert data.images["train"].shape == (64, PER_CLASS, 84, 84, 3)
    assert data.images["test"].shape == (20, PER_CLASS, 84, 84, 3)
    assert isinstance(data.images["train"], np.memmap)
    rows = _rows(source, "test")
    assert list(data.wnids["test"]) == list(rows)  # CSV order
    for c, e in [(0, 0), (7, 3), (19, PER_CLASS - 1)]:
        wnid = data.wnids["test"][c]
        expected = np.asarray(Image.open(source / "test" / wnid / rows[wnid][e]).convert("RGB"))
        assert np.array_equal(data.images["test"][c, e], expected)


def test_parallel_and_serial_decoding_agree(subset, tmp_path):
    serial = load_miniimagenet(subset, download=False, cache_dir=tmp_path / "c1", workers=1)
    parallel = load_miniimagenet(subset, download=False, cache_dir=tmp_path / "c2", workers=2)
    assert np.array_equal(serial.images["train"], parallel.images["train"])


def test_cache_is_reused_and_progress_reported(subset, monkeypatch):
    calls = []
    _load(subset, progress=lambda done, total: calls.append((done, total)))
    total = 84 * PER_CLASS
    assert calls[-1] == (total, total) and len(calls) == 84
    monkeypatch.setattr(miniimagenet, "_build_cache", lambda *a: pytest.fail("cache rebuilt"))
    _load(subset)


def test_changed_file_rebuilds_its_part_and_drops_the_old_cache(subset, monkeypatch):
    _load(subset)
    victim = next((subset / "test").iterdir()).iterdir().__next__()
    os.utime(victim, ns=(0, 0))
    built = []
    real = miniimagenet._build_cache
    monkeypatch.setattr(
        miniimagenet, "_build_cache", lambda s, f, *a: built.append(f.name) or real(s, f, *a)
    )
    _load(subset)
    assert built == ["test"]
    cache = subset.parent / "cache"
    assert len(list(cache.glob("test-*.npy"))) == len(list(cache.glob("train-*.npy"))) == 1


def test_the_cache_is_written_whole_with_the_mode_the_umask_gives(subset):
    previous = os.umask(0o027)  # a group that may read, others nothing
    try:
        data = _load(subset, workers=2)
    finally:
        os.umask(previous)
    cache = subset.parent / "cache"
    modes = {p.name: p.stat().st_mode & 0o777 for p in cache.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o640}, modes  # .npy and .json per part
    assert data.images["test"].shape == (20, PER_CLASS, 84, 84, 3)


def test_val_absent_holds_out_16_seeded_train_classes(subset):
    data = _load(subset)
    assert "absent" in data.note
    val, train = miniimagenet_split(data, "val"), miniimagenet_split(data, "train")
    assert len(val) == 16 and len(train) == 48
    assert "held out" in val.note and "absent" in train.note
    assert not set(val.names) & set(train.names)
    assert set(val.names) | set(train.names) == set(data.wnids["train"])
    assert val.images is data.images["train"] and val.examples_per_class == PER_CLASS
    assert miniimagenet_split(data, "val", seed=0).names == val.names
    assert miniimagenet_split(data, "val", seed=1).names != val.names
    test = miniimagenet_split(data, "test")
    assert len(test) == 20 and test.image_shape == (3, 84, 84)


def test_val_folder_is_used_when_present(source, templates, tmp_path, monkeypatch):
    root = _copy(templates, 3, tmp_path, monkeypatch)
    data = _load(root)
    assert data.has_val and "Ravi" in data.note
    val = miniimagenet_split(data, "val")
    assert list(val.names) == list(_rows(source, "val")) and val.images is data.images["val"]
    assert len(miniimagenet_split(data, "train")) == 64


def test_missing_image_is_named(subset):
    victim = next((subset / "train").iterdir()).iterdir().__next__()
    victim.unlink()
    with pytest.raises(DataError, match=f"1 missing \\['{victim.name}'\\]"):
        _load(subset)


def test_extra_image_is_named(subset):
    folder = next((subset / "test").iterdir())
    shutil.copy(next(folder.iterdir()), folder / "stray.jpg")
    with pytest.raises(DataError, match="1 unexpected \\['stray.jpg'\\]"):
        _load(subset)


def test_corrupt_image_is_named(subset):
    victim = next((subset / "test").iterdir()).iterdir().__next__()
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DataError, match=f"{victim.name}: not a readable JPEG"):
        _load(subset, workers=2)
    assert not list((subset.parent / "cache").glob("test-*.npy"))  # no partial cache


def test_wrong_size_is_named(subset):
    victim = next((subset / "test").iterdir()).iterdir().__next__()
    Image.new("RGB", (80, 84)).save(victim, format="JPEG")
    with pytest.raises(DataError, match="80x84, expected 84x84"):
        _load(subset)


def test_missing_part_and_bad_arguments(subset):
    data = _load(subset)
    with pytest.raises(ValueError, match="part"):
        miniimagenet_split(data, "trainval")
    shutil.rmtree(subset / "test")
    with pytest.raises(DataError, match="test is missing"):
        _load(subset)


def test_missing_data_gives_the_layout_and_where_it_comes_from(tmp_path):
    with pytest.raises(DataError) as info:
        load_miniimagenet(tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    directory = tmp_path / "miniimagenet"
    assert f"{directory / 'train'} and {directory / 'test'} are missing" in message
    assert "train/<wnid>/*.jpg" in message and "splits/ravi/{train,val,test}.csv" in message
    assert "ImageNet" in message and "docs/experiments.md" in message and "\n" not in message
    typo = tmp_path / "typo"
    with pytest.raises(DataError, match=f"data directory {typo} does not exist"):
        load_miniimagenet(typo, cache_dir=tmp_path / "cache")
    assert not typo.exists() and not (tmp_path / "cache").exists()


def test_csv_with_another_checksum_is_refused(subset, monkeypatch):
    monkeypatch.setitem(miniimagenet.RAVI_SHA256, "train", "0" * 64)
    with pytest.raises(DataError, match="train.csv is corrupt"):
        _load(subset)
