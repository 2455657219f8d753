"""The columns of the two tables that `analysis.load` makes: the trials table's own fields,
and which of its columns are config keys."""

from __future__ import annotations

import pyarrow as pa

# The trials table's own columns; the config keys and the final/ and best/ columns follow them.
TRIAL_FIELDS = (
    "trial_id",
    "folder",
    "state",
    "error",
    "diverged",
    "reports",
    "num_failures",
    "start_time",
    "end_time",
)


def config_columns(trials: pa.Table) -> list[str]:
    """The dotted config keys among the columns of a trials table (derived columns have a '/')."""
    return [c for c in trials.column_names if c not in TRIAL_FIELDS and "/" not in c]
