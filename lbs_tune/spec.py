"""Sweep files: YAML loading with line numbers, `--set` overrides, errors that name file and key.

A sweep file is a `base` trial config plus a `grid` of dotted keys (`lbs_tune.config.SweepSpec`).
`load_spec` validates the spec and every grid point, first as plain data and then against the
dataset and model zoos (`lbs_tune.checks`), before anything starts; a mistake is a `UserError`
whose one line names the file, the line, the key and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lbs_tune.config import KeyedError, SweepSpec, TrialConfig, set_dotted
from lbs_tune.errors import UserError, did_you_mean

Where = Callable[[str], str]


class _Source:
    """A loaded YAML file: its data and the line of every dotted key, for error messages."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
        # One parse: the node tree gives the lines, the same nodes give the data.
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            raise UserError(f"{where}: malformed YAML: {problem}; fix the syntax") from None
        finally:
            loader.dispose()
        if not isinstance(self.data, dict):
            raise UserError(f"{path}: a sweep file is a mapping with 'name', 'base' and 'grid'")
        self.lines: dict[str, int] = {}
        self._index(node, "")

    def _index(self, node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in self.lines:
                # YAML keeps the last of two equal keys: the first would be silently ignored.
                raise UserError(
                    f"{self.path}:{line}: {key}: given twice (first on line {self.lines[key]}); "
                    "keep one"
                )
            self.lines[key] = line
            self._index(value_node, key + ".")

    def where(self, key: str) -> str:
        """'file:line' for the nearest enclosing key that has a line."""
        parts = key.split(".")
        while parts:
            line = self.lines.get(".".join(parts))
            if line:
                return f"{self.path}:{line}"
            parts.pop()
        return str(self.path)


def _describe(error: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error, with did-you-mean for unknown keys."""
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, KeyedError):
        loc = [*loc, *cause.key.split(".")]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        return key, f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], fields)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error":
        message = f"got {error['input']!r}: {message.lower()}"
        choices = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        hint = did_you_mean(error["input"], choices) if choices else ""
        if hint.startswith(" (did you mean"):
            message += hint
    elif error["type"] == "too_short" and loc[:1] == ["grid"]:
        message = "no values; list at least one or remove the key"
    return key, message


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def validation_message(exc: ValidationError, model: type[BaseModel], where: Where) -> str:
    """One line for a pydantic error: 'file:line: key: problem' (+N more)."""
    errors = exc.errors()
    key, message = _describe(errors[0], model)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where(key)}: {key or 'config'}: {message}{more}"


def parse_override(text: str) -> tuple[str, Any]:
    """'lr.scaling=linear' -> ('lr.scaling', 'linear'); the value is parsed as YAML (64 -> int)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set batch_size=64")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply(tree: dict[str, Any], overrides: Iterable[str], setter=set_dotted) -> None:
    """Apply `--set KEY=VALUE` texts to `tree` with `setter(tree, key, value)`."""
    for text in overrides:
        key, value = parse_override(text)
        try:
            setter(tree, key, value)
        except ValueError as exc:
            raise UserError(f"--set {text}: {exc}") from None


def _set_in_file(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a key of a sweep file: `grid.lr.scaling` names the grid key `lr.scaling` (it keeps
    its dots), `base.lr.base` a key of the base config, anything else a top-level key."""
    section, _, rest = key.partition(".")
    if section not in ("grid", "base") or not rest:
        set_dotted(data, key, value)
        return
    if not isinstance(data.get(section), dict):
        data[section] = {}
    if section == "grid":
        data["grid"][rest] = value
    else:
        set_dotted(data["base"], rest, value)


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> SweepSpec:
    """Load and validate a sweep file, including every grid point (plain and against the zoos).

    `overrides` are 'KEY=VALUE' texts on the file's own dotted keys (`base.steps=2`,
    `grid.batch_size=[16,32]`, `max_concurrent=4`); a grid key keeps its dots (`grid.lr.scaling`).
    The returned spec's `trials` are its validated trial configs.
    """
    source = _Source(Path(path))
    _apply(source.data, overrides, _set_in_file)
    return check_spec(source.data, source.where)


def check_spec(data: dict[str, Any], where: Where) -> SweepSpec:
    """Validate a sweep as loaded from YAML or JSON; `where(key)` places a key in its file."""
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, SweepSpec, where)) from None
    trials = [_trial_config(spec, point, where) for point in spec.points()]
    spec.__dict__["trials"] = trials  # the cached_property, filled with what was just checked
    return spec


def _trial_config(spec: SweepSpec, point: dict[str, Any], where: Where) -> TrialConfig:
    """One grid point as a checked TrialConfig; errors placed at the grid or base key."""

    def locate(key: str) -> str:
        in_grid = next((g for g in point if key == g or key.startswith(g + ".")), None)
        return where(f"grid.{in_grid}") if in_grid else where(f"base.{key}")

    try:
        tree = spec.trial_dict(point)
    except ValueError as exc:  # a grid key under a base key that holds a value
        key = next(k for k in point if k.split(".")[0] in spec.base)
        fix = f"make base.{key.split('.')[0]} a section or change grid.{key}"
        raise UserError(f"{where(f'grid.{key}')}: grid.{key}: {exc}; {fix}") from None
    at = f" (grid point {', '.join(f'{k}={v}' for k, v in point.items())})" if point else ""
    return _checked(tree, locate, at)


def _checked(tree: dict[str, Any], locate: Where, at: str = "") -> TrialConfig:
    """`tree` validated as a TrialConfig and checked against the zoos, or a located UserError."""
    from lbs_tune.checks import check_trial  # the zoos import torch: only when checking

    try:
        config = TrialConfig.model_validate(tree)
        check_trial(config)
    except ValidationError as exc:
        raise UserError(validation_message(exc, TrialConfig, locate) + at) from None
    except KeyedError as exc:
        raise UserError(f"{locate(exc.key)}: {exc.key}: {exc}{at}") from None
    return config


def trial_from_spec(path: str | Path, overrides: Iterable[str] = ()) -> TrialConfig:
    """The config `lbs-tune train` runs: the spec's base plus its first grid point plus --set."""
    spec = load_spec(path)
    tree = spec.trial_dict(spec.points()[0])
    _apply(tree, overrides)
    return _checked(tree, lambda key: f"{path} (with --set)")
