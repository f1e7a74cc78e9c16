"""Checkpoints: written whole, verified on load, bound to their configuration."""

import random

import numpy as np
import pytest
import torch

from bilevel.app import checkpoints
from bilevel.app.checkpoints import CheckpointError

CONFIG = {"ways": 5, "shots": 1, "inner_lr": 0.1}


def state():
    torch.manual_seed(0)
    return {
        "weights": {"w": torch.randn(3, 4), "steps": torch.tensor(7)},
        "iteration": 12,
        "sampler": {"rng": np.random.default_rng(3).bit_generator.state},
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "window": [[0.5, 1.0]],
        "stopped": None,
    }


def test_round_trip_restores_every_value(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, state(), CONFIG)
    loaded = checkpoints.load(path, CONFIG)
    expected = state()
    assert torch.equal(loaded["weights"]["w"], expected["weights"]["w"])
    assert (
        loaded["sampler"] == expected["sampler"] and loaded["python_rng"] == expected["python_rng"]
    )
    assert torch.equal(loaded["torch_rng"], expected["torch_rng"])
    assert loaded["iteration"] == 12 and loaded["window"] == [[0.5, 1.0]]
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded["sampler"]["rng"]
    assert rng.random() == np.random.default_rng(3).random()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_file_is_refused(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, state(), CONFIG)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        del data[-50:]
    else:
        data[:8] = b"PK\x03\x04xxxx"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|not a bilevel checkpoint"):
        checkpoints.load(path, CONFIG)


def test_another_configuration_is_refused_naming_the_setting(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, state(), CONFIG)
    with pytest.raises(CheckpointError, match=r"another configuration: shots=1 there, 5 here"):
        checkpoints.load(path, {**CONFIG, "shots": 5})
    assert checkpoints.load(path)["iteration"] == 12  # no config given: not checked


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, state(), CONFIG)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (whatever pickling raises)
        checkpoints.save(path, {"unpicklable": lambda: None}, CONFIG)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoints.load(tmp_path / "nothing.pt")
