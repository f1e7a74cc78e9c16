"""The hyperparameter experiments in stages: killed and resumed, and under torchrun.

Real processes are killed with SIGKILL at random moments; the resumed run must give the numbers
of the uninterrupted one (times aside), and 2 processes those of one.
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bilevel.app import checkpoints
from tests.conftest import DATA, in_process, needs, start_bilevel, start_torchrun

TIMES = {"seconds", "elapsed", "cpu", "seconds_per_iteration", "cpu_seconds", "wall_seconds"}

RUNS = {
    "hyperclean": ["--set", "hyper_iterations=16", "--set", "radii=[300,500]",
                   "--set", "compare_iterations=2", "--set", "retrain_steps=100"],
    "convergence": ["--set", "hyper_iterations=16", "--set", "horizons=[1,5]"],
    "hparams": ["--set", "train=500", "--set", "validation=300", "--set", "test=500",
                "--set", "hidden=32", "--set", "inner_steps=10", "--set", "hyper_iterations=16",
                "--set", "every=5", "--set", "curve_points=2", "--set", "random_search=false"],
}  # fmt: skip
NEEDS = {"hyperclean": "mnist", "convergence": "omniglot", "hparams": "mnist"}


def command(experiment: str, out: Path, *extra) -> list[str]:
    settings = ["--preset", "quick", "--quiet", "--set", "checkpoint_every=2", *RUNS[experiment]]
    return [experiment, *settings, "--data-dir", str(DATA), "--out", str(out), *map(str, extra)]


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def outcome(out: Path) -> tuple[list, dict]:
    """The metrics lines and the summary, without the times."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return untimed(lines), untimed(json.loads((out / "summary.json").read_text()))


def needs_data(experiment: str) -> list[pytest.MarkDecorator]:
    """Skip without the experiment's data set; an end-to-end test (processes killed, resumed)."""
    return [needs(NEEDS[experiment]), pytest.mark.e2e]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    done = {}

    def get(experiment: str):
        if experiment not in done:
            out = tmp_path_factory.mktemp(experiment) / "uninterrupted"
            process = start_bilevel(*command(experiment, out))
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr
            done[experiment] = outcome(out)
        return done[experiment]

    return get


def written_at(path: Path) -> int:
    return path.stat().st_mtime_ns if path.is_file() else 0


def wait_for(path: Path, process: subprocess.Popen, after: int = 0, seconds: float = 120) -> None:
    """Until ``path`` is written (again: later than ``after``, a st_mtime_ns)."""
    deadline = time.time() + seconds
    while written_at(path) <= after:
        assert time.time() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.01)


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=needs_data(e)) for e in RUNS])
def test_killed_at_random_moments_and_resumed_gives_the_uninterrupted_numbers(
    experiment, uninterrupted, tmp_path
):
    out, seed = tmp_path / "killed", random.randrange(2**32)
    rng, kills = random.Random(seed), 0  # a failure names its seed
    for attempt in range(3):  # killed twice after a checkpoint, at a random moment; then left
        resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
        before = written_at(out / "checkpoint.pt")
        process = start_bilevel(*command(experiment, out, *resume))
        if attempt == 2:
            break
        wait_for(out / "checkpoint.pt", process, after=before)  # this attempt's own checkpoint
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=60)
        checkpoints.load(out / "checkpoint.pt")  # what a killed run leaves is whole and verified
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, (seed, stderr)
    assert kills >= 1, seed
    assert "resumed:" in (out / "run.log").read_text(), seed
    assert outcome(out) == uninterrupted(experiment), seed


@pytest.mark.e2e
@needs(NEEDS["hyperclean"])
def test_torchrun_deals_the_stages_to_two_processes_and_restarts_them_after_a_kill(
    uninterrupted, tmp_path
):
    out = tmp_path / "two"
    agent = start_torchrun(*command("hyperclean", out), processes=2, restarts=1)
    try:
        wait_for(out / "checkpoint.pt", agent)  # the baselines' round is done
        workers = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        os.kill(int(random.choice(workers)), signal.SIGKILL)
        _, stderr = agent.communicate(timeout=600)
    finally:
        if agent.poll() is None:  # a failed test leaves no processes behind
            agent.kill()
            agent.communicate()
    assert agent.returncode == 0, stderr
    assert "resumed: " in (out / "run.log").read_text()  # the restart did not start over
    assert outcome(out) == uninterrupted("hyperclean")


@pytest.mark.e2e
@needs(NEEDS["hyperclean"])
def test_resuming_from_another_configuration_or_without_a_checkpoint_is_one_clear_line(tmp_path):
    out = tmp_path / "run"
    process = start_bilevel(*command("hyperclean", out, "--resume"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.strip() == f"Error: --resume: no checkpoint.pt in {out}"
    process = start_bilevel(*command("hyperclean", out), "--set", "hyper_iterations=3")
    assert process.wait(timeout=300) == 0
    process = start_bilevel(*command("hyperclean", out, "--resume"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "another configuration: hyper_iterations=3 there, 16 here" in stderr


@pytest.mark.e2e
@needs(NEEDS["hyperclean"])
def test_a_diverging_stage_stops_with_one_line_and_keeps_the_finished_stages(tmp_path):
    # an inner learning rate of 1e5 leaves the unrolled stages finite (and useless) but makes
    # the implicit hypergradient infinite
    out = tmp_path / "diverging"
    settings = ["--set", "inner_lr=1e5", "--set", "compare_methods=[reverse,implicit-cg]"]
    process = start_bilevel(*command("hyperclean", out), *settings)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "compare implicit-cg: the hypergradient of 'weights' is NaN or infinite" in stderr
    assert "checkpoint.pt keeps the stages finished before: baselines, R=300, R=500" in stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    state = checkpoints.load(out / "checkpoint.pt")
    assert list(state["finished"]) == ["baselines", "R=300", "R=500", "compare reverse"]
    before = (out / "checkpoint.pt").read_bytes()
    process = start_bilevel(*command("hyperclean", out, "--resume"), *settings)
    _, again = process.communicate(timeout=300)
    assert process.returncode == 1 and again == stderr  # the same stop; the checkpoint kept
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("experiment", sorted(RUNS))
def test_resume_without_an_output_directory_is_a_usage_error(experiment):
    result = in_process(experiment, "--preset", "quick", "--resume")
    assert result.exit_code == 2 and "--resume needs --out" in result.output
