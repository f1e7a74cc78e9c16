"""MNIST from the canonical files: contents, integrity checks, a download from a local mirror."""

import functools
import gzip
import shutil
import socket
import struct
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from tests.conftest import DATA

from bilevel.app.data import mnist
from bilevel.app.data.mnist import (
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    load_mnist,
    mnist_dir,
    read_idx,
)
from bilevel.app.data.store import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
NAMES = [name for pair in FILES.values() for name, _ in pair]


def _source_dir() -> Path:
    """The shared copy of MNIST (under tests.conftest.DATA)."""
    directory = mnist_dir(DATA)
    if not all((directory / name).is_file() for name in NAMES):
        pytest.skip(f"MNIST files not found in {directory}")
    return directory


@pytest.fixture(scope="module")
def source():
    return _source_dir()


@pytest.fixture(scope="module")
def data(source):
    return load_mnist(source, download=False)


def _copy(source, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        shutil.copyfile(source / name, dest / name)
    return dest


def test_shapes_and_dtypes(data):
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = data[split]
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64


def test_known_contents(data):
    train, test = data["train"], data["test"]
    assert train.labels.bincount().tolist() == TRAIN_COUNTS
    assert test.labels.bincount().tolist() == TEST_COUNTS
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert train.images.float().mean().item() == pytest.approx(33.3184, abs=1e-3)
    assert test.images.float().mean().item() == pytest.approx(33.7912, abs=1e-3)
    assert train.images.min() == 0 and train.images.max() == 255


def test_data_dir_may_be_the_root_of_all_data_sets(source):
    assert mnist_dir(source) == source
    assert mnist_dir(source.parent) == source.parent / "mnist"


def test_corrupt_file_is_refused(source, tmp_path):
    directory = _copy(source, tmp_path / "mnist")
    victim = directory / "train-labels-idx1-ubyte.gz"
    raw = bytearray(victim.read_bytes())
    raw[1000] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is corrupt") as info:
        load_mnist(tmp_path)
    assert dict(FILES["train"])[victim.name] in str(info.value)
    assert victim.read_bytes() == bytes(raw)  # the user's file is left for them to inspect


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match="downloading is disabled") as info:
        load_mnist(tmp_path, download=False)
    assert str(tmp_path / "mnist") in str(info.value)


def test_a_data_directory_that_does_not_exist_is_named_not_created(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens there
    monkeypatch.delenv("BILEVEL_OFFLINE", raising=False)
    typo = tmp_path / "dta"
    with pytest.raises(DataError) as info:
        load_mnist(typo)
    message = str(info.value)
    assert message.startswith(f"data directory {typo} does not exist")
    assert all(name in message for name in NAMES) and "could not download" not in message
    monkeypatch.setenv("BILEVEL_DATA", str(typo))  # the same for the environment's directory
    with pytest.raises(DataError, match=f"data directory {typo} does not exist"):
        load_mnist()
    assert not typo.exists()


def test_every_missing_file_is_named_with_where_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_OFFLINE", "1")
    (tmp_path / "mnist").mkdir()
    shutil.copy(_source_dir() / NAMES[1], tmp_path / "mnist")
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "downloading is disabled (BILEVEL_OFFLINE is set)" in message
    assert [name in message for name in NAMES] == [True, False, True, True]
    assert mnist.MIRRORS[0] in message and str(tmp_path / "mnist") in message


def _idx(path: Path, magic: int, dims, body: bytes) -> Path:
    path.write_bytes(gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + body))
    return path


def test_read_idx_checks_magic_and_size(tmp_path):
    good = _idx(tmp_path / "ok.gz", LABELS_MAGIC, [3], b"\x01\x02\x03")
    assert read_idx(good, LABELS_MAGIC).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="magic"):
        read_idx(good, IMAGES_MAGIC)
    with pytest.raises(DataError, match="does not match header"):
        read_idx(_idx(tmp_path / "short.gz", LABELS_MAGIC, [4], b"\x01\x02\x03"), LABELS_MAGIC)
    with pytest.raises(DataError, match="does not match header"):
        read_idx(_idx(tmp_path / "long.gz", LABELS_MAGIC, [2], b"\x01\x02\x03"), LABELS_MAGIC)
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(good.read_bytes()[:-6])
    with pytest.raises(DataError, match="unreadable gzip"):
        read_idx(truncated, LABELS_MAGIC)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_mirror(source):
    """The shared MNIST directory served over HTTP on 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(source))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    kwargs = {"poll_interval": 0.01}
    threading.Thread(target=server.serve_forever, kwargs=kwargs, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_end_to_end(local_mirror, data, monkeypatch, tmp_path):
    with socket.socket() as s:  # a mirror that refuses connections comes first
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setattr(mnist, "MIRRORS", (dead, local_mirror))
    loaded = load_mnist(data_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(NAMES)
    for split in ("train", "test"):
        assert torch.equal(loaded[split].labels, data[split].labels)
        assert torch.equal(loaded[split].images, data[split].images)
    load_mnist(data_dir=tmp_path, download=False)  # now present and verified offline
