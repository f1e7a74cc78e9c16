"""``bilevel fewshot export``: a training run's network as a weights file, with the row it gives.

The run's best network (its last checkpoint if it never validated) is written to
``WEIGHTS_DIR/NAME.pt``; the file is then tested as ``bilevel fewshot test NAME`` tests it (on
this machine, its seeded episodes), in each cell asked for, and the manifest gets the entry:
the file's sha256, the run's config.json, its training and the measured row. The file's config
is the run's with the test settings of that row (``test_episodes``, ``device=cpu``), so
``bilevel fewshot test NAME [--set ways=.. --set shots=..]`` reproduces it.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ... import checkpoints
from ...files import atomic_write
from ..common import seed_everything
from ..config import ConfigError, resolve
from .compare import validation_curve
from .config import FewshotTestConfig
from .data import class_sets
from .evaluation import accuracy_by_steps
from .identity import as_trained, load_checkpoint
from .train import BEST, CHECKPOINT, best_so_far, training_run
from .weights import load_learner, read_manifest, record, save_weights, sha256, trained_config

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CELL = re.compile(r"(\d+)w(\d+)s")


def parse_cell(text: str) -> tuple[int, int]:
    """The (ways, shots) of a test cell written as "20w1s"."""
    match = CELL.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"--cell {text!r}: expected WAYSwSHOTSs, e.g. 5w1s or 20w5s")
    return int(match[1]), int(match[2])


def export_run(
    run_dir: str | Path,
    name: str,
    hardware: str,
    weights_dir: str | Path = "weights",
    *,
    dtype: str = "float32",
    cells: list[tuple[int, int]] | None = None,
    episodes: int = 600,
    data_dir: Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], object] = print,
) -> dict:
    """Export the network of training run ``run_dir`` as ``weights_dir/name.pt``, test it, and
    list it in the manifest; returns the manifest entry.

    Args:
        name: the weights' name (letters, digits, ``.``, ``_``, ``-``).
        hardware: what trained the run, in words (the run does not record it).
        dtype: "float32" or "float16", the network's tensors in the file.
        cells: (ways, shots) of each test; default the cell the run was trained on.
        episodes: test episodes per cell (seeded by the run's test_seed).
        data_dir: data sets root, as for ``fewshot test``.
        overwrite: replace a file or entry of the same name.
        log: called with a line per measured cell.
    """
    weights_dir, run_dir = Path(weights_dir), Path(run_dir)
    target = _target(weights_dir, name, overwrite)
    if not hardware.strip():
        raise ValueError("--hardware: say what trained the run (e.g. '1 NVIDIA H200')")
    if episodes < 2:
        raise ValueError(f"--episodes {episodes}: at least 2 (a 95% interval needs two)")
    trained, mode = training_run(run_dir)
    config = trained_config(trained)
    path = run_dir / BEST if (run_dir / BEST).is_file() else run_dir / CHECKPOINT
    state = load_checkpoint(path, as_trained(config, trained), mode)
    settings = {**trained, "test_episodes": episodes, "device": "cpu"}
    with tempfile.TemporaryDirectory() as scratch:  # measured on the file, then put in place
        written = save_weights(Path(scratch) / target.name, state["learner"], settings, mode,
                               state["progress"], dtype)  # fmt: skip
        row = _measure(written, settings, cells or [(config.ways, config.shots)], data_dir, log)
        digest, data = sha256(written), written.read_bytes()
    atomic_write(target, data)
    entry = {
        "name": name,
        "file": target.name,
        "sha256": digest,
        "bytes": len(data),
        "dtype": dtype,
        "mode": mode,
        "run_config": json.loads((run_dir / "config.json").read_text()),
        "training": _training(run_dir, state["progress"], hardware),
        "row": row,
        "measured_on": f"{_machine()}; torch threads: {torch.get_num_threads()}",
        "test": f"bilevel fewshot test {name}" + " (--set ways=N --set shots=K for another cell)",
    }
    record(weights_dir, entry)
    return entry


def _target(weights_dir: Path, name: str, overwrite: bool) -> Path:
    if NAME.fullmatch(name) is None:
        raise ValueError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    target = weights_dir / f"{name}.pt"
    listed = any(e.get("name") == name for e in read_manifest(weights_dir)["weights"])
    if (target.exists() or listed) and not overwrite:
        raise ValueError(f"--name {name}: {target} exists or is listed; add --overwrite")
    return target


def _measure(path: Path, settings: dict, cells, data_dir, log) -> list[dict]:
    """The test row of the weights file ``path``: one result per (ways, shots) cell."""
    row, test = [], None
    for ways, shots in cells:
        try:  # as `fewshot test NAME --set ways=.. --set shots=..` resolves it
            config = resolve(FewshotTestConfig, {"run": settings}, "run", ways=ways, shots=shots)
        except ConfigError as error:
            raise ValueError(f"--cell {ways}w{shots}s: {error}") from None
        seed_everything(config.seed)
        learner, _ = load_learner(path, config)
        if test is None:  # the test classes are the same for every cell
            test = class_sets(config, data_dir, ("test",))["test"]
        began = time.perf_counter()
        by_steps = accuracy_by_steps(config, learner, test)
        main = next(r for r in by_steps if r["steps"] == config.inner_steps)
        row.append(
            {
                "ways": ways,
                "shots": shots,
                "queries": config.queries,
                "steps": config.inner_steps,
                "accuracy": main["accuracy"],
                "ci95": main["ci95"],
                "episodes": config.test_episodes,
                "test_seed": config.test_seed,
                "test_classes": len(test),
                "batch_norm": config.test_batch_norm,
                "by_steps": by_steps,
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
        log(f"{ways}-way {shots}-shot: {main['accuracy']:.2f} ± {main['ci95']:.2f}%")
    return row


def _training(run_dir: Path, progress: dict, hardware: str) -> dict:
    """What the run's files say of its training, and ``hardware``."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    try:
        curve = validation_curve(run_dir)
        at = curve.iterations.index(progress["iteration"])
        seconds = round(60 * curve.minutes[at], 1)
    except (ValueError, checkpoints.CheckpointError):  # never validated, or not at this one
        seconds = None
    return {
        "iterations": summary.get("iterations"),
        "network_iteration": progress["iteration"],
        "best_val_accuracy": best_so_far(progress)["best_val_accuracy"],
        "best_val_ci95": best_so_far(progress)["best_val_ci95"],
        "stopped": summary.get("stopped"),
        # wall time the run recorded for its iterations and validations up to this network
        "recorded_seconds_to_network": seconds,
        "wall_seconds_of_last_session": summary.get("wall_seconds"),  # summary.json's
        "hardware": hardware,
    }


def _machine() -> str:
    from ...bench.cli import machine

    return machine()
