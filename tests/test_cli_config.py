"""Settings on the command line: what --set and --config refuse, and that a printed or saved
configuration is accepted as written. In process, without data: each test takes a second."""

import json

import pytest

from bilevel.app.experiments.config import resolve
from bilevel.app.experiments.fewshot import TEST, FewshotConfig
from tests.conftest import in_process, one_line

COMMANDS = [["hyperclean"], ["hparams"], ["convergence"], ["fewshot", "train"],
            ["fewshot", "classical"]]  # fmt: skip


def show(*args):
    """The resolved configuration that --show-config prints."""
    result = in_process(*args, "--show-config")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize(
    "command,setting,says",
    [
        (["hyperclean"], "inner_lr=.inf", "finite number"),
        (["hyperclean"], "inner_lr=1e400", "finite number"),
        (["hyperclean"], "hyper_lr=inf", "finite number"),
        (["hparams"], "lr_range=[0.001,.inf]", "finite number"),
        (["hparams"], "real_time_hyper_lr=1e999", "finite number"),
        (["fewshot", "train"], "feature_norm=.inf", "finite number"),
        (["hyperclean"], "inner_steps=true", "not true or false"),
        (["hyperclean"], "hyper_lr=false", "not true or false"),
        (["hyperclean"], "radii=[true]", "not true or false"),
        (["hparams"], "real_time_steps=true", "not true or false"),
        (["fewshot", "train"], "test_steps=[1,true]", "not true or false"),
        (["convergence"], "horizons=[yes]", "not true or false"),
    ],
)
def test_what_is_not_a_finite_number_is_refused_naming_the_key(command, setting, says):
    key = setting.partition("=")[0]
    line = one_line(in_process(*command, "--preset", "quick", "--set", setting, "--show-config"), 2)
    assert line.startswith(f"invalid configuration: {key}") and says in line, line


def test_a_config_file_is_held_to_the_same_rules(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("inner_lr = inf\ninner_steps = true\n")
    line = one_line(in_process("hyperclean", "--config", path, "--show-config"), 2)
    assert "inner_lr: Input should be a finite number" in line and "inner_steps:" in line
    assert show("hyperclean", "--set", "warm_start=false")["warm_start"] is False  # a true flag


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_the_printed_config_is_accepted_as_written(command, tmp_path):
    printed = show(*command, "--preset", "quick", "--seed", "3", "--set", "device=cpu")
    for name in ("shown.json", "shown.yaml"):
        (tmp_path / name).write_text(json.dumps(printed, indent=2))
        assert show(*command, "--config", tmp_path / name) == printed


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_runs_config_json_reproduces_its_config(command, tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    out = tmp_path / "run"  # a run that fails for want of data still saves its config first
    result = in_process(*command, "--preset", "quick", "--seed", "3", "--quiet",
                        "--data-dir", tmp_path / "data", "--out", out)  # fmt: skip
    assert result.exit_code == 1, result.output
    saved = json.loads((out / "config.json").read_text())
    assert show(*command, "--config", out / "config.json") == saved["config"]
    assert show(*command, "--config", out / "config.json", "--seed", "4")["seed"] == 4


def test_fewshot_test_checks_ways_against_the_test_classes(tmp_path):
    trained = FewshotConfig().model_dump()  # Omniglot, paper split: 4800 / 400 / 1292 classes
    config = resolve(TEST.config, {"run": trained}, "run", None, ["ways=1000"])
    assert config.ways == 1000  # more than the 400 validation classes, which a test never uses
    (tmp_path / "config.json").write_text(
        json.dumps({"experiment": "fewshot-train", "config": trained})
    )
    line = one_line(in_process("fewshot", "test", tmp_path, "--set", "ways=1500"), 2)
    assert "ways=1500 exceeds the 1292 test classes available" in line
    refused = one_line(in_process("fewshot", "train", "--set", "ways=1000", "--show-config"), 2)
    assert "ways=1000 exceeds the 400 val classes available" in refused  # training validates
