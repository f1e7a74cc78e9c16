"""The driver of long runs (bilevel.app.driver) on a small stochastic steppable of its own:
resumed equals uninterrupted, a stop request writes a checkpoint, a divergence is recorded with
its reason, warnings are logged once; TensorBoard scalars equal the metrics lines. In process:
each test takes a second or two."""

import json
import os
import signal
import warnings

import pytest
import torch

from bilevel.app import checkpoints, driver
from bilevel.app.driver import Diverged, MovingAverage, Position, RunStopped
from bilevel.app.experiments import Experiment
from bilevel.app.experiments.config import ExperimentConfig
from tests.test_cli_runs import TINY, needs_mnist
from tests.test_fewshot import in_process

CONFIG = ExperimentConfig()
IDENTITY = {"experiment": "toy", "lr": 0.1}
TOTAL = 12


class NoisyDescent:
    """Gradient descent on |w - 1|^2 / 2 with seeded gradient noise: each step depends on the
    weights and on the generator's state, so a resume that lost either would drift."""

    def __init__(self, diverge_at=None, signal_at=None, signum=signal.SIGINT, times=1, warn=False):
        self.w = torch.zeros(3, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(0)
        self.steps = 0
        self.diverge_at, self.warn = diverge_at, warn
        self.signal_at, self.signum, self.times = signal_at, signum, times

    def step(self):
        self.steps += 1
        if self.steps == self.signal_at:  # Ctrl-C or a SIGTERM in the middle of this step
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        if self.warn:
            warnings.warn(f"inexact at step {self.steps}", RuntimeWarning, stacklevel=1)
        if self.steps == self.diverge_at:
            raise Diverged("the loss is inf")
        noise = torch.randn(3, generator=self.generator, dtype=torch.float64)
        self.w -= 0.1 * (self.w - 1 + 0.5 * noise)
        return {
            "kind": "train",
            "iteration": self.steps,
            "loss": float((self.w - 1).square().sum()),
        }

    def summary(self):
        return {"iterations": self.steps}

    def state_dict(self):
        return {"w": self.w.clone(), "rng": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state):
        self.w = state["w"].clone()
        self.generator.set_state(state["rng"])
        self.steps = state["steps"]


def toy(**behaviour) -> Experiment:
    """An experiment whose run is one loop of NoisyDescent, checkpointed every 4 steps."""

    def run(config, run, data_dir):
        task = NoisyDescent(**behaviour)
        position = Position()
        if run.resume is not None:
            saved = run.resume
            position = Position(saved["task"]["steps"], list(saved["lines"]), saved["task"])
            run.rewrite(position.lines)

        def save(at):
            run.checkpoint({"task": at.state, "lines": at.lines}, kept=f"step {at.step}")

        run.loop(task, TOTAL, name="toy", start=position, save=save, checkpoint_every=4)

    return Experiment("toy", "a toy", ExperimentConfig, {}, run, identity=lambda c: IDENTITY)


def lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "summary.json").read_text())


def execute(out, experiment=None, resume=None, **options):
    return driver.execute(experiment or toy(), CONFIG, out, None, True, resume=resume, **options)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run: its lines and final weights."""
    out = tmp_path_factory.mktemp("whole")
    assert execute(out) == "completed"
    assert summary(out)["stopped"] == "budget"
    return lines(out), checkpoints.load(out / "checkpoint.pt")["task"]["w"]


@pytest.mark.parametrize("at,signum", [(1, signal.SIGTERM), (4, signal.SIGINT),
                                       (6, signal.SIGTERM), (TOTAL, signal.SIGINT)])  # fmt: skip
def test_a_stop_request_checkpoints_the_step_and_the_resumed_run_is_the_uninterrupted_one(
    whole, tmp_path, at, signum
):
    out = tmp_path / "stopped"
    assert execute(out, toy(signal_at=at, signum=signum)) == "interrupted"
    state = checkpoints.load(out / "checkpoint.pt")
    assert state["task"]["steps"] == at  # the step in flight finished, then it was saved
    assert [x["iteration"] for x in lines(out)] == list(range(1, at + 1))
    assert summary(out)["status"] == "interrupted" and summary(out)["iterations"] == at
    assert summary(out)["stopped"] == (None if at < TOTAL else "budget")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert execute(out, resume=driver.read(out, IDENTITY)) == "completed"
    assert f"toy: resumed at step {at}" in (out / "run.log").read_text()
    assert lines(out) == whole[0]
    assert torch.equal(checkpoints.load(out / "checkpoint.pt")["task"]["w"], whole[1])


def test_a_second_sigint_stops_at_once_keeping_the_last_checkpoint(tmp_path):
    assert execute(tmp_path, toy(signal_at=6, times=2)) == "interrupted"
    assert checkpoints.load(tmp_path / "checkpoint.pt")["task"]["steps"] == 4
    assert [x["iteration"] for x in lines(tmp_path)] == list(range(1, 6))  # step 6 cut short


def test_a_checkpoint_of_another_identity_or_none_is_refused(tmp_path):
    execute(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="another configuration: lr=0.1 there"):
        driver.read(tmp_path, {**IDENTITY, "lr": 0.2})
    with pytest.raises(checkpoints.CheckpointError, match="--resume: no checkpoint.pt in"):
        driver.read(tmp_path / "elsewhere", IDENTITY)


def test_a_signal_outside_a_loop_interrupts_at_once(tmp_path):
    def run(config, run, data_dir):
        os.kill(os.getpid(), signal.SIGTERM)  # while preparing (data, a long evaluation)
        raise AssertionError("not reached: SIGTERM stops the run here")

    experiment = Experiment("toy", "a toy", ExperimentConfig, {}, run, identity=lambda c: IDENTITY)
    assert execute(tmp_path, experiment) == "interrupted"
    assert summary(tmp_path)["status"] == "interrupted"


def test_a_divergence_stops_with_its_reason_in_the_summary_and_the_log(tmp_path):
    with pytest.raises(RunStopped) as stop:
        execute(tmp_path, toy(diverge_at=7))
    line = str(stop.value)
    assert line == "diverged at step 7: the loss is inf; stopped (checkpoint.pt keeps step 4)"
    assert summary(tmp_path)["stopped"] == "diverged at step 7"
    assert summary(tmp_path)["status"] == "failed" and summary(tmp_path)["error"] == line
    assert f"failed: {line}" in (tmp_path / "run.log").read_text()
    assert checkpoints.load(tmp_path / "checkpoint.pt")["task"]["steps"] == 4  # the last good one


def test_warnings_of_a_step_are_logged_once_and_counted(tmp_path):
    execute(tmp_path, toy(warn=True))
    log = (tmp_path / "run.log").read_text()
    assert log.count("RuntimeWarning: inexact at step") == 1 and "inexact at step 1" in log
    assert f"toy: {TOTAL} RuntimeWarnings in all" in log


def test_the_moving_average_of_the_progress_bar_is_bias_corrected():
    average = MovingAverage(beta=0.9)
    assert average.add(80.0) == pytest.approx(80.0)  # uncorrected: 8.0
    assert average.add(60.0) == pytest.approx((0.9 * 0.1 * 80 + 0.1 * 60) / (1 - 0.9**2))
    for _ in range(200):
        average.add(50.0)
    assert average.value == pytest.approx(50.0)


def test_tensorboard_scalars_are_the_metrics_lines_and_a_resume_rewrites_them(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert execute(out, toy(signal_at=6), tensorboard=True) == "interrupted"
    execute(out, resume=driver.read(out, IDENTITY), tensorboard=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    scalars = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(x["iteration"], pytest.approx(x["loss"], rel=1e-6)) for x in lines(out)]
    assert scalars == expected  # each step once: the first start's events were replaced
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_a_run_without_tensorboard_writes_no_events(tmp_path):
    execute(tmp_path)
    assert not (tmp_path / "tensorboard").exists()


@needs_mnist
def test_the_tensorboard_flag_writes_an_experiments_metrics_lines(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = in_process("hyperclean", *TINY, "--out", tmp_path, "--tensorboard")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    written = lines(tmp_path)
    assert len(written) == 2 and {x["run"] for x in written} == {"R=100"}
    for key in ("outer_loss", "hypergradient_norm", "f1"):
        scalars = [(e.step, e.value) for e in events.Scalars(f"R=100/reverse/{key}")]
        assert scalars == [(x["iteration"], pytest.approx(x[key], rel=1e-6)) for x in written]
