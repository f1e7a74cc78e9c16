"""Bad input to `bilevel fewshot train`: one clear line, a non-zero exit, nothing claiming success.

In process (click's CliRunner): the whole file takes seconds.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilevel.app import checkpoints
from bilevel.app.experiments.fewshot import FewshotConfig
from tests.conftest import DATA, in_process, needs_omniglot

KEYS = sorted(FewshotConfig.model_fields) + ["no_such_key", "ways.sub", ""]
VALUES = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.sampled_from(["0", "-1", "1", "2", "20", "21", "100000", "1e400", "-1e-9"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "no", "null", "~", "[]", "[1, -2]", "[0]", "{a: 1}", "'5'", "["]),
    st.text(max_size=12),
)  # fmt: skip


def clean_failure(result, code=2) -> str:
    """The one-line error of a refused invocation."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped
    assert "Traceback" not in result.output
    lines = [x for x in result.output.strip().splitlines() if x.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_setting_is_accepted_or_refused_in_one_line(key, value, tmp_path):
    result = in_process("fewshot", "train", "--preset", "quick", "--show-config",
                        "--set", f"{key}={value}", "--data-dir", tmp_path)  # fmt: skip
    if result.exit_code == 0:  # a valid configuration: printed, and it holds the value
        config = FewshotConfig.model_validate(json.loads(result.output))
        assert key in FewshotConfig.model_fields and config.ways <= 4800
    else:
        line = clean_failure(result)
        assert "invalid configuration" in line or "--set" in line, line
    assert list(tmp_path.iterdir()) == []  # nothing read or written


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "abc"], "'abc' is not a valid integer"),
        (["--seed", "-3"], "seed: Input should be greater than or equal to 0"),
        (["--set", "ways=five"], "ways: Input should be a valid integer"),
        (["--set", "meta_batch=0"], "meta_batch: Input should be greater than 0"),
        (["--set", "inner_steps=-1"], "inner_steps: Input should be greater than 0"),
        (["--set", "width=0"], "width: Input should be greater than 0"),
        (["--set", "ways=30", "--set", "train_classes=20"], "ways=30 exceeds the 20 train"),
        (["--set", "ways=2000"], "ways=2000 exceeds the 400 val classes available"),
        (["--set", "shots=6"], "shots + queries = 21 exceeds the 20 examples per class"),
        (["--set", "memory=disk"], "memory: Input should be 'graph', 'trajectory' or"),
        (["--set", "train_batch_norm=rank"], "train_batch_norm: Input should be 'episode'"),
        (["--set", "checkpoint_every=0"], "checkpoint_every: Input should be greater than 0"),
        (["--config", "missing.toml"], "--config missing.toml: no such file"),
        (["--device", "gpu7"], "not a torch device: 'gpu7'"),
        (["--preset", "large"], "'large' is not one of"),
    ],
)
def test_bad_arguments_are_one_line_exit_2_and_write_nothing(args, message, tmp_path):
    out = tmp_path / "out"
    result = in_process("fewshot", "train", "--preset", "quick", *args, "--out", out,
                        "--data-dir", tmp_path / "data")  # fmt: skip
    assert message in clean_failure(result)
    assert not out.exists()


def test_a_corrupt_config_file_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("ways = [\n")
    result = in_process("fewshot", "train", "--config", path, "--out", tmp_path / "out")
    assert f"--config {path}" in clean_failure(result)
    assert not (tmp_path / "out").exists()


def failed_run(out) -> None:
    """What a refused run leaves: nothing that claims success."""
    summary = out / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"
    assert not (out / "best.pt").exists()


def test_corrupt_data_files_are_one_line_exit_1(tmp_path):
    data = tmp_path / "data" / "omniglot"
    data.mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        (data / name).write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "out"
    result = in_process("fewshot", "train", "--preset", "quick", "--out", out, "--quiet",
                        "--data-dir", tmp_path / "data")  # fmt: skip
    assert "images_background.zip" in clean_failure(result, code=1)
    failed_run(out)
    assert not (out / "checkpoint.pt").exists()


def test_missing_data_files_are_one_line_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_OFFLINE", "1")  # no download attempt, whatever the network
    out = tmp_path / "out"
    result = in_process("fewshot", "train", "--preset", "quick", "--out", out, "--quiet",
                        "--data-dir", tmp_path / "empty")  # fmt: skip
    line = clean_failure(result, code=1)
    assert "images_background.zip is missing and downloading is disabled" in line
    failed_run(out)


def test_an_unwritable_output_directory_is_one_line_exit_1(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"  # under a plain file: no directory can be made there
    result = in_process("fewshot", "train", "--preset", "quick", "--out", out, "--quiet",
                        "--data-dir", DATA)  # fmt: skip
    assert f"--out {out}: cannot write there" in clean_failure(result, code=1)


@needs_omniglot
@pytest.mark.parametrize("damage", ["foreign", "garbage", "truncated", "missing"])
def test_a_checkpoint_that_cannot_be_resumed_is_one_line_exit_1(damage, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if damage == "foreign":
        checkpoints.save(path, {"progress": {"iteration": 3}}, {"experiment": "other"})
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "truncated":  # what a non-atomic writer killed half-way would leave
        checkpoints.save(path, {"progress": {"iteration": 3}}, {"experiment": "other"})
        path.write_bytes(path.read_bytes()[:-20])
    before = sorted(p.name for p in out.iterdir())
    result = in_process("fewshot", "train", "--preset", "quick", "--out", out, "--quiet",
                        "--data-dir", DATA, "--resume")  # fmt: skip
    expected = {
        "foreign": "another configuration",
        "garbage": "not a bilevel checkpoint",
        "truncated": "is corrupt",
        "missing": "--resume: no checkpoint.pt in",
    }[damage]
    assert expected in clean_failure(result, code=1)
    assert sorted(p.name for p in out.iterdir()) == before  # refused before writing anything
