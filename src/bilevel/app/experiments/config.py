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
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class ExperimentConfig(BaseModel):
    """Settings every experiment has."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    seed: int = Field(0, ge=0, description="same seed, same numbers")
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
        10, gt=0, description="hyper-iterations between checkpoints inside a stage"
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
