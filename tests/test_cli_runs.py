"""A run's output directory: what a new run may replace, what a failure records, who may read it.

In process (click's CliRunner) on a tiny hyper-cleaning run: each test takes seconds.
"""

import json
import os
import shutil
from pathlib import Path

import matplotlib
import pytest

from bilevel.app import checkpoints, runs
from bilevel.app.experiments.fewshot import FewshotConfig
from tests.conftest import DATA, in_process, needs_mnist, one_line

matplotlib.use("Agg")

TINY = [
    "--preset", "quick", "--quiet", "--data-dir", DATA,
    "--set", "train=200", "--set", "validation=200", "--set", "test=200",
    "--set", "corrupted=100", "--set", "radii=[100]", "--set", "hyper_iterations=2",
    "--set", "inner_steps=5", "--set", "truncation=5", "--set", "retrain_steps=10",
    "--set", "compare_iterations=0",
]  # fmt: skip


def hyperclean(*args):
    return in_process("hyperclean", *TINY, *args)


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):  # a training run: the tests that use it are e2e
    out = tmp_path_factory.mktemp("finished") / "run"
    result = hyperclean("--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run, to be refused or replaced."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.mark.e2e
@needs_mnist
def test_auto_resume_with_another_configuration_leaves_the_run_untouched(copy, monkeypatch):
    before = contents(copy)
    monkeypatch.setenv(checkpoints.AUTO_RESUME, "auto")
    result = hyperclean("--set", "hyper_lr=0.1", "--out", copy)
    assert contents(copy) == before  # checked before any file was opened
    line = one_line(result, code=1)
    assert "another configuration: hyper_lr=0.05 there, 0.1 here" in line
    assert "--overwrite" in line


@pytest.mark.e2e
@needs_mnist
def test_auto_resume_with_the_same_configuration_continues_the_run(copy, monkeypatch):
    monkeypatch.setenv(checkpoints.AUTO_RESUME, "auto")
    lines = (copy / "metrics.jsonl").read_text()
    result = hyperclean("--out", copy)
    assert result.exit_code == 0, result.output
    assert "resumed: 2 stages finished" in (copy / "run.log").read_text()
    assert (copy / "metrics.jsonl").read_text() == lines


@pytest.mark.e2e
@needs_mnist
def test_a_new_run_into_a_finished_run_is_refused_unless_overwrite(copy):
    before = contents(copy)
    line = one_line(hyperclean("--set", "hyper_lr=0.1", "--out", copy), code=1)
    assert line == (
        f"--out {copy} already holds a completed run with its checkpoint: continue it with "
        "--resume or choose another --out; to replace it, add --overwrite"
    )
    assert contents(copy) == before
    both = in_process("hyperclean", *TINY, "--out", copy, "--resume", "--overwrite")
    assert both.exit_code == 2 and "--resume and --overwrite exclude each other" in both.output
    assert contents(copy) == before

    result = hyperclean("--set", "hyper_lr=0.1", "--out", copy, "--overwrite")
    assert result.exit_code == 0, result.output
    log = (copy / "run.log").read_text()
    assert log.count("start: hyperclean") == 1 and "resumed" not in log  # not mixed with the old
    assert json.loads((copy / "config.json").read_text())["config"]["hyper_lr"] == 0.1
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.e2e
@needs_mnist
def test_a_worker_that_torchrun_restarts_resumes_despite_overwrite(copy, monkeypatch):
    # its first attempt replaced the old run; the restart must continue the new one
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = hyperclean("--out", copy, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "resumed: 2 stages finished" in (copy / "run.log").read_text()


@pytest.mark.e2e
@needs_mnist
def test_an_unfinished_run_without_a_checkpoint_may_be_started_again(copy):
    # what a run killed before its first checkpoint leaves: nothing a new run would lose
    (copy / "checkpoint.pt").unlink()
    (copy / "summary.json").write_text(json.dumps({"status": "running"}))
    result = hyperclean("--out", copy)
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "summary.json").read_text())["status"] == "completed"


def test_a_second_test_of_a_run_is_refused_unless_overwrite(tmp_path):
    source = tmp_path / "trained"
    (source / "test").mkdir(parents=True)
    trained = {"experiment": "fewshot-train", "config": FewshotConfig().model_dump()}
    (source / "config.json").write_text(json.dumps(trained))
    (source / "test" / "summary.json").write_text(json.dumps({"status": "completed"}))
    result = in_process("fewshot", "test", source, "--quiet", "--data-dir", tmp_path)
    assert one_line(result, code=1) == (
        f"--out {source / 'test'} already holds a completed run: choose another --out; "
        "to replace it, add --overwrite"
    )
    assert [p.name for p in (source / "test").iterdir()] == ["summary.json"]
    into_itself = in_process("fewshot", "test", source, "--out", source, "--overwrite")
    assert into_itself.exit_code == 2 and "is the trained run" in into_itself.output
    assert (source / "config.json").is_file()


@needs_mnist
def test_a_failed_run_records_why_in_its_summary_and_log(tmp_path):
    data = tmp_path / "data" / "mnist"
    shutil.copytree(DATA / "mnist", data)
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not MNIST")
    out = tmp_path / "out"
    result = in_process("hyperclean", *TINY, "--data-dir", data.parent, "--out", out)
    message = one_line(result, code=1)
    assert "t10k-labels-idx1-ubyte.gz is corrupt" in message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == message
    assert f"failed: {message}" in (out / "run.log").read_text()


def umask_modes(write) -> dict[int, int]:
    """The mode of the file ``write(path)`` creates, under each of three umasks."""
    modes = {}
    for umask in (0o022, 0o077, 0o002):
        previous = os.umask(umask)
        try:
            path = write(umask)
        finally:
            os.umask(previous)
        modes[umask] = path.stat().st_mode & 0o777
    return modes


def test_written_files_respect_the_umask(tmp_path):
    import matplotlib.pyplot as plt

    def text(umask):
        runs.atomic_write(tmp_path / f"summary-{umask:o}.json", "{}")
        return tmp_path / f"summary-{umask:o}.json"

    def figure(umask):
        return runs.save_figure(plt.figure(), tmp_path / f"plot-{umask:o}.png")

    def checkpoint(umask):
        checkpoints.save(tmp_path / f"c-{umask:o}.pt", {"x": 1}, {})
        return tmp_path / f"c-{umask:o}.pt"

    expected = {umask: 0o666 & ~umask for umask in (0o022, 0o077, 0o002)}
    for write in (text, figure, checkpoint):
        assert umask_modes(write) == expected, write.__name__
    assert (tmp_path / "plot-22.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


@pytest.mark.e2e
@needs_mnist
def test_every_file_of_a_run_is_readable_as_the_umask_allows(finished):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in finished.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_a_mistyped_data_dir_is_named_and_not_created(tmp_path, monkeypatch):
    from bilevel.app.data import mnist

    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens there
    typo = tmp_path / "shared" / "dta"
    out = tmp_path / "out"
    result = hyperclean("--data-dir", typo, "--out", out)  # the last --data-dir counts
    line = one_line(result, code=1)
    assert line.startswith(f"data directory {typo} does not exist")
    assert "train-images-idx3-ubyte.gz is missing" in line and "could not download" not in line
    assert not typo.exists() and not typo.parent.exists()
    assert json.loads((out / "summary.json").read_text())["error"] == line
