"""Trained representations as files: weights/manifest.json, `fewshot export`, testing a file."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bilevel.app import checkpoints
from bilevel.app.experiments.fewshot import FewshotConfig
from bilevel.app.experiments.fewshot.learners import Learner
from bilevel.app.experiments.fewshot.weights import (
    MANIFEST,
    read_manifest,
    read_weights,
    save_weights,
    verify_manifest,
)
from tests.conftest import DATA, in_process, needs_omniglot
from tests.test_fewshot import as_before_val_batch_norm, train

ROOT = Path(__file__).resolve().parents[1]
EPISODES = 40  # per cell of the exported row: enough to tell networks apart, fast


def test_every_weights_file_of_the_repository_matches_its_manifest_entry():
    # passes with no manifest or an empty one too: what is listed must check out
    names = verify_manifest(ROOT / "weights")
    listed = read_manifest(ROOT / "weights")["weights"]
    assert names == [e["name"] for e in listed]
    for entry in listed:
        assert entry["bytes"] == (ROOT / "weights" / entry["file"]).stat().st_size < 2**20
        assert entry["row"] and all(0 < c["ci95"] < c["accuracy"] <= 100 for c in entry["row"])
        assert entry["training"]["hardware"] and entry["training"]["network_iteration"] > 0


def test_an_absent_or_empty_manifest_lists_nothing(tmp_path):
    assert verify_manifest(tmp_path) == []
    (tmp_path / MANIFEST).write_text('{"weights": []}')
    assert verify_manifest(tmp_path) == []
    (tmp_path / MANIFEST).write_text('{"weights": {}}')
    with pytest.raises(
        checkpoints.CheckpointError, match='not a weights manifest .* list "weights"'
    ):
        verify_manifest(tmp_path)


@pytest.mark.parametrize("dtype,limit", [("float32", 470_000), ("float16", 240_000)])
def test_a_paper_network_file_is_under_half_a_megabyte_and_loads_back(tmp_path, dtype, limit):
    torch.manual_seed(0)
    config = FewshotConfig()  # the paper's Omniglot C4 network, 111,936 parameters
    learner = Learner(config)
    path = save_weights(tmp_path / "c4.pt", learner.state_dict(), config.model_dump(), "bilevel",
                        {"iteration": 7}, dtype)  # fmt: skip
    assert path.stat().st_size < limit
    saved = read_weights(path)
    assert saved.config == config.model_dump() and saved.progress["iteration"] == 7
    loaded = Learner(config)
    loaded.load_state_dict(saved.state)
    for (name, a), b in zip(learner.state_dict().items(), loaded.state_dict().values()):
        tolerance = 0 if dtype == "float32" else 1e-3 * float(a.abs().max()) + 1e-7
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=tolerance), name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run exported with a two-cell row: (run, weights folder, manifest entry)."""
    root = tmp_path_factory.mktemp("weights")
    run = train(root / "run", "--set", "iterations=20", "--set", "learn_inner_lr=true")
    result = export(run, "tiny", root / "weights", "--cell", "5w1s", "--cell", "3w2s")
    assert result.exit_code == 0, result.output
    entry = json.loads((root / "weights" / MANIFEST).read_text())["weights"][0]
    return run, root / "weights", entry


def export(run, name, weights, *extra):
    return in_process("fewshot", "export", run, "--name", name, "--hardware", "this test's CPU",
                      "--weights-dir", weights, "--episodes", EPISODES, "--data-dir", DATA,
                      *extra)  # fmt: skip


def summary_of_test(*args):
    """The summary of `fewshot test` run on ``args``."""
    out = Path(args[-1])
    result = in_process("fewshot", "test", *args[:-1], "--data-dir", DATA, "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.e2e
@needs_omniglot
def test_export_lists_the_file_with_its_run_training_and_row(exported):
    run, weights, entry = exported
    assert verify_manifest(weights) == ["tiny"]
    assert entry["file"] == "tiny.pt" and entry["bytes"] == (weights / "tiny.pt").stat().st_size
    assert entry["run_config"] == json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    training = entry["training"]
    assert training["iterations"] == 20 and training["hardware"] == "this test's CPU"
    assert training["network_iteration"] == summary["best_iteration"] == 20
    assert training["best_val_accuracy"] == summary["best_val_accuracy"]
    assert 0 < training["recorded_seconds_to_network"] <= training["wall_seconds_of_last_session"]
    cells = [(c["ways"], c["shots"], c["episodes"], c["steps"]) for c in entry["row"]]
    assert cells == [(5, 1, EPISODES, 5), (3, 2, EPISODES, 5)]
    assert all(0 < c["ci95"] < c["accuracy"] <= 100 for c in entry["row"])


@pytest.mark.e2e
@needs_omniglot
def test_the_file_by_name_or_path_reproduces_its_row_and_the_run(exported, tmp_path):
    run, weights, entry = exported
    first, second = entry["row"]
    by_name = summary_of_test("tiny", "--weights-dir", weights, tmp_path / "name")
    assert (by_name["accuracy"], by_name["ci95"]) == (first["accuracy"], first["ci95"])
    assert by_name["episodes"] == EPISODES and by_name["by_steps"] == first["by_steps"]
    other_cell = summary_of_test(
        weights / "tiny.pt", "--set", "ways=3", "--set", "shots=2", tmp_path / "c"
    )
    assert (other_cell["accuracy"], other_cell["ci95"]) == (second["accuracy"], second["ci95"])
    assert other_cell["checkpoint"] == str(weights / "tiny.pt")
    # the file holds the run's best network (float32): the run itself gives the same numbers
    of_run = summary_of_test(run, "--set", f"test_episodes={EPISODES}", tmp_path / "run")
    assert (of_run["accuracy"], of_run["ci95"]) == (first["accuracy"], first["ci95"])
    assert of_run["inner_lr"] == by_name["inner_lr"] != 0.1  # the learned lr came along
    separate = summary_of_test(
        "tiny", "--weights-dir", weights, "--set", "test_batch_norm=separate", tmp_path / "sep"
    )
    assert separate["batch_norm"] == "separate"


@pytest.mark.e2e
@needs_omniglot
def test_a_damaged_or_misdescribed_file_fails_the_manifest_check(exported, tmp_path):
    _, weights, entry = exported
    copy = tmp_path / "weights"
    shutil.copytree(weights, copy)
    data = bytearray((copy / "tiny.pt").read_bytes())
    data[-5] ^= 0xFF
    (copy / "tiny.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointError, match="tiny: .*does not match the sha256"):
        verify_manifest(copy)
    shutil.copy(weights / "tiny.pt", copy / "tiny.pt")
    listed = json.loads((copy / MANIFEST).read_text())
    listed["weights"][0]["run_config"]["config"]["width"] = 0.25
    (copy / MANIFEST).write_text(json.dumps(listed))
    with pytest.raises(checkpoints.CheckpointError, match="tiny: .* another run's network"):
        verify_manifest(copy)
    (copy / "tiny.pt").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="tiny: no file"):
        verify_manifest(copy)


@pytest.mark.e2e
@needs_omniglot
def test_export_and_test_refuse_bad_input_in_one_line(exported, tmp_path):
    run, weights, _ = exported
    cases = [
        (export(run, "tiny", weights), "tiny.pt exists or is listed; add --overwrite"),
        (export(run, "../up", weights), "--name '../up': letters, digits"),
        (export(run, "x", weights, "--cell", "5-way"), "--cell '5-way': expected WAYSwSHOTSs"),
        (export(run, "x", weights, "--cell", "2000w1s"), "--cell 2000w1s: invalid configuration"),
        (in_process("fewshot", "test", "nothing", "--weights-dir", weights),
         "nothing: not a run directory, a weights file or a name in"),
        (in_process("fewshot", "test", run / "best.pt"), "is a training checkpoint"),
        (in_process("fewshot", "test", "tiny", "--weights-dir", weights, "--set", "width=2"),
         "--set width: only"),
    ]  # fmt: skip
    for result, message in cases:
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert message in result.output, result.output
    assert verify_manifest(weights) == ["tiny"]  # nothing was written


@pytest.mark.e2e
@needs_omniglot
def test_a_run_from_before_val_batch_norm_exports_and_its_file_tests(exported, tmp_path):
    run, _, _ = exported
    old = tmp_path / "old"
    shutil.copytree(run, old)
    as_before_val_batch_norm(old, "running")  # it validated with running statistics
    result = export(old, "old", tmp_path / "weights")
    assert result.exit_code == 0, result.output
    assert verify_manifest(tmp_path / "weights") == ["old"]
    summary = summary_of_test("old", "--weights-dir", tmp_path / "weights", tmp_path / "test")
    assert summary["batch_norm"] == "running"  # its test_batch_norm, the file's default
