"""What the command line tells a user: the setting a mistyped key was meant to be. In process,
without data: the whole file takes a few seconds."""

import pytest

from bilevel.app.experiments import fewshot
from bilevel.app.experiments.config import ConfigError, resolve
from tests.conftest import in_process, one_line


@pytest.mark.parametrize(
    "typed,meant", [("inner_lrr", "inner_lr"), ("hyperiterations", "hyper_iterations")]
)
def test_a_mistyped_setting_names_the_one_meant(typed, meant):
    line = one_line(in_process("hyperclean", "--set", f"{typed}=0.1", "--show-config"), 2)
    assert line == f"invalid configuration: unknown setting {typed!r}; did you mean {meant!r}?"


def test_a_setting_like_none_points_to_help():
    with pytest.raises(ConfigError) as raised:
        resolve(fewshot.FewshotConfig, fewshot.PRESETS, "quick", None, ["zzz=1"])
    assert str(raised.value) == (
        "invalid configuration: unknown setting 'zzz' (--help lists the settings)"
    )


def test_a_mistyped_test_setting_names_the_one_meant(tmp_path):
    (tmp_path / "config.json").write_text('{"experiment": "fewshot-train", "config": {}}')
    line = one_line(in_process("fewshot", "test", tmp_path, "--set", "test_episode=20"), 2)
    assert line == "--set test_episode: unknown setting 'test_episode'; did you mean " + (
        "'test_episodes'?"
    )
