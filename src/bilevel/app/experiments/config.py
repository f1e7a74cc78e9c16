"""Experiment configuration: presets, a TOML or YAML file, and --set overrides, validated.

Precedence, lowest first: the config class's defaults, the preset, the config file, then each
`--set key=value` in order (dotted keys reach into nested sections). The result is validated by
pydantic; an unknown key or a bad value is an error that names it. Numbers must be finite (a
config.json holds strict JSON), and true/false is not a number. A config file is TOML, YAML or
JSON: what --show-config prints, and a run's own config.json, are accepted as written.
"""

from __future__ import annotations

import difflib
import json
import sys
import textwrap
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticUndefined

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# the `memory` setting of the experiments that use reverse mode
MEMORY_HELP = (
    "what reverse mode keeps of the inner steps for its backward pass: the whole graph "
    "(fastest, the most memory), each step's state, or checkpoints every few steps (the least "
    "memory)"
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class ExperimentConfig(BaseModel):
    """Settings every experiment has."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # one line on each preset, for --help (the paper's presets and a quick one by default)
    PRESET_SUMMARIES: ClassVar[dict[str, str]] = {
        "paper": "the paper's data, model and optimisers (the defaults below)",
        "quick": "a smaller run of the same experiment: minutes on 2 CPU cores",
    }
    # the settings --set may change; None: every one
    SETTABLE: ClassVar[frozenset[str] | None] = None

    seed: int = Field(0, ge=0, description="random seed: the same seed gives the same numbers")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, value, info: ValidationInfo):
        """pydantic reads true as 1 for an int or float: a typo that would pass silently."""
        types = _types(cls.model_fields[info.field_name].annotation)
        if bool not in types and types & {int, float} and _holds_bool(value):
            raise ValueError("expected a number, not true or false")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        import torch

        try:
            device = torch.device(value)
        except RuntimeError as error:
            raise ValueError(f"not a torch device: {value!r}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "CUDA is not available on this machine (use --device cpu; a run made on a GPU "
                "can be tested or resumed here so)"
            )
        return value


class StagedConfig(ExperimentConfig):
    """Settings of an experiment run in stages (bilevel.app.experiments.stages)."""

    checkpoint_every: int = Field(
        10,
        gt=0,
        description="hyper-iterations between checkpoints (--resume continues from the last)",
    )


def _types(annotation) -> set:
    """Every type an annotation names: ``list[int] | None`` gives {list, int, NoneType}."""
    found = {annotation} if isinstance(annotation, type) else set()
    for argument in typing.get_args(annotation):
        found |= _types(argument)
    return found


def _holds_bool(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(item) for item in value)
    return isinstance(value, bool)


def read_file(path: Path) -> dict:
    """A config file's settings as a dict: TOML by .toml, YAML by .yaml/.yml, JSON by .json
    (what --show-config prints). A run's config.json (the settings under "config", beside the
    experiment's name and version) gives its settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml, .yml or .json file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"--config {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the file must hold a table of settings")
    if {"experiment", "config"} <= set(data) and isinstance(data["config"], dict):
        return data["config"]  # a run's config.json
    return data


def apply_set(data: dict, assignment: str) -> None:
    """Apply one `key.sub=value`; the value is read as YAML (numbers, booleans, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[leaf] = value


def _merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve(
    config_class: type[ExperimentConfig],
    presets: Mapping[str, dict],
    preset: str | None = None,
    path: Path | None = None,
    assignments: Sequence[str] = (),
    **overrides,
) -> ExperimentConfig:
    """Build and validate a config from its layers (see the module docstring)."""
    data: dict = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(presets)}")
        data = _merge(data, presets[preset])
    if path is not None:
        data = _merge(data, read_file(path))
    for assignment in assignments:
        apply_set(data, assignment)
    data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return config_class.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, config_class)) from None


def unknown_setting(key: str, known: Iterable[str]) -> str:
    """The message for a setting that does not exist: the closest known name, if one is close
    (`inner_lrr` -> `inner_lr`), else where the settings are listed."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    if close:
        return f"unknown setting {key!r}; did you mean {close[0]!r}?"
    return f"unknown setting {key!r} (--help lists the settings)"


def _describe(error: ValidationError, config_class: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(unknown_setting(key, config_class.model_fields))
        elif not key:  # a check across several settings: the message names them
            lines.append(message)
        else:
            lines.append(f"{key}: {message} (got {item['input']!r})")
    return "invalid configuration: " + "; ".join(lines)


HELP_WIDTH = 78  # of the lines --help prints below the options
NAME_WIDTH = 20  # the column of setting and preset names


def settings_help(
    config_class: type[ExperimentConfig], presets: Mapping[str, dict], defaults_from: str = ""
) -> str:
    """The presets and the settings of an experiment, one described item a line, as `--help`
    prints them below the options (click keeps the lines of a paragraph that starts with \\b).

    Args:
        config_class: the experiment's config; its fields' descriptions and defaults are listed
            (only those in its SETTABLE, where that is not None).
        presets: the experiment's presets by name; each needs a line in PRESET_SUMMARIES.
        defaults_from: where the settings' values come from when not set ("the trained run"),
            said once instead of each field's default; "": each field's default.
    Returns:
        The text, paragraphs separated by blank lines.
    """
    paragraphs = []
    if presets:
        lines = [_item(name, config_class.PRESET_SUMMARIES[name]) for name in sorted(presets)]
        paragraphs.append(["Presets (--preset NAME):", *lines])
    lines = []
    for name, field in config_class.model_fields.items():
        if config_class.SETTABLE is None or name in config_class.SETTABLE:
            default = "" if defaults_from else f" [default: {_default(field)}]"
            lines.append(_item(name, f"{field.description}{_choices(field.annotation)}{default}"))
    source = f"; by default as in {defaults_from}" if defaults_from else ", or in a --config file"
    paragraphs.append([f"Settings (--set KEY=VALUE{source}):", *lines])
    return "\n\n".join("\b\n" + "\n".join(paragraph) for paragraph in paragraphs)


def _default(field) -> str:
    """The default as --set would write it: a plain word, a number, or a YAML list."""
    value = field.get_default(call_default_factory=True)
    if value is None or value is PydanticUndefined:
        return "none"
    return value if isinstance(value, str) else json.dumps(value).replace('"', "")


def _choices(annotation) -> str:
    """ "; one of: a, b" for a setting (or a list of them) limited to named values."""
    for inner in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(inner) is typing.Literal:
            return "; one of: " + ", ".join(map(str, typing.get_args(inner)))
    return ""


def _item(name: str, text: str) -> str:
    """`name` in its column, `text` wrapped beside it."""
    indent = " " * (NAME_WIDTH + 2)
    first = f"{name:<{NAME_WIDTH}}  " if len(name) <= NAME_WIDTH else f"{name}\n{indent}"
    wrapped = textwrap.fill(
        text, HELP_WIDTH, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
    )
    return first + wrapped[len(indent) :]
