"""analysis.load on real sweep folders: the tiny quickstart sweep and the sweep with an errored
trial (conftest), made once per test run. Every expected value is read from the trial folders
with plain json (`raw_trials`), not through the code under test; files are broken on copies.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import HOSTILE, raw_trials

from analysis import load
from lbs_tune.errors import UserError
from lbs_tune.experiment import CACHE_DIR


@pytest.fixture
def copy(quickstart_experiment, tmp_path) -> Path:
    """A private copy of the quickstart experiment folder, without its cache."""
    target = tmp_path / "quickstart"
    shutil.copytree(quickstart_experiment, target, ignore=shutil.ignore_patterns(CACHE_DIR))
    return target


def trial_of(trials, trial_id: str) -> dict:
    (row,) = [r for r in trials.to_pylist() if r["trial_id"] == trial_id]
    return row


def raw_of(experiment: Path, key: tuple):
    (trial,) = [t for t in raw_trials(experiment) if t.key == key]
    return trial


# ============================================================================ Tables


@pytest.mark.ray
def test_trials_table_has_one_row_per_trial_with_config_state_and_finals(quickstart_experiment):
    trials, _ = load(quickstart_experiment, cache=False)
    raw = raw_trials(quickstart_experiment)
    assert trials["trial_id"].to_pylist() == [t.trial_id for t in raw]
    assert sorted(t.key for t in raw) == sorted(
        (b, r, s) for b in (16, 64, 256) for r in ("none", "linear") for s in (0, 1)
    )
    for t in raw:
        row = trial_of(trials, t.trial_id)
        last = t.reports[-1]
        assert row["folder"] == t.folder.name and row["state"] == t.state == "TERMINATED"
        assert (row["batch_size"], row["lr.scaling"], row["seed"]) == t.key
        assert row["lr.base"] == 0.1 and row["eval_batch_size"] == 64
        assert row["reports"] == len(t.reports)
        assert row["final/step"] == last["step"] and row["final/examples"] == last["examples"]
        assert row["final/val/accuracy"] == last["val/accuracy"]
        assert row["best/val/accuracy"] == max(r["val/accuracy"] for r in t.reports)
        assert row["best/train/loss"] == min(r["train/loss"] for r in t.reports)
        assert row["final/time_s"] == last["time_s"] and row["final/host"] == last["host"]
        assert row["final/gpu_ids"] == last["gpu_ids"] != ""  # 0.25 of a fake GPU each
        assert row["diverged"] is last["diverged"]
        assert row["error"] is None and row["num_failures"] == 0
        assert row["start_time"] <= row["end_time"]
    # The loss bound of 3 stops exactly one trial: B=256, linear rule (LR 1.6), seed 0.
    assert [t.key for t in raw if t.reports[-1]["diverged"]] == [(256, "linear", 0)]
    assert trials["diverged"].to_pylist().count(True) == 1


@pytest.mark.ray
def test_history_has_one_row_per_report_in_step_order(quickstart_experiment):
    _, history = load(quickstart_experiment, cache=False)
    assert history.column_names[:7] == [
        "trial_id",
        "step",
        "epoch",
        "examples",
        "training_iteration",
        "timestamp",
        "time_s",
    ]
    assert "config" not in history.column_names
    raw = raw_trials(quickstart_experiment)
    assert history.num_rows == sum(len(t.reports) for t in raw)
    for t in raw:
        rows = [r for r in history.to_pylist() if r["trial_id"] == t.trial_id]
        assert [r["step"] for r in rows] == [r["step"] for r in t.reports]
        for name in ("val/accuracy", "train/loss", "test/loss", "lr", "images_per_s"):
            assert [r[name] for r in rows] == [r[name] for r in t.reports], name
        assert [r["checkpoint_dir_name"] for r in rows] == [
            r["checkpoint_dir_name"] for r in t.reports
        ]
        assert rows[0]["timestamp"].timestamp() == t.reports[0]["timestamp"]
    # B=16, 5760 examples: 360 steps, a report every 45 (half an epoch of 1440).
    b16 = raw_of(quickstart_experiment, (16, "none", 0))
    assert [r["step"] for r in b16.reports] == [45, 90, 135, 180, 225, 270, 315, 360]


@pytest.mark.ray
def test_an_errored_trial_carries_its_error_and_no_end_time(broken_experiment):
    trials, history = load(broken_experiment, cache=False)
    raw = {t.config["dataset"]: t for t in raw_trials(broken_experiment)}
    failed = trial_of(trials, raw["cifar10"].trial_id)
    assert failed["state"] == "ERROR" and failed["reports"] == 0
    assert failed["num_failures"] == 1
    # Ray records -inf as the last result time of a trial that never reported.
    assert failed["end_time"] is None and failed["start_time"] is not None
    last_line = (raw["cifar10"].folder / "error.txt").read_text().strip().splitlines()[-1]
    assert failed["error"] == last_line
    assert failed["error"].startswith("lbs_tune.errors.UserError: cifar10: CIFAR-10 files missing")
    assert f"data {HOSTILE}/cifar-10-batches-py" in failed["error"]
    finished = trial_of(trials, raw["synthetic"].trial_id)
    assert finished["state"] == "TERMINATED" and finished["error"] is None
    assert history.num_rows == len(raw["synthetic"].reports)


@pytest.mark.ray
def test_a_result_grid_loads_like_its_folder(quickstart_experiment):
    from ray.tune import ExperimentAnalysis, ResultGrid

    grid = ResultGrid(ExperimentAnalysis(str(quickstart_experiment)))
    by_grid, by_path = load(grid, cache=False), load(quickstart_experiment, cache=False)
    assert by_grid.trials.equals(by_path.trials)
    assert by_grid.history.equals(by_path.history)


@pytest.mark.ray
def test_a_file_uri_loads_like_its_path_and_carries_the_sweep_record(quickstart_experiment):
    by_uri = load(f"file://{quickstart_experiment}", cache=False)
    by_path = load(quickstart_experiment, cache=False)
    assert by_uri.history.equals(by_path.history)
    assert by_uri.sweep["spec"]["target"] == {"metric": "val/accuracy", "value": 0.3}
    assert by_uri.sweep["spec"]["description"] == f"quickstart, tiny {HOSTILE}"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert by_path.sweep["git_commit"].removesuffix("+dirty") == head


def test_not_an_experiment_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such experiment folder"):
        load(tmp_path / "missing")
    with pytest.raises(UserError, match="not a Ray Tune experiment folder"):
        load(tmp_path)


# ============================================================================ Broken files


@pytest.mark.ray
def test_a_truncated_last_line_is_skipped_with_a_warning(copy):
    trial = raw_of(copy, (64, "linear", 0))
    rows = sum(len(t.reports) for t in raw_trials(copy))
    path = trial.folder / "result.json"
    with path.open("ab") as f:
        f.write(b'{"step": 91, "epoch": 4.1, "val/accura')
    with pytest.warns(UserWarning, match=r"result\.json: the last line is incomplete") as caught:
        trials, history = load(copy, cache=False)
    assert trial.folder.name in str(caught[0].message)
    assert history.num_rows == rows
    assert trial_of(trials, trial.trial_id)["final/step"] == 90


@pytest.mark.ray
def test_a_malformed_line_inside_a_file_is_skipped_and_the_rest_loaded(copy):
    trial = raw_of(copy, (16, "none", 1))
    rows = sum(len(t.reports) for t in raw_trials(copy))
    path = trial.folder / "result.json"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:40] + b"\n"  # a crash mid-line, then the resumed run appended
    path.write_bytes(b"".join(lines))
    with pytest.warns(UserWarning, match="line 3 is not a valid report"):
        _, history = load(copy, cache=False)
    steps = [r["step"] for r in history.to_pylist() if r["trial_id"] == trial.trial_id]
    assert steps == [45, 90, 180, 225, 270, 315, 360]
    assert history.num_rows == rows - 1


@pytest.mark.ray
def test_steps_reported_again_after_a_resume_keep_their_last_row(copy):
    trial = raw_of(copy, (64, "none", 0))
    path = trial.folder / "result.json"
    lines = path.read_text().splitlines()
    # Resumed from the checkpoint at step 44: steps 55 to 90 are reported again, differently.
    assert json.loads(lines[3])["checkpoint_dir_name"] == "checkpoint_000000"
    again = []
    for line in lines[4:]:
        row = json.loads(line)
        row["val/accuracy"] += 0.01
        again.append(json.dumps(row))
    path.write_text("\n".join(lines + again) + "\n")
    trials, history = load(copy, cache=False)
    rows = [r for r in history.to_pylist() if r["trial_id"] == trial.trial_id]
    assert [r["step"] for r in rows] == [11, 22, 33, 44, 55, 66, 77, 88, 90]
    expected = [r["val/accuracy"] for r in trial.reports]
    assert [r["val/accuracy"] for r in rows] == pytest.approx(
        expected[:4] + [v + 0.01 for v in expected[4:]]
    )
    row = trial_of(trials, trial.trial_id)
    assert row["final/val/accuracy"] == pytest.approx(expected[-1] + 0.01)
    assert row["reports"] == len(trial.reports)


# ============================================================================ Cache


@pytest.mark.ray
def test_the_second_load_comes_from_the_parquet_cache(copy, monkeypatch):
    first = load(copy)
    assert (copy / ".lbs_cache" / "trials.parquet").exists()
    manifest = json.loads((copy / ".lbs_cache" / "manifest.json").read_text())
    assert sum(p.endswith("result.json") for p in manifest["files"]) == 12

    def no_parsing(*args):
        raise AssertionError("parsed the files although nothing changed")

    # The package's `load` function hides its module of the same name.
    monkeypatch.setattr(importlib.import_module("analysis.load"), "_build", no_parsing)
    second = load(copy)
    assert second.trials.equals(first.trials) and second.history.equals(first.history)
    assert second.sweep == first.sweep


@pytest.mark.ray
def test_a_changed_result_file_refreshes_the_cache(copy):
    trials, history = load(copy)
    trial = raw_of(copy, (16, "linear", 0))
    path = trial.folder / "result.json"
    last = json.loads(path.read_text().splitlines()[-1])
    last.update(step=400, **{"val/accuracy": 0.95})
    with path.open("a") as f:
        f.write(json.dumps(last) + "\n")
    trials, again = load(copy)
    assert trial_of(trials, trial.trial_id)["final/val/accuracy"] == 0.95
    assert again.num_rows == history.num_rows + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(copy).history.num_rows == history.num_rows + 1
