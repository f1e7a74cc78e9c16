"""Trained representations as files: what ``bilevel fewshot test`` needs, and a manifest.

A weights file holds the network's state dict (float32, or float16 to halve it; the learned log
inner learning rate, if any, stays float32), the config that trained it, its mode and a few
numbers of its training (the iteration it comes from, its validation). It is written in the
checkpoint format (bilevel.app.checkpoints: a JSON header with the payload's sha256, then a
``torch.save``), so a damaged file is refused on load. A C4 network of the paper is about
0.45 MB in float32.

``weights/manifest.json`` lists the files of a folder: name, file, sha256, the run's
config.json, its training (iterations, time, hardware) and the table row the file reproduces
(``bilevel fewshot export`` writes both; :func:`verify_manifest` checks them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import checkpoints
from ...files import atomic_write
from ...runs import to_json
from ..config import ConfigError, resolve
from .config import FewshotConfig
from .identity import as_trained
from .learners import Learner
from .train import training_run

FORMAT = "bilevel-fewshot-weights v1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
PROGRESS = ("iteration", "best_accuracy", "best_ci95", "best_iteration")  # what a test reports


@dataclass(frozen=True)
class Weights:
    """A weights file read back: the training config (a dict, as in config.json), the mode
    ("bilevel" or "classical"), the learner's state without a classifier, and its progress."""

    config: dict
    mode: str
    state: dict
    progress: dict


def network_state(learner_state: dict) -> dict:
    """What a test loads of a learner's state: all but the classical classifier."""
    return {k: v for k, v in learner_state.items() if not k.startswith("classifier.")}


def save_weights(
    path: str | Path,
    learner_state: dict,
    config: dict,
    mode: str,
    progress: dict,
    dtype: str = "float32",
) -> Path:
    """Write a weights file (atomically) and return its path.

    Args:
        learner_state: a Learner's state dict (a checkpoint's "learner"); a classifier is
            left out.
        config: the training config as config.json holds it.
        mode: "bilevel" or "classical".
        progress: the checkpoint's progress (its iteration and best validation are kept).
        dtype: "float32" or "float16", the network's floating tensors in the file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    state = {
        k: v.to(DTYPES[dtype]) if k.startswith("net.") and v.is_floating_point() else v
        for k, v in network_state(learner_state).items()
    }
    payload = {
        "format": FORMAT,
        "mode": mode,
        "config": dict(config),
        "progress": {k: progress.get(k) for k in PROGRESS},
        "weights": state,
    }
    checkpoints.save(path, payload, {"format": FORMAT, "mode": mode, **config})
    return Path(path)


def read_weights(path: str | Path) -> Weights:
    """The weights file at ``path``, its payload checked against its sha256; raises
    CheckpointError for a damaged file or one that is not a weights file."""
    payload = checkpoints.load(path)
    if payload.get("format") != FORMAT:
        what = "a training checkpoint" if "learner" in payload else "not a weights file"
        raise checkpoints.CheckpointError(
            f"{path} is {what}: test a training run by its directory, or export its network "
            "with `bilevel fewshot export RUN --name NAME`"
        )
    return Weights(payload["config"], payload["mode"], payload["weights"], payload["progress"])


def trained_config(settings: dict) -> FewshotConfig:
    """A saved training config, validated here: on the CPU when it was trained on a GPU that
    this machine lacks (the device is a test setting, not part of a network's identity)."""
    try:
        return resolve(FewshotConfig, {"run": settings}, "run", device="cpu")
    except ConfigError as error:
        raise checkpoints.CheckpointError(f"its config is not a few-shot config: {error}") from None


def load_learner(path: str | Path, config: FewshotConfig) -> tuple[Learner, dict]:
    """(the Learner of the weights file ``path`` under the test ``config``, its progress).

    ``config`` must agree with the file's config in every setting but the test and episode
    settings; raises CheckpointError naming those that differ, or when the network does not fit.
    """
    saved = read_weights(path)
    mine = as_trained(config, saved.config).hashed()
    theirs = as_trained(trained_config(saved.config), saved.config).hashed()
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ[:5])
        raise checkpoints.CheckpointError(f"weights file {path} was trained otherwise: {shown}")
    learner = Learner(config)
    try:
        learner.load_state_dict(saved.state)
    except RuntimeError as error:
        first = str(error).splitlines()[-1].strip()
        raise checkpoints.CheckpointError(
            f"weights file {path}: its network does not fit model={config.model!r} "
            f"width={config.width} ({first})"
        ) from None
    return learner, saved.progress


# --- the manifest ---------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict:
    """``directory``'s manifest.json ({"weights": [entries]}); an empty one where it is absent."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {"weights": []}
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["weights"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise checkpoints.CheckpointError(
            f'{path} is not a weights manifest (a JSON object with a list "weights")'
        ) from None
    return manifest


def record(directory: str | Path, entry: dict) -> Path:
    """Add ``entry`` to ``directory``'s manifest (replacing the entry of the same name), written
    whole; returns the manifest's path."""
    manifest = read_manifest(directory)
    manifest["weights"] = [e for e in manifest["weights"] if e.get("name") != entry["name"]]
    manifest["weights"].append(entry)
    manifest["weights"].sort(key=lambda e: e["name"])
    return atomic_write(Path(directory) / MANIFEST, to_json(manifest))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_manifest(directory: str | Path) -> list[str]:
    """Check every entry of ``directory``'s manifest: its file is there with the sha256 listed,
    holds the config of the run listed (its training settings), and loads into that config's
    network. Returns the names checked; raises CheckpointError naming the first entry at fault."""
    directory = Path(directory)
    names = []
    for entry in read_manifest(directory)["weights"]:
        name = entry.get("name", "(unnamed)")
        try:
            _verify(directory, entry)
        except (checkpoints.CheckpointError, KeyError, TypeError) as error:
            detail = f"no {error} in the entry" if isinstance(error, KeyError) else error
            raise checkpoints.CheckpointError(f"{directory / MANIFEST}: {name}: {detail}") from None
        names.append(name)
    return names


def _verify(directory: Path, entry: dict) -> None:
    path = directory / entry["file"]
    if not path.is_file():
        raise checkpoints.CheckpointError(f"no file {path}")
    if sha256(path) != entry["sha256"]:
        raise checkpoints.CheckpointError(f"{path} does not match the sha256 listed")
    saved = read_weights(path)
    listed = trained_config(entry["run_config"]["config"])
    config = trained_config(saved.config)
    if listed.hashed() != config.hashed() or entry["mode"] != saved.mode:
        raise checkpoints.CheckpointError(f"{path} holds another run's network than listed")
    load_learner(path, config)


def resolve_test_source(source: str | Path, weights_dir: str | Path) -> tuple[Path, dict, str]:
    """What ``bilevel fewshot test SOURCE`` tests: (path, training config, mode) of a training
    run directory, a weights file, or a name in ``weights_dir``'s manifest."""
    path = Path(source)
    if path.is_dir():
        trained, mode = training_run(path)
        return path, trained, mode
    if not path.exists():
        path = _listed(str(source), Path(weights_dir))
    saved = read_weights(path)
    return path, saved.config, saved.mode


def _listed(name: str, directory: Path) -> Path:
    entries = {e.get("name"): e for e in read_manifest(directory)["weights"]}
    if name not in entries:
        names = ", ".join(sorted(map(str, entries))) or "it lists none"
        raise checkpoints.CheckpointError(
            f"{name}: not a run directory, a weights file or a name in "
            f"{directory / MANIFEST} ({names})"
        )
    return directory / entries[name]["file"]
