"""Data sets and the machinery to find, verify and fetch their files."""

from .mnist import Split, load_mnist
from .store import DataError, cache_root, data_root, download, ensure_file, sha256_file

__all__ = [
    "DataError",
    "Split",
    "cache_root",
    "data_root",
    "download",
    "ensure_file",
    "load_mnist",
    "sha256_file",
]
