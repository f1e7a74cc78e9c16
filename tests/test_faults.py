"""Faults: processes killed outright (SIGKILL), torchrun's restarts, diverging runs."""

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from bilevel.app import checkpoints
from bilevel.app.experiments.fewshot.train import CHECKPOINT
from tests.conftest import in_process, metrics, needs_omniglot, start_bilevel, start_torchrun
from tests.test_fewshot import TINY

pytestmark = [needs_omniglot, pytest.mark.e2e]  # trainings, killed, restarted by torchrun
SETTINGS = [*TINY, "--set", "iterations=16", "--set", "validate_every=4",
            "--set", "checkpoint_every=2"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    result = in_process("fewshot", "train", *SETTINGS, "--out", out)
    assert result.exit_code == 0, result.output
    return metrics(out)


def start(out, *extra):
    return start_bilevel("fewshot", "train", *SETTINGS, "--out", out, *extra)


def test_killed_at_random_moments_and_resumed_gives_the_uninterrupted_numbers(
    uninterrupted, tmp_path
):
    out, seed = tmp_path / "killed", random.randrange(2**32)
    rng = random.Random(seed)  # a failure names its seed
    kills = 0
    for attempt in range(3):  # killed twice at random moments, then left to finish
        resume = (out / CHECKPOINT).is_file()
        process = start(out, *(["--resume"] if resume else []))
        if attempt == 2:
            break
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").stat().st_size:
            assert time.time() < deadline and process.poll() is None, (seed, process.stderr.read())
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # then at any point of training, writes included
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=60)
        if (out / CHECKPOINT).is_file():  # what a killed run leaves is whole and verified
            state = checkpoints.load(out / CHECKPOINT)
            assert 0 < state["progress"]["iteration"] <= 16, seed
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, (seed, stderr)
    assert kills >= 1, seed  # at least one real kill happened before the run ended
    assert metrics(out) == uninterrupted, seed
    assert not list(out.glob(".*.tmp")), seed  # partial files of killed writes are cleared
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def test_torchrun_restarts_a_killed_worker_from_its_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "elastic"
    agent = start_torchrun("fewshot", "train", *SETTINGS, "--out", out, restarts=1)
    deadline = time.time() + 90
    while not (out / CHECKPOINT).is_file():
        assert time.time() < deadline and agent.poll() is None, agent.stderr.read()
        time.sleep(0.01)
    (worker,) = worker_pids(agent.pid)
    os.kill(worker, signal.SIGKILL)
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode == 0, stderr
    assert "resumed at iteration" in (out / "run.log").read_text()  # not started over
    assert metrics(out) == uninterrupted


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # an inner learning rate of 1e36 overflows the query loss of the fourth meta-batch
    out = tmp_path / "diverging"
    result = in_process("fewshot", "train", *SETTINGS, "--set", "inner_lr=1e36",
                        "--set", "checkpoint_every=1", "--out", out)  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "the outer (query) loss is inf" in message, message
    at = int(message.split("diverged at iteration ")[1].split(":")[0])
    assert at > 1 and f"checkpoint.pt keeps iteration {at - 1}" in message, message
    state = checkpoints.load(out / CHECKPOINT)
    assert state["progress"]["iteration"] == at - 1
    assert all(torch.isfinite(v).all() for v in state["learner"].values() if v.is_floating_point())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stopped"] == f"diverged at iteration {at}"
    # resuming repeats the diverging iteration: the same clear stop, the checkpoint untouched
    before = (out / CHECKPOINT).read_bytes()
    result = in_process("fewshot", "train", *SETTINGS, "--set", "inner_lr=1e36",
                        "--set", "checkpoint_every=1", "--out", out, "--resume")  # fmt: skip
    assert result.exit_code == 1 and f"diverged at iteration {at}" in result.output
    assert (out / CHECKPOINT).read_bytes() == before
