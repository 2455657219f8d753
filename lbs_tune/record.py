"""The sweep record, `lbs_sweep.json` in the experiment folder: the spec and its digest, and one
entry per run (when, the command, the machine, the commit, the data folders); a damaged record is
the same one-line error for every reader (`parse_record`). No torch and no Ray here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lbs_tune import __version__
from lbs_tune.errors import UserError
from lbs_tune.experiment import SWEEP_FILE, count_outcomes, read_state, state_files
from lbs_tune.storage import Location


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit(folder: Path) -> str | None:
    """The commit checked out in `folder` ('+dirty' if it has changes); outside git, the one
    that $LBS_GIT_COMMIT names (the Docker image sets it to the commit it was built from)."""
    outside = os.environ.get("LBS_GIT_COMMIT") or None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return outside
    if commit.returncode != 0:
        return outside
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def has_record(experiment: Location) -> bool:
    return experiment.join(SWEEP_FILE).exists()


def read_record(experiment: Location) -> dict[str, Any]:
    """The sweep's lbs_sweep.json; a damaged one is the user's to restore (UserError)."""
    meta = experiment.join(SWEEP_FILE)
    return parse_record(meta.read_bytes(), meta.uri)


def parse_record(raw: bytes, uri: str) -> dict[str, Any]:
    """The sweep record in `raw` (the bytes of lbs_sweep.json at `uri`). One policy for every
    reader and writer: a damaged record (not JSON, not an object, no spec or digest) is a
    one-line UserError that says how to restore or replace it."""
    try:
        record = json.loads(raw)
        problem = None if isinstance(record, dict) else "not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = f"not valid JSON: {exc}"
    if problem is None:
        missing = [k for k in ("spec", "digest") if k not in record]
        problem = f"no {' and '.join(missing)}" if missing else None
    if problem:
        raise UserError(
            f"{uri}: damaged sweep record ({problem}); restore it, or run the sweep file "
            "with --fresh to move this sweep aside and start again"
        )
    return record


def write_record(experiment: Location, record: dict[str, Any]) -> None:
    experiment.join(SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")


def record_start(
    experiment: Location,
    spec: dict[str, Any],
    digest: str,
    recorded: dict[str, Any] | None,
    data_dirs: list[str],
    extra: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write lbs_sweep.json at the start of a run: the spec (as JSON) and its digest, version,
    commit, command and times. Every run (the first and each resume) is an entry of `runs` with
    its own start, command, lbs-tune version, git commit, data folders and `machine` (the
    versions and hardware of lbs_tune.provenance, when given); a resume whose code or data
    differ from the first run's is warned about in one line. `extra` joins a new record (e.g.
    where a searched sweep's studies live). Returns the record."""
    command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    run = {
        "started": now_iso(),
        "command": command,
        "lbs_tune_version": __version__,
        "git_commit": git_commit(Path.cwd()),
        "data_dirs": data_dirs,
        **({"machine": machine} if machine is not None else {}),
    }
    record = recorded or {
        "name": spec["name"],
        "spec": spec,
        "digest": digest,
        "lbs_tune_version": run["lbs_tune_version"],
        "git_commit": run["git_commit"],
        "command": command,
        "started": run["started"],
        "storage": experiment.uri,
        **(extra or {}),
        "runs": [],
    }
    differ = mixed_runs([*record["runs"], run])
    if differ:
        print(
            f"lbs-tune: warning: this run differs from the sweep's first: {differ}", file=sys.stderr
        )
    record["runs"] = [*record["runs"], run]
    record["ended"] = None
    write_record(experiment, record)
    return record


def mixed_runs(runs: list[dict[str, Any]]) -> str:
    """What the last of a sweep's runs has that differs from its first (lbs-tune version, git
    commit, data folders), as 'key: first -> last; ...'; '' if nothing (or one run)."""
    if len(runs) < 2:
        return ""
    first, last = runs[0], runs[-1]
    keys = ("lbs_tune_version", "git_commit", "data_dirs")
    # Runs recorded before these keys existed carry none of them: nothing to compare.
    return "; ".join(
        f"{k}: {first.get(k)} -> {last.get(k)}"
        for k in keys
        if k in first and k in last and first[k] != last[k]
    )


def record_end(experiment: Location) -> None:
    """Stamp the end time into lbs_sweep.json."""
    record = read_record(experiment)
    record["ended"] = now_iso()
    write_record(experiment, record)


def finished_sweep(experiment: Location, digest: str, count: int) -> str | None:
    """One line saying that the sweep of `digest` in `experiment` is finished, if it is: its
    record has that digest, and Ray's newest experiment state holds `count` trials, each ended
    (TERMINATED; an errored one would be resumed). None otherwise, also for a folder without
    such a state or with an unreadable one (running the sweep then tells). Reads two files (and
    a searched sweep's studies); needs neither Ray nor the lock."""
    if not has_record(experiment) or read_record(experiment).get("digest") != digest:
        return None
    names = state_files(experiment)
    trials = read_state(experiment.join(names[0])) if names else None
    if trials is None or len(trials) != count or any(t.state != "TERMINATED" for t in trials):
        return None
    # A searched sweep's trials count as their studies count them (read only then: pydantic).
    from lbs_tune.studies import diverged_as_told, read_studies, told_by_ray_id

    told = told_by_ray_id(read_studies(experiment.path)) if experiment.is_local else {}
    counts = count_outcomes(
        (t.state, diverged_as_told(t.diverged, told.get(t.trial_id))) for t in trials
    )
    line = ", ".join(f"{n} {label}" for label, n in counts.items() if label != "running or pending")
    return (
        f"sweep {read_record(experiment).get('name')} is finished ({line}) in {experiment.uri}: "
        f"nothing to run; next: lbs-tune report {experiment.uri}"
    )
