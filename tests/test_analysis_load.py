"""analysis.load on a real Ray Tune experiment folder: tables, resumes, truncation, the cache.

`make_experiment` runs a real `ray.tune.Tuner` whose trainable reports made-up but exact metrics
under our names, so every number below is worked out by hand from `fake_accuracy`. It is the one
place to swap for a real (quickstart) sweep later. test_report.py shares the folder.
"""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from analysis import export, load
from analysis.load import CACHE_DIR
from lbs_tune.errors import UserError
from lbs_tune.spec import SweepSpec, set_dotted

BATCH_SIZES = [32, 128, 512]
RULES = ["none", "linear"]
SEEDS = [0, 1]
REPORTS = 6
TARGET = 0.52
# A config string that must reach the report as text, never as markup.
HOSTILE = "<script>alert(1)</script>"
BASE = {
    "dataset": "mnist1d",
    "data": {"samples": 4000, "dir": f"/data/{HOSTILE}"},
    "model": "mlp",
    "batch_size": 32,
    "seed": 0,
    "examples": REPORTS * 512,
    "lr": {"base": 0.05, "base_batch_size": 32, "scaling": "none"},
    "device": "cpu",
}
GRID = {"batch_size": BATCH_SIZES, "lr.scaling": RULES, "seed": SEEDS}


def fake_accuracy(batch_size: int, rule: str, seed: int, report: int) -> float:
    """val/accuracy at report 1..6: the linear rule keeps pace at every batch size, no scaling
    slows down as sqrt(32 / B); seed 1 is 0.05 ahead; capped at 0.9."""
    rate = 0.2 if rule == "linear" else 0.2 * (32 / batch_size) ** 0.5
    return min(0.9, rate * report + 0.05 * seed)


def fake_step(batch_size: int, report: int) -> int:
    """Reports every 512 examples: at steps 16, 32, ... for B=32 and 1, 2, ... for B=512."""
    return report * 512 // batch_size


def make_experiment(tmp_dir: Path) -> Path:
    """A real Tune experiment folder of the fake sweep under `tmp_dir`, with lbs_sweep.json.

    12 trials: batch size x LR rule x seed. At B=512 with the linear rule, seed 0 diverges at
    its second report (null losses) and seed 1 raises after its second report (ERROR state).
    """
    from ray import cloudpickle, tune

    # Trial processes cannot import this test module: send its functions along by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def trainable(config):
        batch, rule, seed = config["batch_size"], config["lr"]["scaling"], config["seed"]
        lr = config["lr"]["base"] * (batch / 32 if rule == "linear" else 1.0)
        for report in range(1, REPORTS + 1):
            if (batch, rule, seed) == (512, "linear", 1) and report == 3:
                raise RuntimeError(f"trial blew up {HOSTILE}")
            diverged = (batch, rule, seed) == (512, "linear", 0) and report == 2
            accuracy = 0.1 if diverged else fake_accuracy(batch, rule, seed, report)
            step = fake_step(batch, report)
            tune.report(
                {
                    "step": step,
                    "epoch": report / 2,
                    "examples": step * batch,
                    "lr": lr,
                    "train/loss": None if diverged else 1.1 - accuracy,
                    "train/accuracy": accuracy - 0.05,
                    "val/loss": None if diverged else 1.0 - accuracy,
                    "val/accuracy": accuracy,
                    "images_per_s": 100.0 * batch,
                    "diverged": diverged,
                    "time_s": 0.5 * report,
                    "host": "fakehost",
                    "gpu_ids": "",
                    "device": "cpu",
                }
            )
            if diverged:
                return

    space = json.loads(json.dumps(BASE))
    for key, values in GRID.items():
        set_dotted(space, key, tune.grid_search(values))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name="fake",
            storage_path=str(tmp_dir),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    tuner.fit()
    folder = tmp_dir / "fake"
    spec = SweepSpec(
        name="fake",
        description=f"made-up metrics {HOSTILE}",
        base=BASE,
        grid=GRID,
        target={"metric": "val/accuracy", "value": TARGET},
    )
    record = {
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "digest": spec.digest(),
        "lbs_tune_version": "0.1.0",
        "git_commit": "0123abc",
        "command": ["lbs-tune", "run", "fake.yaml"],
        "started": started,
        "ended": datetime.now(UTC).isoformat(timespec="seconds"),
        "storage": str(tmp_dir),
    }
    (folder / "lbs_sweep.json").write_text(json.dumps(record, indent=2))
    return folder


@functools.cache
def _built(root: Path) -> Path:
    return make_experiment(root / "sweeps")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (started here unless something else started it)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": a cluster that another process started (`ray start`) is not ours.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def experiment(ray_session, tmp_path_factory) -> Path:
    """The fake sweep's folder, built once per test run; copy it before changing anything."""
    return _built(tmp_path_factory.getbasetemp())


@pytest.fixture
def copy(experiment, tmp_path) -> Path:
    """A private copy of the experiment folder, without its cache."""
    target = tmp_path / "fake"
    shutil.copytree(experiment, target, ignore=shutil.ignore_patterns(CACHE_DIR))
    return target


def result_file(folder: Path, trial_id: str) -> Path:
    (path,) = folder.glob(f"*{trial_id}*/result.json")
    return path


def trial_of(trials, **config) -> dict:
    rows = [r for r in trials.to_pylist() if all(r[k] == v for k, v in config.items())]
    assert len(rows) == 1, config
    return rows[0]


# ============================================================================ Tables


def test_trials_table_has_one_row_per_trial_with_config_state_and_finals(experiment):
    trials, _ = load(experiment, cache=False)
    assert trials.num_rows == 12
    assert trials["trial_id"].to_pylist() == sorted(trials["trial_id"].to_pylist())
    columns = trials.column_names
    for column in ("batch_size", "lr.scaling", "lr.base", "seed", "data.dir", "state"):
        assert column in columns
    assert {"final/val/accuracy", "best/val/loss", "final/host", "final/device"} <= set(columns)

    none_128_seed1 = trial_of(trials, **{"batch_size": 128, "lr.scaling": "none", "seed": 1})
    assert none_128_seed1["state"] == "TERMINATED"
    assert none_128_seed1["reports"] == REPORTS
    assert none_128_seed1["final/val/accuracy"] == pytest.approx(0.65)
    assert none_128_seed1["best/val/loss"] == pytest.approx(0.35)
    assert none_128_seed1["final/step"] == 24
    assert none_128_seed1["final/examples"] == 24 * 128
    assert none_128_seed1["final/time_s"] == 3.0
    assert none_128_seed1["final/host"] == "fakehost"
    assert none_128_seed1["data.dir"] == f"/data/{HOSTILE}"
    assert none_128_seed1["error"] is None and not none_128_seed1["diverged"]
    assert none_128_seed1["start_time"] <= none_128_seed1["end_time"]

    diverged = trial_of(trials, **{"batch_size": 512, "lr.scaling": "linear", "seed": 0})
    assert diverged["diverged"] and diverged["state"] == "TERMINATED"
    assert diverged["reports"] == 2
    assert diverged["final/val/loss"] is None  # null stays null: no value, not NaN
    assert diverged["best/val/loss"] == pytest.approx(0.8)  # from the report before
    assert diverged["final/val/accuracy"] == pytest.approx(0.1)

    errored = trial_of(trials, **{"batch_size": 512, "lr.scaling": "linear", "seed": 1})
    assert errored["state"] == "ERROR"
    assert errored["error"] == f"RuntimeError: trial blew up {HOSTILE}"
    assert errored["reports"] == 2 and errored["end_time"] is not None
    assert sum(trials["error"].is_valid().to_pylist()) == 1


def test_history_has_one_row_per_report_in_step_order(experiment):
    trials, history = load(experiment, cache=False)
    assert history.num_rows == 10 * REPORTS + 2 + 2
    assert history.column_names[:7] == [
        "trial_id",
        "step",
        "epoch",
        "examples",
        "training_iteration",
        "timestamp",
        "time_s",
    ]
    trial = trial_of(trials, **{"batch_size": 32, "lr.scaling": "none", "seed": 0})["trial_id"]
    rows = [r for r in history.to_pylist() if r["trial_id"] == trial]
    assert [r["step"] for r in rows] == [16, 32, 48, 64, 80, 96]
    assert [r["val/accuracy"] for r in rows] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.9, 0.9])
    assert rows[0]["timestamp"].year >= 2024
    assert "config" not in history.column_names


def test_a_result_grid_loads_like_its_folder(experiment):
    from ray.tune import ExperimentAnalysis, ResultGrid

    grid = ResultGrid(ExperimentAnalysis(str(experiment)))
    by_grid, by_path = load(grid, cache=False), load(experiment, cache=False)
    assert by_grid.trials.equals(by_path.trials)
    assert by_grid.history.equals(by_path.history)


def test_a_file_uri_loads_like_its_path_and_carries_the_sweep_record(experiment):
    by_uri, by_path = load(f"file://{experiment}", cache=False), load(experiment, cache=False)
    assert by_uri.history.equals(by_path.history)
    assert by_uri.sweep["spec"]["target"] == {"metric": "val/accuracy", "value": TARGET}
    assert by_path.sweep["git_commit"] == "0123abc"


def test_not_an_experiment_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such experiment folder"):
        load(tmp_path / "missing")
    with pytest.raises(UserError, match="not a Ray Tune experiment folder"):
        load(tmp_path)


# ============================================================================ Broken files


def test_a_truncated_last_line_is_skipped_with_a_warning(copy):
    trials, _ = load(copy, cache=False)
    trial = trial_of(trials, **{"batch_size": 128, "lr.scaling": "linear", "seed": 0})["trial_id"]
    path = result_file(copy, trial)
    with path.open("ab") as f:
        f.write(b'{"step": 28, "epoch": 3.5, "val/accura')
    with pytest.warns(UserWarning, match=r"result\.json: the last line is incomplete") as caught:
        trials, history = load(copy, cache=False)
    assert path.parent.name in str(caught[0].message)
    assert history.num_rows == 64
    assert trial_of(trials, trial_id=trial)["final/step"] == 24


def test_a_malformed_line_inside_a_file_is_skipped_and_the_rest_loaded(copy):
    trials, _ = load(copy, cache=False)
    trial = trial_of(trials, **{"batch_size": 32, "lr.scaling": "none", "seed": 1})["trial_id"]
    path = result_file(copy, trial)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:40] + b"\n"  # a crash mid-line, then the resumed run appended
    path.write_bytes(b"".join(lines))
    with pytest.warns(UserWarning, match="line 3 is not a valid report"):
        _, history = load(copy, cache=False)
    steps = [r["step"] for r in history.to_pylist() if r["trial_id"] == trial]
    assert steps == [16, 32, 64, 80, 96]
    assert history.num_rows == 63


def test_steps_reported_again_after_a_resume_keep_their_last_row(copy):
    trials, _ = load(copy, cache=False)
    trial = trial_of(trials, **{"batch_size": 128, "lr.scaling": "none", "seed": 0})["trial_id"]
    path = result_file(copy, trial)
    lines = path.read_text().splitlines()
    # Resumed from the checkpoint at step 16: steps 20 and 24 are reported again, differently.
    again = []
    for line in lines[-2:]:
        row = json.loads(line)
        row["val/accuracy"] += 0.01
        again.append(json.dumps(row))
    path.write_text("\n".join(lines + again) + "\n")
    trials, history = load(copy, cache=False)
    rows = [r for r in history.to_pylist() if r["trial_id"] == trial]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    assert [r["val/accuracy"] for r in rows][-2:] == pytest.approx([0.51, 0.61])
    assert trial_of(trials, trial_id=trial)["final/val/accuracy"] == pytest.approx(0.61)
    assert trial_of(trials, trial_id=trial)["reports"] == REPORTS


# ============================================================================ Cache and export


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


def test_a_changed_result_file_refreshes_the_cache(copy):
    trials, _ = load(copy)
    trial = trial_of(trials, **{"batch_size": 32, "lr.scaling": "linear", "seed": 0})["trial_id"]
    path = result_file(copy, trial)
    last = json.loads(path.read_text().splitlines()[-1])
    last.update(step=112, **{"val/accuracy": 0.95})
    with path.open("a") as f:
        f.write(json.dumps(last) + "\n")
    trials, history = load(copy)
    assert trial_of(trials, trial_id=trial)["final/val/accuracy"] == 0.95
    assert history.num_rows == 65
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(copy).history.num_rows == 65


def test_export_writes_parquet_that_pandas_reads(experiment, tmp_path):
    paths = export(experiment, tmp_path / "out")
    assert [Path(p).name for p in paths] == ["trials.parquet", "history.parquet"]
    trials = pq.read_table(paths[0])
    assert json.loads(trials.schema.metadata[b"lbs_sweep"])["name"] == "fake"
    frame = pq.read_table(paths[1]).to_pandas()
    assert len(frame) == 64 and frame["val/accuracy"].max() == pytest.approx(0.9)
