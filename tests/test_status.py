"""`lbs-tune status`, `where` and `export` on the committed real sweeps (tests/experiments:
the tiny quickstart sweep and the sweep with an errored trial), without Ray; and, with Ray, on
the sweep with an errored trial while it ran (watched from a thread).

Expected values come from the trial folders, read with plain json (`raw_trials`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HOSTILE, raw_trials

from analysis.status import where

HEADER = [
    "trial",
    "batch_size",
    "lr.scaling",
    "seed",
    "state",
    "step",
    "latest val/accuracy",
    "best",
    "diverged",
    "host / node / gpu",
    "failures",
    "last checkpoint",
    "started",
]


def table(out: str) -> list[dict[str, str]]:
    """The rows of a status table, by column; columns are at least two spaces apart."""
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("trial  ")))
    header = re.split(r"\s{2,}", lines[start])
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(dict(zip(header, re.split(r"\s{2,}", line), strict=True)))
    return rows


def table_or_none(out: str) -> list[dict[str, str]]:
    return [] if "(no trials yet)" in out else table(out)


def local_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# ============================================================================ status


def test_status_of_a_finished_sweep(cli, tiny_quickstart):
    code, out, err = cli("status", "--wide", tiny_quickstart)
    assert code == 0 and err == ""
    record = json.loads((tiny_quickstart / "lbs_sweep.json").read_text())
    lines = out.splitlines()
    assert lines[0] == f"sweep quickstart at {tiny_quickstart}"
    assert lines[1] == (
        f"  git commit {record['git_commit']}, started {record['started']}, ended {record['ended']}"
    )
    assert lines[2] == "  12 trials: 12 terminated"
    assert re.split(r"\s{2,}", lines[4]) == HEADER
    rows = {row["trial"]: row for row in table(out)}
    raw = raw_trials(tiny_quickstart)
    assert sorted(rows) == [t.trial_id for t in raw]
    for t in raw:
        row, last = rows[t.trial_id], t.reports[-1]
        budget = 5760 // t.key[0]
        assert (row["batch_size"], row["lr.scaling"], row["seed"]) == tuple(map(str, t.key))
        assert row["state"] == "TERMINATED"
        assert row["step"] == f"{last['step']}/{budget}"
        assert row["latest val/accuracy"] == f"{last['val/accuracy']:.4g}"
        assert row["best"] == f"{max(r['val/accuracy'] for r in t.reports):.4g}"
        assert row["diverged"] == ("yes" if last["diverged"] else "no")
        node = last["node_id"][:8]
        assert row["host / node / gpu"] == f"{last['host']} node {node} gpu {last['gpu_ids']}"
        assert row["failures"] == "0"
        name, step = [
            (r["checkpoint_dir_name"], r["step"]) for r in t.reports if r["checkpoint_dir_name"]
        ][-1]
        assert row["last checkpoint"] == f"{name} (step {step})"
        assert local_time(record["started"]) <= row["started"] <= local_time(record["ended"])
    # Only the trials stopped by the loss bound (at B=256, linear rule) are short of the budget.
    short = [row for row in rows.values() if row["step"].split("/")[0] != row["step"].split("/")[1]]
    stopped = [t for t in raw if t.reports[-1]["diverged"]]
    assert stopped and all(t.key[:2] == (256, "linear") for t in stopped)
    assert [
        (r["batch_size"], r["lr.scaling"], r["seed"], r["step"], r["diverged"]) for r in short
    ] == [("256", "linear", str(t.key[2]), f"{t.reports[-1]['step']}/22", "yes") for t in stopped]


def test_status_shows_an_errored_trial_and_its_error(cli, tiny_broken):
    code, out, _ = cli("status", "--wide", tiny_broken)
    assert code == 0
    assert "  2 trials: 1 error, 1 terminated" in out.splitlines()
    raw = {t.config["dataset"]: t for t in raw_trials(tiny_broken)}
    rows = {row["dataset"]: row for row in table(out)}
    failed = rows["cifar10"]
    assert (failed["trial"], failed["state"]) == (raw["cifar10"].trial_id, "ERROR")
    # The step budget is what a trial reported (total_steps): one that never did shows no budget.
    assert (failed["step"], failed["failures"], failed["last checkpoint"]) == ("0", "1", "-")
    assert rows["synthetic"]["state"] == "TERMINATED" and rows["synthetic"]["step"] == "2880/2880"
    message = (raw["cifar10"].folder / "error.txt").read_text().strip().splitlines()[-1]
    errors = out[out.index("\nerrors:\n") :].splitlines()
    assert errors[2:] == [f"  {raw['cifar10'].trial_id}: {message}"]
    assert HOSTILE in message


@pytest.mark.ray
def test_status_and_where_answer_while_the_sweep_runs(broken_sweep):
    assert broken_sweep.failures == []
    # Snapshots taken before the runner stamped the end time into lbs_sweep.json.
    running = [
        (out, found)
        for out, found in broken_sweep.snapshots
        if "ended running or interrupted" in out
    ]
    states = [(row["state"], row["step"]) for out, _ in running for row in table_or_none(out)]
    assert ("PENDING", "0") in states, states
    middle = [s for s in states if s[0] == "RUNNING" and s[1] not in ("0", "2880/2880")]
    assert middle, states
    # The CIFAR-10 grid point is not a trial yet while the first one runs (max_concurrent 1).
    assert any("1 more trials not started" in out for out, _ in running)
    raw = {t.config["dataset"]: t for t in raw_trials(broken_sweep.folder)}
    found = [found for _, found in running]
    assert [str(raw["synthetic"].folder)] in found
    assert where(str(broken_sweep.folder), ["batch_size=16"]) == sorted(
        str(t.folder) for t in raw.values()
    )


def test_a_sweep_that_ray_has_not_written_to_yet(cli, tiny_quickstart, tmp_path):
    # The runner writes lbs_sweep.json first; Ray's files follow once the Tuner starts.
    folder = tmp_path / "quickstart"
    folder.mkdir()
    (folder / "lbs_sweep.json").write_text((tiny_quickstart / "lbs_sweep.json").read_text())
    code, out, _ = cli("status", folder)
    assert code == 0
    assert "  0 trials: none yet; 12 more trials not started" in out.splitlines()
    assert out.splitlines()[-1] == "(no trials yet)"
    assert cli("where", folder, "batch_size=64") == (0, "", "")
    code, _, err = cli("where", folder, "batch_sise=64")
    assert code == 2 and "(did you mean 'batch_size'?)" in err


def test_status_counts_every_trial_of_a_searched_sweep(cli, tiny_quickstart, tmp_path):
    # 12 grid points x 3 trials of each point's study: 36 trials, not 12 grid points.
    folder = tmp_path / "quickstart"
    folder.mkdir()
    record = json.loads((tiny_quickstart / "lbs_sweep.json").read_text())
    record["spec"]["search"] = {
        "space": {"optimizer.momentum": {"uniform": [0.8, 0.95]}},
        "trials_per_point": 3,
    }
    (folder / "lbs_sweep.json").write_text(json.dumps(record))
    code, out, _ = cli("status", folder)
    assert code == 0
    assert "  0 trials: none yet; 36 more trials not started" in out.splitlines()


def test_status_fits_120_columns_and_names_what_wide_adds(cli, tiny_quickstart):
    code, out, _ = cli("status", tiny_quickstart)
    assert code == 0
    lines = out.splitlines()
    narrow = [h for h in HEADER if h not in ("host / node / gpu", "last checkpoint", "started")]
    assert re.split(r"\s{2,}", lines[4]) == narrow
    assert all(len(line) <= 120 for line in lines[3:]), max(lines[3:], key=len)
    assert len(table(out)) == 12
    assert lines[-1] == "(more columns with --wide: host / node / gpu, last checkpoint, started)"
    # The same rows as --wide, in the same order.
    _, wide, _ = cli("status", "--wide", tiny_quickstart)
    assert [{h: r[h] for h in narrow} for r in table(wide)] == table(out)


def searched_copy(tiny_quickstart: Path, folder: Path) -> tuple[dict, dict]:
    """The tiny quickstart's 12 trials as a searched sweep: one study per batch size (16, 64,
    256) of 4 trials over optimizer.momentum, steps to val/accuracy >= 0.3. Each trial's
    params.json gets its search.point and a search.number in the reverse order of trial ids,
    and a momentum. Returns ({trial id: (point, number, momentum)}, {trial id: reports})."""
    shutil.copytree(tiny_quickstart, folder)
    shutil.rmtree(folder / ".lbs_cache", ignore_errors=True)
    record = json.loads((folder / "lbs_sweep.json").read_text())
    record["spec"]["grid"] = {"batch_size": [16, 64, 256]}
    record["spec"]["search"] = {
        "space": {"optimizer.momentum": {"uniform": [0.8, 0.95]}},
        "trials_per_point": 4,
        "objective": "steps_to_target",
    }
    (folder / "lbs_sweep.json").write_text(json.dumps(record))
    placed, reports, configs = {}, {}, {}
    raw = raw_trials(folder)
    for size in (16, 64, 256):
        mine = [t for t in raw if t.config["batch_size"] == size]
        for number, t in enumerate(reversed(mine)):
            momentum = 0.8 + 0.01 * number + 0.001 * size / 16
            config = {**t.config, "optimizer": {**t.config["optimizer"], "momentum": momentum}}
            point = (16, 64, 256).index(size)
            config["search"] = {"study": f"batch_size={size}", "point": point, "number": number}
            (t.folder / "params.json").write_text(json.dumps(config))
            configs[t.trial_id] = config
            placed[t.trial_id] = (point, number, momentum)
            reports[t.trial_id] = t.reports
    # Ray's experiment state holds each trial's config too (the one readers take first).
    (path,) = folder.glob("experiment_state-*.json")
    state = json.loads(path.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        trial["config"] = configs[trial["trial_id"]]
        entry[0] = json.dumps(trial)
    path.write_text(json.dumps(state))
    return placed, reports


def test_status_of_a_searched_sweep_by_point_and_number_with_its_objective(
    cli, tiny_quickstart, tmp_path
):
    placed, reports = searched_copy(tiny_quickstart, tmp_path / "quickstart")
    code, out, _ = cli("status", tmp_path / "quickstart")
    assert code == 0
    lines = out.splitlines()
    assert re.split(r"\s{2,}", lines[4])[:3] == ["trial", "batch_size", "optimizer.momentum"]
    assert all(len(line) <= 120 for line in lines[3:]), max(lines[3:], key=len)
    rows = table(out)
    assert [row["trial"] for row in rows] == sorted(placed, key=lambda i: placed[i][:2])
    for row in rows:
        momentum = placed[row["trial"]][2]
        assert row["optimizer.momentum"] == f"{momentum:.4g}"
        # Steps to target as the study counts them: the first report at or above 0.3.
        mine = reports[row["trial"]]
        hit = [r["step"] for r in mine if r["val/accuracy"] >= 0.3]
        if hit:
            expected = str(hit[0])
        elif mine[-1]["diverged"]:
            expected = "diverged"
        else:
            expected = f"missed (best {max(r['val/accuracy'] for r in mine):.4g})"
        assert row["steps to target"] == expected, row
    outcomes = {row["steps to target"].split(" ")[0] for row in rows}
    assert {"missed", "diverged"} <= outcomes and outcomes - {"missed", "diverged"}, outcomes


def test_status_imports_neither_torch_nor_ray_nor_pandas(tiny_quickstart, tmp_path):
    folder = tmp_path / "quickstart"
    shutil.copytree(tiny_quickstart, folder)
    # A fresh interpreter, as `lbs-tune status` runs: every number comes from the files.
    code = (
        "import sys; from lbs_tune.cli import main; main(['status', sys.argv[1]]); "
        "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"sweep quickstart at {folder}\n")
    assert done.stdout.endswith("\n[]\n")


# ============================================================================ where


def folders(experiment: Path, **config) -> list[str]:
    raw = raw_trials(experiment)
    return sorted(str(t.folder) for t in raw if all(t.config[k] == v for k, v in config.items()))


def test_where_matches_config_values_exactly(cli, tiny_quickstart):
    def found(*filters: str) -> list[str]:
        code, out, err = cli("where", tiny_quickstart, *filters)
        assert code == 0 and err == ""
        return sorted(out.splitlines())

    # Every trial has eval_batch_size 64 and lr.base_batch_size 16: a key is never a suffix.
    assert found("batch_size=64") == folders(tiny_quickstart, batch_size=64)
    assert len(found("batch_size=64")) == 4 and len(found("batch_size=16")) == 4
    assert len(found("eval_batch_size=64")) == 12
    linear = [t for t in raw_trials(tiny_quickstart) if t.config["lr"]["scaling"] == "linear"]
    assert found("lr.scaling=linear") == sorted(str(t.folder) for t in linear)
    assert len(found("lr.scaling=linear", "seed=1")) == 3
    assert len(found("lr.base=1e-1")) == 12  # a number that YAML reads as text
    (hit,) = found("batch_size=256", "lr.scaling=linear", "seed=0")
    assert json.loads((Path(hit) / "result.json").read_text().splitlines()[-1])["diverged"]
    assert found("batch_size=32") == []


def test_where_rejects_unknown_keys_and_malformed_filters(cli, tiny_quickstart):
    code, out, err = cli("where", tiny_quickstart, "batch_sise=64")
    assert (code, out) == (2, "")
    assert err == (
        "lbs-tune: error: batch_sise=64: no config key 'batch_sise' in this sweep "
        "(did you mean 'batch_size'?)\n"
    )
    code, _, err = cli("where", tiny_quickstart, "batch_size")
    assert code == 2 and err.count("\n") == 1 and "expected KEY=VALUE" in err


# ============================================================================ export


def test_export_writes_parquet_that_pyarrow_reads(cli, tiny_quickstart, tmp_path):
    code, out, _ = cli("export", tiny_quickstart, "-o", tmp_path / "out")
    paths = out.splitlines()
    assert code == 0 and [Path(p).name for p in paths] == ["trials.parquet", "history.parquet"]
    trials, history = (pq.read_table(p) for p in paths)
    raw = raw_trials(tiny_quickstart)
    assert sorted(trials["trial_id"].to_pylist()) == [t.trial_id for t in raw]
    assert json.loads(trials.schema.metadata[b"lbs_sweep"])["name"] == "quickstart"
    assert history.num_rows == sum(len(t.reports) for t in raw)
    best = max(r["val/accuracy"] for t in raw for r in t.reports)
    assert max(history["val/accuracy"].to_pylist()) == best
    frame = history.to_pandas()
    assert set(frame["trial_id"]) == {t.trial_id for t in raw}


def test_a_damaged_sweep_record_is_a_clear_error_everywhere(cli, tmp_path):
    experiment = tmp_path / "results" / "quickstart"
    experiment.mkdir(parents=True)
    (experiment / "lbs_sweep.json").write_text('{"spec": ')
    spec = Path(__file__).parent.parent / "sweeps" / "quickstart.yaml"
    storage = ("--storage", tmp_path / "results")
    for args in (
        ("run", spec, *storage, "--dry-run"),
        ("run", spec, *storage),
        ("resume", experiment),
        ("status", experiment),
    ):
        code, _, err = cli(*args)
        assert code == 2 and err.count("\n") == 1, args
        assert f"{experiment}/lbs_sweep.json: damaged sweep record (not valid JSON" in err, args
        assert "--fresh" in err
    assert (experiment / "lbs_sweep.json").read_text() == '{"spec": ', "left as it was"


@pytest.mark.parametrize("damage", ['{"spec": ', "[1, 2]", '{"name": "q"}'])
def test_a_damaged_record_of_a_sweep_with_trials_is_the_same_error_for_every_reader(
    cli, tiny_quickstart, tmp_path, damage
):
    experiment = tmp_path / "quickstart"
    shutil.copytree(tiny_quickstart, experiment)
    (experiment / "lbs_sweep.json").write_text(damage)
    errors = set()
    for args in (
        ("status", experiment),
        ("report", experiment),
        ("export", experiment, "-o", tmp_path / "out"),
        ("resume", experiment),
    ):
        code, _, err = cli(*args)
        assert code == 2 and err.count("\n") == 1, (args, err)
        errors.add(err)
    assert len(errors) == 1, errors
    assert f"{experiment}/lbs_sweep.json: damaged sweep record" in errors.pop()
    assert not (experiment / "report.html").exists() and not (tmp_path / "out").exists()
