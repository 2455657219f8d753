"""The tables as `lbs-tune export` writes them: made to be joined and stacked by scripts.

- Every history row carries the sweep's grid and searched keys (`batch_size`, `lr.scaling`,
  ...), right after `trial_id`: a plot of a curve per batch size needs no join.
- Columns of metrics that no trial reported (perplexity in a classification sweep) are left
  out, in the history (`val/miou`) and in the trials table (`final/val/miou`, `best/...`).
- Config columns have the type the trial config declares, whatever the values: a key that is
  null in every trial of one sweep (`data.dir`) is text, as in a sweep that sets it, and a key
  that takes a number or a word (`max_device_batch`: 64 or auto) is always text. So the exports
  of two sweeps concatenate (pandas, polars' `how="diagonal"`) without a type conflict.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from analysis.columns import config_columns
from analysis.metrics import attach, varying_keys
from analysis.tables import Results
from lbs_tune.config import TrialConfig
from lbs_tune.names import METRICS

_SCALARS = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


def for_export(results: Results) -> Results:
    """`results` (of analysis.load) as export writes them (see the module's docstring)."""
    trials, history = results
    trials = _declared_types(trials)
    keys = [k for k in grid_keys(results) if k in trials.column_names]
    # A key that is also a report's field (a grid over the `examples` budget) stays as reported.
    keys = [k for k in keys if k not in history.column_names]
    history = attach(history, trials, keys)
    rest = [c for c in history.column_names if c not in ("trial_id", *keys)]
    history = history.select(["trial_id", *keys, *rest])
    history = history.drop_columns([c for c in history.column_names if _unreported(history, c)])
    trials = trials.drop_columns([c for c in trials.column_names if _unreported(trials, c)])
    return Results(trials, history)


def grid_keys(results: Results) -> list[str]:
    """The sweep's grid keys and then its searched keys, from its record; without a record, the
    config keys whose value differs between trials."""
    spec = (results.sweep or {}).get("spec")
    if not isinstance(spec, dict):
        return varying_keys(results.trials)
    searched = list((spec.get("search") or {}).get("space") or {})
    return list(dict.fromkeys([*(spec.get("grid") or {}), *searched]))


def _unreported(table: pa.Table, column: str) -> bool:
    """A metric's column (`val/miou`, `final/val/miou`, `best/val/miou`) without a value."""
    metric = column.split("/", 1)[1] if column.startswith(("final/", "best/")) else column
    return metric in METRICS and table[column].null_count == table.num_rows


def _declared_types(trials: pa.Table) -> pa.Table:
    for key in config_columns(trials):
        kind = declared_type(key)
        if kind is None or trials.schema.field(key).type == kind:
            continue
        try:
            column = pc.cast(trials[key], kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue  # values the config would refuse (a record of another version): as read
        trials = trials.set_column(trials.schema.get_field_index(key), key, column)
    return trials


def declared_type(key: str) -> pa.DataType | None:
    """The Arrow type of a dotted key of the trial config: its field's scalar type (a union of
    a number and words is text); None for a key that is no field of one scalar (a list, a
    section, a model option)."""
    model: Any = TrialConfig
    annotation: Any = None
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        model = _only_model(annotation)
    kinds = _scalar_kinds(annotation)
    if not kinds:
        return None
    if len(kinds) > 1:
        return pa.float64() if kinds == {int, float} else pa.string()
    return _SCALARS[kinds.pop()]


def _members(annotation: Any) -> list[Any]:
    """The members of a union (Optional included), Annotated stripped; one member otherwise."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _only_model(annotation: Any) -> Any:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None


def _scalar_kinds(annotation: Any) -> set[type]:
    """The Python scalar types a field holds (None left out); empty if it holds anything else."""
    kinds = set()
    for member in _members(annotation):
        if member is type(None):
            continue
        if typing.get_origin(member) is Literal:
            kinds |= {type(v) for v in typing.get_args(member)}
        elif member in _SCALARS:
            kinds.add(member)
        else:
            return set()
    return kinds
