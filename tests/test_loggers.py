"""The sweep's loggers: TensorBoard event files by optimizer step (read back with a TFRecord
reader written here, CRCs checked, independent of lbs_tune.loggers), MLflow through its own API
and W&B from its offline run files, each checked against Ray's result.json."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from conftest import tiny_base, write_spec
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

from lbs_tune.errors import UserError
from lbs_tune.loggers import (
    AUTO_LOGGERS_OFF,
    BY_EXAMPLES,
    TensorBoard,
    callbacks,
    run_name,
    without_auto_loggers,
)
from lbs_tune.names import own_metrics
from lbs_tune.spec import load_spec
from lbs_tune.storage import locate

# Keys of a report that are Ray's or where the trial ran: never a TensorBoard scalar.
NOT_METRICS = {"done", "should_checkpoint", "training_iteration", "trial_id", "time_s", "pid"}


# ---------------------------------------------------------------------------- Readers


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(path: Path) -> list[Event]:
    """Every Event of a TensorBoard event file, each record's two CRCs checked."""
    raw, at, found = path.read_bytes(), 0, []
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[at + 8 : at + 12])[0] == _masked(crc32c(header))
        data = raw[at + 12 : at + 12 + length]
        assert struct.unpack("<I", raw[at + 12 + length : at + 16 + length])[0] == _masked(
            crc32c(data)
        )
        event = Event()
        event.ParseFromString(data)
        found.append(event)
        at += 16 + length
    return found


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every event file of a run folder, in file order."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for event in tfrecords(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def hparams(run: Path) -> dict[str, object]:
    """The HParams of a run (its session start info, which it holds once)."""
    found = []
    for path in run.glob("events.out.tfevents.*"):
        for event in tfrecords(path):
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = HParamsPluginData()
                    data.ParseFromString(value.metadata.plugin_data.content)
                    start = data.session_start_info.hparams
                    found.append({k: getattr(v, v.WhichOneof("kind")) for k, v in start.items()})
    assert len(found) <= 1
    return found[0] if found else {}


def result_rows(trial: Path) -> list[dict]:
    """A trial's result.json, of a step reported twice the last row, in step order."""
    rows = {}
    for line in (trial / "result.json").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


# ---------------------------------------------------------------------------- Without Ray


def test_run_names_are_the_grid_keys_that_vary():
    config = {"batch_size": 64, "lr": {"scaling": "linear", "base": 0.123456}, "seed": 0}
    assert run_name(config, ["batch_size", "lr.scaling"]) == "bs=64,lr.scaling=linear"
    assert run_name(config, ["lr.base"]) == "lr.base=0.1235"
    assert run_name(config, []) == "base"
    searched = {**config, "search": {"study": "batch_size=64", "point": 1, "number": 3}}
    assert run_name(searched, ["batch_size"]) == "bs=64,trial=3"
    confirming = {**config, "search": {"study": "batch_size=64", "point": 1, "confirm": 3}}
    assert run_name(confirming, ["batch_size"]) == "bs=64,confirm=3"  # not trial 3's name
    assert run_name({"data": {"dir": "/a b/c"}}, ["data.dir"]) == "data.dir=_a_b_c"


def test_only_the_trials_own_finite_numbers_are_metrics():
    row = {
        "step": 90,
        "examples": 2880,
        "val/accuracy": 0.5,
        "train/loss": float("nan"),
        "diverged": False,
        "replayed": True,
        "done": False,
        "training_iteration": 3,
        "host": "vm",
    }
    assert own_metrics(row) == {"examples": 2880, "val/accuracy": 0.5}


def test_a_missing_logger_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", tiny_base(), loggers={"mlflow": {}})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"loggers.mlflow .*pip install 'lbs-tune\[mlflow\]'"):
        callbacks(load_spec(spec), locate(tmp_path / "results" / "s"))


def test_ray_adds_no_logger_of_its_own_only_while_a_sweep_fits(monkeypatch):
    """A plain Tuner fitted later in the same process (a notebook's) gets Ray's own loggers."""
    monkeypatch.delenv(AUTO_LOGGERS_OFF, raising=False)
    with without_auto_loggers():
        assert os.environ[AUTO_LOGGERS_OFF] == "1"
    assert AUTO_LOGGERS_OFF not in os.environ
    monkeypatch.setenv(AUTO_LOGGERS_OFF, "0")
    with pytest.raises(KeyboardInterrupt), without_auto_loggers():
        raise KeyboardInterrupt
    assert os.environ[AUTO_LOGGERS_OFF] == "0"


def test_loggers_are_no_part_of_the_digest(tmp_path):
    plain = load_spec(write_spec(tmp_path / "a.yaml", tiny_base()))
    logged = load_spec(
        write_spec(tmp_path / "a.yaml", tiny_base(), loggers={"wandb": {"mode": "offline"}})
    )
    assert plain.digest() == logged.digest()


class _Storage(StorageContext):
    """Ray's StorageContext whose driver staging folder is the experiment folder itself (as
    after Ray copied it to the storage), without a Ray session."""

    def __init__(self, folder: Path):
        super().__init__(storage_path=str(folder.parent), experiment_dir_name=folder.name)
        self.folder = folder

    def _get_session_path(self) -> str:
        return str(self.folder.parent)

    @property
    def experiment_driver_staging_path(self) -> str:
        return str(self.folder)


def _trial(folder: Path) -> Trial:
    config = {"batch_size": 32, "lr": {"scaling": "none"}, "seed": 0}
    trial = Trial("train_trial", stub=True, config=config, trial_id="c0ffe_00000")
    trial.storage = _Storage(folder)
    trial.storage.trial_dir_name = "train_trial_c0ffe_00000"
    return trial


def _report(step: int, **changes) -> dict:
    """A result as Ray hands it to callbacks: the loop's metrics and Ray's own keys."""
    row = {
        "step": step,
        "examples": step * 32,
        "epoch": step / 45,
        "val/accuracy": step / 1000,
        "train/loss": 2.0 - step / 100,
        "diverged": False,
        "time_s": 1.0,
        "timestamp": 1_700_000_000 + step,
        "training_iteration": step // 45,
        "done": False,
        "trial_id": "c0ffe_00000",
    }
    return {**row, **changes}


def test_a_resumed_trial_writes_each_step_once(tmp_path):
    experiment = tmp_path / "sweep"
    trial = _trial(experiment)
    first = TensorBoard(["batch_size", "lr.scaling"], ["batch_size"], [])
    first.log_trial_start(trial)
    for step in (45, 90):
        first.log_trial_result(0, trial, _report(step))
    # The trial errors and is retried from its checkpoint at 45 within this run of the sweep.
    first.log_trial_end(trial, failed=True)
    first.log_trial_start(trial)
    for step in (45, 90):
        first.log_trial_result(0, trial, _report(step, replayed=step == 45))
    first.on_experiment_end([trial])  # the driver stops (killed: its writer flushed each step)
    # A new driver resumes the sweep: the trial sends its checkpoint's reports again, then
    # makes the step after its checkpoint (90) again, then goes on.
    second = TensorBoard(["batch_size", "lr.scaling"], ["batch_size"], [])
    second.log_trial_start(trial)
    second.log_trial_result(0, trial, _report(45, replayed=True))
    for step in (90, 135, 180):
        second.log_trial_result(0, trial, _report(step))
    second.log_trial_end(trial)
    run = experiment / "tensorboard" / "bs=32"
    assert len(list(run.glob("events.out.tfevents.*"))) == 3
    found = scalars(run)
    assert [s for s, _ in found["val/accuracy"]] == [45, 90, 135, 180]
    assert found["val/accuracy"] == [(s, pytest.approx(s / 1000)) for s in (45, 90, 135, 180)]
    assert [s for s, _ in found[BY_EXAMPLES + "train/loss"]] == [s * 32 for s in (45, 90, 135, 180)]
    assert not set(found) & NOT_METRICS and "diverged" not in found
    assert hparams(run) == {"batch_size": 32.0, "lr.scaling": "none"}


# ---------------------------------------------------------------------------- With Ray


@pytest.mark.ray
def test_a_sweep_writes_tensorboard_runs_by_step_and_no_ray_event_files(reference):
    runs = {p.name: p for p in (reference / "tensorboard").iterdir()}
    assert sorted(runs) == [
        "bs=32,lr.scaling=linear",
        "bs=32,lr.scaling=none",
        "bs=64,lr.scaling=linear",
        "bs=64,lr.scaling=none",
    ]
    for trial in sorted(p.parent for p in reference.glob("*/params.json")):
        config = json.loads((trial / "params.json").read_text())
        name = f"bs={config['batch_size']},lr.scaling={config['lr']['scaling']}"
        found, rows = scalars(runs[name]), result_rows(trial)
        for metric in ("val/accuracy", "train/loss", "lr", "examples"):
            expected = [(r["step"], pytest.approx(r[metric], rel=1e-6)) for r in rows]
            assert found[metric] == expected, (name, metric)
        by_examples = [(r["examples"], pytest.approx(r["val/loss"], rel=1e-6)) for r in rows]
        assert found[BY_EXAMPLES + "val/loss"] == by_examples
        assert not set(found) & NOT_METRICS and "step" not in found
        assert hparams(runs[name]) == {
            "batch_size": float(config["batch_size"]),
            "lr.scaling": config["lr"]["scaling"],
        }
        # Ray's own TensorBoard logger is off; its JSON and CSV loggers are on.
        assert not list(trial.glob("events.out.tfevents.*"))
        assert (trial / "progress.csv").exists()


def _mlflow_sweep(tmp_path: Path, address: str) -> tuple[Path, str]:
    from lbs_tune.runner import run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = {"mlflow": {"tracking_uri": uri}, "wandb": {"mode": "offline", "project": "lbs"}}
    base = tiny_base(epochs=1)
    spec = write_spec(tmp_path / "logged.yaml", base, {"batch_size": [32, 64]}, loggers=loggers)
    assert run(spec, storage=str(tmp_path / "results"), address=address) == 0
    return tmp_path / "results" / "logged", uri


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file (`run-*.wandb`: a LevelDB-style log of
    Record protos in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto.wandb_internal_pb2 import Record

    raw, at, pending, rows, block = run_file.read_bytes(), 7, b"", [], 32768
    assert raw[:4] == b":W&B"
    while at + 7 <= len(raw):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack_from("<IHB", raw, at)
        pending += raw[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


@pytest.mark.ray
def test_mlflow_and_wandb_get_the_trials_metrics_by_step(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    experiment, uri = _mlflow_sweep(tmp_path, ray_cluster.address)
    trials = {
        json.loads((p / "params.json").read_text())["batch_size"]: p
        for p in (q.parent for q in experiment.glob("*/params.json"))
    }
    client = MlflowClient(tracking_uri=uri)
    (mlflow_experiment,) = [e for e in client.search_experiments() if e.name == "logged"]
    runs = client.search_runs([mlflow_experiment.experiment_id])
    assert sorted(int(r.data.params["batch_size"]) for r in runs) == [32, 64]
    for found in runs:
        assert found.info.status == "FINISHED" and found.data.tags["lbs_tune.sweep"] == "logged"
        rows = result_rows(trials[int(found.data.params["batch_size"])])
        history = client.get_metric_history(found.info.run_id, "val/accuracy")
        assert [(m.step, m.value) for m in history] == [
            (r["step"], pytest.approx(r["val/accuracy"])) for r in rows
        ]
        assert not set(found.data.metrics) & (NOT_METRICS | {"diverged", "step"})
    for batch, trial in trials.items():
        # The offline runs are in the experiment folder, one per trial (named by its id).
        trial_id = result_rows(trial)[0]["trial_id"]
        (run_file,) = experiment.glob(f"wandb/offline-run-*-{trial_id}/run-{trial_id}.wandb")
        logged = wandb_history(run_file)
        rows = result_rows(trial)
        assert [(h["step"], h["val/accuracy"]) for h in logged] == [
            (r["step"], pytest.approx(r["val/accuracy"])) for r in rows
        ], batch
        assert not set(logged[0]) & NOT_METRICS
