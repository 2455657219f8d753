"""`lbs-tune status` and `lbs-tune where`: the trials of an experiment, while it runs or after.

Both read the experiment's files through `analysis.load` (never a pickle), so they work on a
running sweep, a crashed one and a finished one, local or at a storage URI.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from lbs_tune.data import DATASETS
from lbs_tune.errors import UserError
from lbs_tune.spec import TrialConfig, did_you_mean, set_dotted, total_steps

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def _nested(row: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key in keys:
        if row.get(key) is not None:
            set_dotted(tree, key, row[key])
    return tree


def _budget(row: dict[str, Any], keys: list[str]) -> int | None:
    """The trial's total steps, from its config (None if the config is incomplete)."""
    try:
        config = TrialConfig.model_validate(_nested(row, keys))
    except ValueError:
        return None
    return total_steps(config, DATASETS[config.dataset].train_size(config.data))


def _newest_checkpoint(experiment, folder: str) -> str:
    import pyarrow.fs as pafs

    try:
        infos = experiment.fs.get_file_info(pafs.FileSelector(experiment.join(folder).path))
    except (FileNotFoundError, OSError):
        return "-"
    names = [i.base_name for i in infos if CHECKPOINT_DIR.match(i.base_name)]
    return max(names, default="-")


def _when(value) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def status(source: str) -> str:
    """The status table of an experiment: one row per trial, below a header about the sweep."""
    from analysis import load
    from analysis.load import config_columns, experiment_location

    experiment = experiment_location(source)
    results = load(source)
    sweep = results.sweep or {}
    spec = sweep.get("spec") or {}
    metric = (spec.get("metric") or {}).get("name", "val/accuracy")
    keys = config_columns(results.trials)
    grid = list(spec.get("grid") or {}) or [
        k for k in ("batch_size", "lr.scaling", "seed") if k in keys
    ]
    trials = results.trials.to_pylist()
    states: dict[str, int] = {}
    rows = []
    for t in trials:
        states[t["state"] or "UNKNOWN"] = states.get(t["state"] or "UNKNOWN", 0) + 1
        step, budget = t.get("final/step"), _budget(t, keys)
        progress = f"{step or 0}/{budget}" if budget else str(step or 0)
        where = t.get("final/host") or "-"
        if t.get("final/node_id"):
            where += f" node {t['final/node_id'][:8]}"
        if t.get("final/gpu_ids"):
            where += f" gpu {t['final/gpu_ids']}"
        rows.append(
            [
                t["trial_id"],
                *(str(t.get(k)) for k in grid),
                t["state"] or "-",
                progress,
                _number(t.get(f"final/{metric}")),
                _number(t.get(f"best/{metric}")),
                "yes" if t["diverged"] else "no",
                where,
                str(t["num_failures"] or 0),
                _newest_checkpoint(experiment, t["folder"]),
                _when(t["start_time"]),
            ]
        )
        if t["error"]:
            rows.append(["", "error:", t["error"]] + [""] * (len(grid) + 8))
    header = [
        "trial",
        *grid,
        "state",
        "step",
        f"latest {metric}",
        "best",
        "diverged",
        "host / node / gpu",
        "failures",
        "last checkpoint",
        "started",
    ]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
    ended = sweep.get("ended") or "running or interrupted"
    lines = [
        f"sweep {sweep.get('name', experiment.name)} at {experiment.uri}",
        f"  git commit {sweep.get('git_commit') or '-'}, started {sweep.get('started', '-')}, "
        f"ended {ended}",
        f"  {len(trials)} trials: {counts}",
        "",
        _table(header, rows) if rows else "(no trials yet)",
    ]
    return "\n".join(lines)


def where(source: str, filters: list[str]) -> list[str]:
    """The folders of the trials whose config matches every KEY=VALUE exactly (dotted keys)."""
    from analysis import load
    from analysis.load import config_columns, experiment_location

    experiment = experiment_location(source)
    trials = load(source).trials
    keys = config_columns(trials)
    wanted = []
    for text in filters:
        key, sep, raw = text.partition("=")
        if not sep:
            raise UserError(f"{text}: expected KEY=VALUE, e.g. batch_size=32 or lr.scaling=linear")
        if key not in keys:
            raise UserError(f"{text}: no config key '{key}' in this sweep{did_you_mean(key, keys)}")
        wanted.append((key, yaml.safe_load(raw) if raw else ""))
    found = []
    for row in trials.to_pylist():
        if all(_equal(row.get(key), value) for key, value in wanted):
            found.append(experiment.join(row["folder"]).uri)
    return found


def _equal(actual: Any, wanted: Any) -> bool:
    """Exact match of a config value and a KEY=VALUE value; numbers compare as numbers."""
    numbers = (int, float)
    if isinstance(actual, bool) or isinstance(wanted, bool) or actual is None or wanted is None:
        return actual == wanted
    if isinstance(actual, numbers) and isinstance(wanted, numbers):
        return float(actual) == float(wanted)
    return str(actual) == str(wanted)
