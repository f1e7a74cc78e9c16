"""What the command line tells a user: the methods and their options (`bilevel methods`), each
experiment's presets and settings (`--help`), and the setting a mistyped key was meant to be.
In process, without data: the whole file takes a few seconds."""

import inspect
import re

import pytest

import bilevel
from bilevel.app.experiments import convergence, fewshot, hparams, hyperclean
from bilevel.app.experiments.config import ConfigError, resolve
from bilevel.app.method_guide import GUIDE, option_defaults
from tests.conftest import in_process, one_line

EXPERIMENTS = {
    **{(m.EXPERIMENT.name,): m.EXPERIMENT for m in (hyperclean, hparams, convergence)},
    ("fewshot", "train"): fewshot.TRAIN,
    ("fewshot", "classical"): fewshot.CLASSICAL,
}
# notation a user has not been told: subscripts, powers, norms, Greek letters by name
NOTATION = re.compile(r"\^|\|[^|]+\||\b[a-zA-Z]_[a-zA-Z0-9]\b|\blambda\b|\bsqrt\b")


def test_methods_describe_every_method_and_option_in_words():
    result = in_process("methods")
    assert result.exit_code == 0, result.output
    for name, function in bilevel.METHODS.items():
        assert re.search(rf"^{re.escape(name)}\n    \w", result.output, re.M), name
        options = inspect.signature(function).parameters.values()
        for option in (p for p in options if p.kind is inspect.Parameter.KEYWORD_ONLY):
            required = option.default is inspect.Parameter.empty
            shown = option.name if required else f"{option.name}={option.default!r}"
            assert re.search(rf"^    - {re.escape(shown)}: \w", result.output, re.M), shown
    assert "window=None: differentiate only the last `window` steps" in result.output
    assert list(GUIDE) == list(bilevel.METHODS)  # no method or option described that is gone
    for name, guide in GUIDE.items():
        assert list(guide.options) == list(option_defaults(bilevel.METHODS[name])), name
    assert not NOTATION.search(result.output), NOTATION.search(result.output)


@pytest.mark.parametrize("command", EXPERIMENTS, ids=" ".join)
def test_help_lists_every_preset_and_setting_with_a_description(command):
    experiment = EXPERIMENTS[command]
    result = in_process(*command, "--help")
    assert result.exit_code == 0, result.output
    presets = result.output.split("Presets (--preset NAME):\n")[1].split("\n\n")[0]
    for name in experiment.presets:  # a name, then words (on its line or the next)
        assert re.search(rf"^  {re.escape(name)}\s+\w", presets, re.M), name
    settings = result.output.split("Settings (--set KEY=VALUE, or in a --config file):\n")[1]
    for name, field in experiment.config.model_fields.items():
        assert field.description and not NOTATION.search(field.description), name
        item = re.search(rf"^  {name} +(\w.*?)(?=^  \w|\Z)", settings, re.M | re.S)
        words = " ".join(item[1].split()) if item else ""
        assert re.fullmatch(r"\w.* \[default: .+\]", words), (name, words)
    assert "one of: reverse, truncated, forward" in in_process("hyperclean", "--help").output


def test_fewshot_test_help_lists_only_what_a_test_may_change():
    result = in_process("fewshot", "test", "--help")
    settings = result.output.split("Settings (--set KEY=VALUE; by default as in the trained run")
    listed = re.findall(r"^  (\w+) ", settings[1], re.M)
    assert set(listed) == fewshot.FewshotTestConfig.SETTABLE and "[default:" not in settings[1]


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
