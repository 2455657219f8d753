"""Sweep files: YAML loading with line numbers, `--set` overrides, errors that name file and key.

A sweep file is a `base` trial config plus a `grid` of dotted keys (`lbs_tune.sweep.SweepSpec`).
`load_spec` validates the spec and every grid point, first as plain data and then against the
dataset and model zoos (`lbs_tune.checks`), before anything starts; a mistake is a `UserError`
whose one line names the file, the line, the key and the fix.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from lbs_tune.config import KeyedError, TrialConfig, resolved
from lbs_tune.errors import UserError, cut, did_you_mean, short
from lbs_tune.names import BUDGET_KEYS, set_dotted
from lbs_tune.space import SearchSpec
from lbs_tune.sweep import SweepSpec, Target

Where = Callable[[str], str]


# A sweep file of a few hundred nodes is large; aliases that expand past this are an attack
# ("billion laughs": 1.8 KB of nested aliases make gigabytes).
MAX_NODES = 100_000
MAX_BYTES = 1_000_000


class _Source:
    """A loaded YAML file: its data and the line of every dotted key, for error messages."""

    def __init__(self, path: Path):
        self.path = path
        text = self._text()
        # One parse: the node tree gives the lines, the same nodes give the data.
        loader = None
        try:
            loader = yaml.SafeLoader(text)  # its reader refuses control characters at once
            node = loader.get_single_node()
            if node is not None:
                self._check_size(node)
            self.data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            raise UserError(self._yaml_problem(exc)) from None
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to be a sweep file; flatten it") from None
        except ValueError as exc:  # e.g. an integer of thousands of digits
            reason = cut(str(exc).split(";")[0], 120)
            raise UserError(f"{path}: a value YAML cannot read ({reason}); fix it") from None
        finally:
            if loader is not None:
                loader.dispose()
        if not isinstance(self.data, dict):
            raise UserError(f"{path}: a sweep file is a mapping with 'name', 'base' and 'grid'")
        self.lines: dict[str, int] = {}
        try:
            self._index(node, "")
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to be a sweep file; flatten it") from None

    def _text(self) -> str:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the sweep file ({exc.strerror})") from None
        if len(raw) > MAX_BYTES:
            raise UserError(f"{self.path}: {len(raw)} bytes is too large for a sweep file")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{self.path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
            ) from None

    def _yaml_problem(self, exc: yaml.YAMLError) -> str:
        if isinstance(exc, yaml.reader.ReaderError):  # a control character such as NUL
            return (
                f"{self.path}: character {exc.character!r} at byte {exc.position} is not "
                "allowed in YAML; remove it"
            )
        mark = getattr(exc, "problem_mark", None)
        where = f"{self.path}:{mark.line + 1}" if mark else str(self.path)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        return f"{where}: malformed YAML: {cut(problem, 120)}; fix the syntax"

    def _check_size(self, root: yaml.Node) -> None:
        """UserError if the document, with its aliases expanded, has more than MAX_NODES."""
        count, todo = 0, [root]
        while todo:
            node = todo.pop()
            count += 1
            if count > MAX_NODES:
                raise UserError(
                    f"{self.path}: more than {MAX_NODES} values once its aliases (*name) are "
                    "expanded; write the values out or use fewer aliases"
                )
            if isinstance(node, yaml.SequenceNode):
                todo.extend(node.value)
            elif isinstance(node, yaml.MappingNode):
                todo.extend(n for pair in node.value for n in pair)

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
        return key, f"unknown key {short(loc[-1], 40)}{did_you_mean(cut(loc[-1]), fields)}"
    message = cut(error["msg"].removeprefix("Value error, "), 200)
    if error["type"] == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        choices = re.findall(r"'([^']*)'", expected)
        hint = did_you_mean(error["input"], choices) if choices else ""
        if len(expected) <= 80:  # a few choices: say them all
            message = f"got {short(error['input'], 40)}: {message.lower()}"
            message += hint if hint.startswith(" (did you mean") else ""
        else:
            message = f"got {short(error['input'], 40)}: not a known choice{hint}"
    elif error["type"] == "too_short" and loc[:1] == ["grid"]:
        message = "no values; list at least one or remove the key"
    return key, message


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys known at `path` inside `model` (through optional sections: `Target | None`)."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = [a for a in (annotation, *get_args(annotation)) if _is_model(a)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def validation_message(exc: ValidationError, model: type[BaseModel], where: Where) -> str:
    """One line for a pydantic error: 'file:line: key: problem' (+N more)."""
    errors = exc.errors()
    key, message = _describe(errors[0], model)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where(key)}: {cut(key, 40) or 'config'}: {message}{more}"


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
    overrides = list(overrides)
    _apply(source.data, overrides, _set_in_file)
    return check_spec(source.data, _overridden(source.where, overrides))


def _overridden(where: Where, overrides: list[str]) -> Where:
    """`where` that names the `--set KEY=VALUE` that set a key (or a section above or below it)
    instead of the file's line, which holds a value the override replaced."""
    keys = [(parse_override(text)[0], text) for text in overrides]

    def place(key: str) -> str:
        for set_key, text in reversed(keys):  # the last override of a key wins
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                return f"--set {cut(text, 80)}"
        return where(key)

    return place


def check_spec(data: dict[str, Any], where: Where) -> SweepSpec:
    """Validate a sweep as loaded from YAML or JSON; `where(key)` places a key in its file."""
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, SweepSpec, where)) from None
    # Resolved once, here: Ray's trials, the dry run, status and the console read this list.
    trials = [resolved(_trial_config(spec, point, where)) for point in spec.points()]
    _check_base(spec, where)
    from lbs_tune.checks import check_sweep_target  # the zoos import torch: only when checking

    problems = [check_sweep_target(spec.target, trials)]
    if spec.search is not None:
        problems += check_search(spec.search, spec.grid, trials, spec.target)
    found = [p for p in problems if p]
    if found:
        key, message = found[0]
        raise UserError(f"{where(key)}: {key}: {message}")
    if spec.branch is not None:
        from lbs_tune.probes import check_branch  # it asks the zoos

        problems = check_branch(spec.branch, trials[0])
        if problems:
            key, message = problems[0]
            raise UserError(f"{where(key)}: {key}: {message}")
    spec.__dict__["trials"] = trials  # the cached_property, filled with what was just checked
    return spec


def _check_base(spec: SweepSpec, where: Where) -> None:
    """The base's own values, also those that every grid point overrides (`base.batch_size: 0`
    is a mistake even under a grid of batch sizes). Whole-config rules (one budget, sizes that
    divide) are left to the grid points, which the base alone may not satisfy."""
    try:
        TrialConfig.model_validate(spec.base)
    except ValidationError as exc:
        # Errors of one value (field level) only: whole-config rules are the grid points'.
        errors = [e for e in exc.errors() if e["loc"]]
        if errors:
            key, message = _describe(errors[0], TrialConfig)
            raise UserError(f"{where(f'base.{key}')}: {key}: {message}") from None


def _trial_config(spec: SweepSpec, point: dict[str, Any], where: Where) -> TrialConfig:
    """One grid point as a checked TrialConfig; errors placed at the grid or base key."""

    def locate(key: str) -> str:
        # The grid key that set `key`, or one below it (grid.foo.bar makes the unknown 'foo').
        in_grid = next(
            (g for g in point if key == g or key.startswith(g + ".") or g.startswith(key + ".")),
            None,
        )
        return where(f"grid.{in_grid}") if in_grid else where(f"base.{key}")

    try:
        tree = spec.trial_dict(point)
    except ValueError as exc:  # a grid key under a base key that holds a value
        key = _blocked_key(spec.base, point)
        blocked = _value_above(spec.base, key)
        if _fields_at(TrialConfig, blocked.split(".")):  # a section that base set to a value
            fix = f"make base.{blocked} a section or change grid.{key}"
        else:
            fix = f"change grid.{key} to a key of the trial config"
        raise UserError(f"{where(f'grid.{key}')}: grid.{key}: {exc}; {fix}") from None
    label = ", ".join(f"{k}={cut(str(v), 40)}" for k, v in point.items())
    at = f" (grid point {label})" if point else ""
    return _checked(tree, locate, at)


def _blocked_key(base: dict[str, Any], point: dict[str, Any]) -> str:
    """The first grid key of `point` that cannot be set on `base` (a part of it is a value)."""
    for key, value in point.items():
        try:
            set_dotted(copy.deepcopy(base), key, value)
        except ValueError:
            return key
    raise AssertionError("no grid key is blocked")


def _value_above(base: dict[str, Any], key: str) -> str:
    """The dotted part of `key` that holds a value in `base` (so nothing can be set below it)."""
    parts, node = key.split("."), base
    for i, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            return ".".join(parts[: i + 1])
    return parts[0]


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


def check_search(
    search: SearchSpec,
    grid: dict[str, list[Any]],
    trials: list[TrialConfig],
    target: Target | None,
) -> list[tuple[str, str]]:
    """The search section against the rest of the sweep: (key in the sweep file, message) for
    every problem, [] when there is none. `trials` are the grid points' configs (SweepSpec.trials)
    and `grid` the sweep's grid: a space key must be a leaf of the trial config (not a budget key,
    not also a grid key) whose every end value (or listed value) makes a valid config at every
    grid point; with `lr.base` searched, `lr.scaling` must be `none`; `steps_to_target` needs a
    target (whose metric has a direction: `Target` checks that)."""
    problems = []
    leaves = trials[0].flat()
    for key, dist in search.space.items():
        at = f"search.space.{key}"
        if key in grid:
            problems.append((at, f"'{key}' is also a grid key; search it or list it, not both"))
        elif key in BUDGET_KEYS:
            problems.append((at, "the budget is not searched; set it in base or grid"))
        elif key not in leaves:
            problems.append((at, f"not a trial config key{did_you_mean(key, leaves)}"))
        else:
            found = (_invalid(t, key, v) for t in trials for v in dist.ends())
            problem = next(filter(None, found), None)
            if problem:
                problems.append((at, problem))
    if "lr.base" in search.space:
        scaled = [t for t in trials if t.lr.scaling != "none"]
        if scaled:
            at = "grid.lr.scaling" if "lr.scaling" in grid else "base.lr.scaling"
            problems.append(
                (
                    at,
                    f"must be 'none' when search.space has lr.base (the tuned rate is used as is "
                    f"at every batch size), not '{scaled[0].lr.scaling}'",
                )
            )
    if search.objective == "steps_to_target" and target is None:
        problems.append(
            (
                "search.objective",
                "steps_to_target needs a `target` (metric and value); add one or use "
                "objective: metric",
            )
        )
    return problems


def _invalid(trial: TrialConfig, key: str, value: Any) -> str | None:
    """Why `trial` with `key` set to `value` is not a valid TrialConfig, or None."""
    tree = trial.model_dump(mode="json")
    set_dotted(tree, key, value)
    try:
        TrialConfig.model_validate(tree)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        return f"{value!r} is not a valid {key}: {message}"
    return None


def trial_from_spec(
    path: str | Path, overrides: Iterable[str] = ()
) -> tuple[SweepSpec, TrialConfig]:
    """(the sweep, the config `lbs-tune train` runs): the spec's base plus its first grid point
    plus `--set` overrides of trial-config keys (`batch_size=64`, not the sweep file's
    `base.batch_size=64`), resolved as the sweep's trials are."""
    spec = load_spec(path)
    tree = spec.trial_dict(spec.points()[0])
    _apply(tree, overrides)
    return spec, resolved(_checked(tree, lambda key: f"{path} (with --set)"))
