"""Every trial of every study of a searched sweep as one table: `studies.parquet` of
`lbs-tune export`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from analysis._arrow import rows_to_table
from analysis.summary import studies_of
from lbs_tune.storage import Location, locate


def study_trials_table(source: Location | str | Path) -> pa.Table | None:
    """Every trial of every study of an experiment (a Location, folder or URI) as one table
    (None without studies): `study`, `point` (its grid index), the grid keys, `objective`,
    `objective_metric`, `run` ('search', or 'confirm' for a confirmation run), `number` (in
    its study or its confirmation study), `confirms` (a confirmation run's search trial),
    `confirm_seed` (a confirmation run's seed), `state`, `value`, `at_value`, the searched
    keys (dotted), `ray_trial_id`, `reason`, `diverged`, `ray_errors`, `pruned_at`,
    `total_steps`, and the reported values of the objective's metric as lists `report_steps`
    and `report_values`. For `lbs-tune export` (studies.parquet)."""
    where = source if isinstance(source, Location) else locate(source)
    studies = studies_of(where)
    if not studies:
        return None
    rows = []
    for s in studies:
        runs = [("search", t) for t in s.trials] + [("confirm", t) for t in s.confirmations]
        for run, t in runs:
            rows.append(
                {
                    "study": s.name,
                    "point": s.index,
                    **s.point,
                    "objective": s.objective.kind,
                    "objective_metric": s.objective.metric,
                    "run": run,
                    "number": t["number"],
                    "confirms": t.get("confirms"),
                    "confirm_seed": t.get("seed"),
                    "state": t["state"],
                    "value": t["value"],
                    "at_value": t["at_value"],
                    **t["params"],
                    "ray_trial_id": t["ray_trial_id"],
                    "reason": t["reason"],
                    "diverged": t["diverged"],
                    "ray_errors": t["ray_errors"],
                    "pruned_at": t["pruned_at"],
                    "total_steps": t["total_steps"],
                    "report_steps": list(t["values"]),
                    "report_values": list(t["values"].values()),
                }
            )
    fixed = pa.schema(
        [
            ("study", pa.string()),
            ("point", pa.int64()),
            ("objective", pa.string()),
            ("objective_metric", pa.string()),
            ("run", pa.string()),
            ("number", pa.int64()),
            ("confirms", pa.int64()),
            ("confirm_seed", pa.int64()),
            ("state", pa.string()),
            ("value", pa.float64()),
            ("at_value", pa.float64()),
            ("ray_trial_id", pa.string()),
            ("reason", pa.string()),
            ("diverged", pa.bool_()),
            ("ray_errors", pa.int64()),
            ("pruned_at", pa.int64()),
            ("total_steps", pa.int64()),
            ("report_steps", pa.list_(pa.int64())),
            ("report_values", pa.list_(pa.float64())),
        ]
    )
    table = rows_to_table(rows, fixed)
    # The grid keys after `point`, the searched keys after `at_value`, as a reader scans them.
    grid = list(dict.fromkeys(k for s in studies for k in s.point))
    params = [k for k in table.column_names if k not in fixed.names and k not in grid]
    names = fixed.names
    at = names.index("at_value") + 1
    return table.select(names[:2] + grid + names[2:at] + params + names[at:])
