"""analysis.load on the committed experiment folders (tests/experiments: the tiny quickstart
sweep and the sweep with an errored trial, as real sweeps wrote them), without Ray. Every
expected value is read from the trial folders with plain json (`raw_trials`), not through the
code under test; files are broken on copies.

One Ray test runs both sweeps for real and checks that the committed folders still match what
a sweep writes; another loads a real sweep through Ray's ResultGrid.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import HOSTILE, TINY_EXPERIMENTS, raw_trials
from make_tiny_experiment import text_files

from analysis import load, tune_files
from lbs_tune.errors import UserError
from lbs_tune.experiment import CACHE_DIR, STATE_FILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(tiny_quickstart, tmp_path) -> Path:
    """A private copy of the quickstart experiment folder, without its cache."""
    target = tmp_path / "quickstart"
    shutil.copytree(tiny_quickstart, target, ignore=shutil.ignore_patterns(CACHE_DIR))
    return target


def trial_of(trials, trial_id: str) -> dict:
    (row,) = [r for r in trials.to_pylist() if r["trial_id"] == trial_id]
    return row


def reports_of(history, trial_id: str) -> int:
    return history["trial_id"].to_pylist().count(trial_id)


def raw_of(experiment: Path, key: tuple):
    (trial,) = [t for t in raw_trials(experiment) if t.key == key]
    return trial


# ============================================================================ Tables


def test_trials_table_has_one_row_per_trial_with_config_state_and_finals(tiny_quickstart):
    trials, _ = load(tiny_quickstart, cache=False)
    raw = raw_trials(tiny_quickstart)
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
        assert row["final/total_steps"] == last["total_steps"] == 5760 // t.key[0]
        assert row["final/peak_lr"] == last["peak_lr"]
        assert row["final/val/accuracy"] == last["val/accuracy"]
        assert row["best/val/accuracy"] == max(r["val/accuracy"] for r in t.reports)
        assert row["best/train/loss"] == min(r["train/loss"] for r in t.reports)
        assert row["final/time_s"] == last["time_s"] and row["final/host"] == last["host"]
        assert row["final/gpu_ids"] == last["gpu_ids"] != ""  # 0.25 of a fake GPU each
        assert row["diverged"] is last["diverged"]
        assert row["error"] is None and row["num_failures"] == 0
        assert row["start_time"] <= row["end_time"]
    # The loss bound of 3 stops the largest linearly scaled LR (1.6 at B=256), and only it.
    diverged = [t.key for t in raw if t.reports[-1]["diverged"]]
    assert diverged and {(b, r) for b, r, _ in diverged} == {(256, "linear")}
    assert trials["diverged"].to_pylist().count(True) == len(diverged)


def test_history_has_one_row_per_report_in_step_order(tiny_quickstart):
    _, history = load(tiny_quickstart, cache=False)
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
    # Counts are whole numbers; a metric this sweep does not measure is an empty column.
    kinds = {name: str(history.schema.field(name).type) for name in history.column_names}
    assert kinds["total_steps"] == kinds["bn_batch"] == kinds["target/step"] == "int64"
    assert kinds["diverged"] == "bool" and kinds["val/loss"] == kinds["peak_lr"] == "double"
    assert history["noise/b_simple"].null_count == history.num_rows
    raw = raw_trials(tiny_quickstart)
    assert history.num_rows == sum(len(t.reports) for t in raw)
    for t in raw:
        rows = [r for r in history.to_pylist() if r["trial_id"] == t.trial_id]
        assert [r["step"] for r in rows] == [r["step"] for r in t.reports]
        for name in ("val/accuracy", "train/loss", "test/loss", "lr", "images_per_s"):
            assert [r[name] for r in rows] == [r[name] for r in t.reports], name
        for name in ("total_steps", "peak_lr", "bn_batch", "node_id", "checkpoint_dir_name"):
            assert [r[name] for r in rows] == [r[name] for r in t.reports], name
        assert rows[0]["timestamp"].timestamp() == t.reports[0]["timestamp"]
    # B=16, 5760 examples: 360 steps, a report every 45 (half an epoch of 1440).
    b16 = raw_of(tiny_quickstart, (16, "none", 0))
    assert [r["step"] for r in b16.reports] == [45, 90, 135, 180, 225, 270, 315, 360]


def test_an_errored_trial_carries_its_error_and_no_end_time(tiny_broken):
    trials, history = load(tiny_broken, cache=False)
    raw = {t.config["dataset"]: t for t in raw_trials(tiny_broken)}
    failed = trial_of(trials, raw["cifar10"].trial_id)
    assert failed["state"] == "ERROR" and failed["reports"] == 0
    assert failed["num_failures"] == 1
    # Ray records -inf as the last result time of a trial that never reported.
    assert failed["end_time"] is None and failed["start_time"] is not None
    assert failed["final/step"] is None and failed["diverged"] is False
    last_line = (raw["cifar10"].folder / "error.txt").read_text().strip().splitlines()[-1]
    assert failed["error"] == last_line
    assert failed["error"].startswith("lbs_tune.errors.UserError: cifar10: CIFAR-10 files missing")
    assert f"data {HOSTILE}/cifar-10-batches-py" in failed["error"]
    finished = trial_of(trials, raw["synthetic"].trial_id)
    assert finished["state"] == "TERMINATED" and finished["error"] is None
    assert history.num_rows == len(raw["synthetic"].reports)


def test_a_file_uri_loads_like_its_path_and_carries_the_sweep_record(tiny_quickstart):
    by_uri = load(f"file://{tiny_quickstart}", cache=False)
    by_path = load(tiny_quickstart, cache=False)
    assert by_uri.trials.equals(by_path.trials) and by_uri.history.equals(by_path.history)
    assert by_uri.sweep == json.loads((tiny_quickstart / "lbs_sweep.json").read_text())
    assert by_uri.sweep["spec"]["target"] == {"metric": "val/accuracy", "value": 0.3}
    assert by_uri.sweep["spec"]["description"] == f"quickstart, tiny {HOSTILE}"


def test_not_an_experiment_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such experiment folder"):
        load(tmp_path / "missing")
    with pytest.raises(UserError, match="not a Ray Tune experiment folder"):
        load(tmp_path)


def test_loading_imports_neither_torch_nor_ray_nor_pandas(copy):
    # A fresh interpreter: this one has imported all three. First load, then the cached one.
    code = (
        "import sys, analysis; analysis.load(sys.argv[1]); analysis.load(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(copy)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
    assert (copy / CACHE_DIR / "manifest.json").exists()


# ============================================================================ Configs


def test_a_trial_missing_from_the_state_file_is_named_by_its_reports(copy):
    # Ray writes its state every few seconds: a trial started since has a folder but no entry.
    (state,) = [p for p in copy.iterdir() if STATE_FILE.match(p.name)]
    content = json.loads(state.read_text())
    trial = raw_of(copy, (64, "linear", 1))
    content["trial_data"] = [
        pair for pair in content["trial_data"] if json.loads(pair[0])["trial_id"] != trial.trial_id
    ]
    state.write_text(json.dumps(content))
    trials, history = load(copy, cache=False)
    row = trial_of(trials, trial.trial_id)
    assert row["folder"] == trial.folder.name and row["state"] is None
    assert reports_of(history, trial.trial_id) == len(trial.reports)
    assert (row["batch_size"], row["lr.scaling"], row["seed"]) == trial.key  # its params.json
    assert row["reports"] == len(trial.reports) and trials.num_rows == 12
    assert trials["trial_id"].to_pylist() == sorted(trials["trial_id"].to_pylist())


def test_a_state_file_with_indented_trial_records_reads_the_same(copy):
    # Ray writes a trial's run-time record indented over many lines in some of its versions.
    before, _ = load(copy, cache=False)
    (state,) = [p for p in copy.iterdir() if STATE_FILE.match(p.name)]
    content = json.loads(state.read_text())
    content["trial_data"] = [
        [trial, json.dumps(json.loads(runtime), indent=2)]
        for trial, runtime in content["trial_data"]
    ]
    state.write_text(json.dumps(content))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after, _ = load(copy, cache=False)
    assert after.equals(before)
    assert after["num_failures"].to_pylist() == [0] * 12
    assert after["end_time"].null_count == 0


def test_a_state_file_caught_while_ray_rewrites_it_is_read_again(copy, monkeypatch):
    before, _ = load(copy, cache=False)
    (state,) = [p for p in copy.iterdir() if STATE_FILE.match(p.name)]
    whole = state.read_text()
    state.write_text(whole[: len(whole) // 2])
    pauses = []

    def ray_finishes_its_copy(seconds: float) -> None:
        pauses.append(seconds)
        state.write_text(whole)

    # The loader's pause before it reads again is when Ray's copy completes.
    monkeypatch.setattr(tune_files.time, "sleep", ray_finishes_its_copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after, _ = load(copy, cache=False)
    assert pauses == [tune_files.STATE_RETRY_S]
    assert after.equals(before)


def test_a_half_copied_newer_state_file_is_passed_over_for_the_one_before(copy):
    # A resumed sweep starts a state file of its own; its driver may be copying it right now.
    before, _ = load(copy, cache=False)
    (state,) = [p for p in copy.iterdir() if STATE_FILE.match(p.name)]
    newer = copy / "experiment_state-2999-01-01_00-00-00.json"
    newer.write_text(state.read_text()[:1000])
    with pytest.warns(UserWarning, match=f"{newer.name}: unreadable .*; read {state.name} instead"):
        after, _ = load(copy, cache=False)
    assert after.equals(before)
    newer.write_text("")
    state.write_text("")
    with pytest.warns(UserWarning) as caught:
        unknown, _ = load(copy, cache=False)
    assert [str(w.message).split(": unreadable")[0].rsplit("/", 1)[1] for w in caught] == [
        newer.name,
        state.name,
    ]
    assert str(caught[1].message).endswith("; trial states are unknown")
    # Without Ray's states: the folders, their params.json and their reports still make the rows.
    assert unknown["state"].to_pylist() == [None] * 12
    assert unknown.select(["trial_id", "folder", "batch_size", "final/step"]).equals(
        before.select(["trial_id", "folder", "batch_size", "final/step"])
    )


def test_a_config_key_of_mixed_kinds_becomes_text(copy):
    (state,) = [p for p in copy.iterdir() if STATE_FILE.match(p.name)]
    content = json.loads(state.read_text())
    trial_json = json.loads(content["trial_data"][0][0])
    trial_json["config"]["eval_batch_size"] = "sixty-four"
    content["trial_data"][0][0] = json.dumps(trial_json)
    state.write_text(json.dumps(content))
    trials, _ = load(copy, cache=False)
    # Text stays text, numbers are written as JSON: all of them remain readable and groupable.
    ids, values = trials["trial_id"].to_pylist(), trials["eval_batch_size"].to_pylist()
    sizes = dict(zip(ids, values, strict=True))
    assert sizes.pop(trial_json["trial_id"]) == "sixty-four"
    assert list(sizes.values()) == ["64"] * 11
    assert trials["batch_size"].type == "int64" and trials["data.shape"].to_pylist()[0] == [
        3,
        32,
        32,
    ]


# ============================================================================ Broken files


def test_a_truncated_last_line_is_skipped_with_a_warning(copy):
    trial = raw_of(copy, (64, "none", 0))
    rows = sum(len(t.reports) for t in raw_trials(copy))
    path = trial.folder / "result.json"
    with path.open("ab") as f:
        f.write(b'{"step": 91, "epoch": 4.1, "val/accura')
    with pytest.warns(UserWarning, match=r"result\.json: the last line is incomplete") as caught:
        trials, history = load(copy, cache=False)
    assert trial.folder.name in str(caught[0].message)
    assert history.num_rows == rows
    assert trial_of(trials, trial.trial_id)["final/step"] == 90


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


def test_the_second_load_comes_from_the_parquet_cache(copy, monkeypatch):
    first = load(copy)
    assert (copy / ".lbs_cache" / "trials.parquet").exists()
    manifest = json.loads((copy / ".lbs_cache" / "manifest.json").read_text())
    assert sum(p.endswith("result.json") for p in manifest["files"]) == 12

    def no_parsing(*args):
        raise AssertionError("parsed the files although nothing changed")

    # The package's `load` function hides its module of the same name.
    monkeypatch.setattr(importlib.import_module("analysis.load"), "build", no_parsing)
    second = load(copy)
    assert second.trials.equals(first.trials) and second.history.equals(first.history)
    assert second.sweep == first.sweep


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


# ============================================================================ Real sweeps


def _keys(value, prefix: str = "") -> set[str]:
    """The dotted keys of a JSON value, nested objects included."""
    if not isinstance(value, dict):
        return set()
    return {prefix + k for k in value} | {
        key for k, v in value.items() for key in _keys(v, f"{prefix}{k}.")
    }


def _trial_key(trial) -> tuple:
    return (trial.config["dataset"], *trial.key)


def _state_keys(experiment: Path) -> tuple[set[str], dict[tuple, tuple]]:
    """The state file's top-level keys, and per trial id its status and the keys of its two
    JSON documents."""
    (state,) = [p for p in experiment.iterdir() if STATE_FILE.match(p.name)]
    content = json.loads(state.read_text())
    trials = {}
    for trial_json, runtime_json in content["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        trials[trial["trial_id"]] = (trial["status"], set(trial), set(runtime))
    return set(content), trials


def _compare(live: Path, committed: Path) -> None:
    """The committed copy of a sweep has what a sweep of the same spec writes now: the same
    files, the same keys in each, the same reports (steps, fields, divergence; not timings)."""
    fix = "run tests/make_tiny_experiment.py and commit tests/experiments"
    live_record = json.loads((live / "lbs_sweep.json").read_text())
    committed_record = json.loads((committed / "lbs_sweep.json").read_text())
    assert _keys(live_record) == _keys(committed_record), fix
    assert live_record["spec"]["grid"] == committed_record["spec"]["grid"], fix
    live_trials = {_trial_key(t): t for t in raw_trials(live)}
    committed_trials = {_trial_key(t): t for t in raw_trials(committed)}
    assert sorted(live_trials) == sorted(committed_trials), fix
    live_top, live_state = _state_keys(live)
    committed_top, committed_state = _state_keys(committed)
    assert live_top == committed_top, fix
    for key, fresh in live_trials.items():
        old = committed_trials[key]
        files = {p.name for p in text_files(live) if p.parent.name == fresh.folder.name}
        assert files == {p.name for p in text_files(committed) if p.parent.name == old.folder.name}
        assert live_state[fresh.trial_id] == committed_state[old.trial_id], (key, fix)
        assert _keys(fresh.config) == _keys(old.config), (key, fix)
        assert [set(r) for r in fresh.reports] == [set(r) for r in old.reports], (key, fix)
        for field in ("step", "examples", "epoch", "total_steps", "diverged"):
            assert [r[field] for r in fresh.reports] == [r[field] for r in old.reports], (key, fix)
        # Every checkpoint that a report names is a folder of the trial.
        for name in {r["checkpoint_dir_name"] for r in fresh.reports} - {None}:
            assert (fresh.folder / name).is_dir()
        if (fresh.folder / "error.txt").exists():
            # The message names the data folder, a temporary one in each run.
            errors = [
                (t.folder / "error.txt").read_text().strip().splitlines()[-1].replace(folder, "")
                for t, folder in (
                    (fresh, live_record["spec"]["base"]["data"]["dir"]),
                    (old, committed_record["spec"]["base"]["data"]["dir"]),
                )
            ]
            assert errors[0] == errors[1], fix


@pytest.mark.ray
def test_the_committed_experiments_match_what_a_sweep_writes_now(
    quickstart_experiment, broken_experiment
):
    _compare(quickstart_experiment, TINY_EXPERIMENTS / "quickstart")
    _compare(broken_experiment, TINY_EXPERIMENTS / "broken")
    # The runner records the commit it ran at.
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    record = json.loads((quickstart_experiment / "lbs_sweep.json").read_text())
    assert record["git_commit"].removesuffix("+dirty") == head


@pytest.mark.ray
def test_a_result_grid_loads_like_its_folder(quickstart_experiment):
    from ray.tune import ExperimentAnalysis, ResultGrid

    grid = ResultGrid(ExperimentAnalysis(str(quickstart_experiment)))
    by_grid, by_path = load(grid, cache=False), load(quickstart_experiment, cache=False)
    assert by_grid.trials.equals(by_path.trials)
    assert by_grid.history.equals(by_path.history)
