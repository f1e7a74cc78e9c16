"""Data sets and the machinery to find, verify and fetch their files."""

from .episodes import ClassSet, DeviceEpisodeSampler, Episodes, EpisodeSampler
from .libsvm import load_libsvm, stand_in
from .miniimagenet import MiniImageNetData, load_miniimagenet, miniimagenet_split
from .mnist import Split, load_mnist
from .omniglot import OmniglotData, load_omniglot, omniglot_split
from .store import DataError, cache_root, data_root, download, ensure_file, sha256_file

__all__ = [
    "ClassSet",
    "DataError",
    "DeviceEpisodeSampler",
    "EpisodeSampler",
    "Episodes",
    "MiniImageNetData",
    "OmniglotData",
    "load_libsvm",
    "load_miniimagenet",
    "load_omniglot",
    "miniimagenet_split",
    "omniglot_split",
    "Split",
    "cache_root",
    "data_root",
    "download",
    "ensure_file",
    "load_mnist",
    "sha256_file",
    "stand_in",
]
