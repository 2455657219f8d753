"""Sweeps on Ray Tune, end to end, on one Ray head shared by the test run.

Faults are injected for real: the driver is killed with SIGKILL and run again, a trial's worker
process is killed mid-run, and every trial's history and final metrics are checked exactly
against an uninterrupted sweep of the same spec.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import (
    driver_command,
    histories,
    plant_in_dead_staging,
    polling,
    staged_folders,
    states,
    sweep_spec,
    tiny_base,
    without_ray_lines,
    without_timing,
    write_spec,
)
from fixtures_formats import write_cifar10

from analysis.status import status
from lbs_tune.config import TrialConfig
from lbs_tune.rules import peak_lr
from lbs_tune.runner import run
from lbs_tune.spec import load_spec
from lbs_tune.training import ListReporter, train

SWEEPS = sorted(Path(__file__).parent.parent.joinpath("sweeps").glob("*.yaml"))
QUICKSTART_FILE = Path(__file__).parent.parent / "sweeps" / "quickstart.yaml"


def raw_steps(experiment: Path) -> dict[str, list[int]]:
    return {
        p.parent.name: [json.loads(line)["step"] for line in p.read_text().splitlines()]
        for p in experiment.glob("*/result.json")
    }


@pytest.mark.ray
def test_reference_sweep_files_and_reports(reference):
    meta = json.loads((reference / "lbs_sweep.json").read_text())
    assert meta["name"] == "tiny" and meta["digest"] and meta["ended"]
    assert meta["spec"]["grid"] == {"batch_size": [32, 64], "lr.scaling": ["none", "linear"]}
    assert meta["lbs_tune_version"] and meta["started"] <= meta["ended"]
    found = histories(reference)
    assert sorted(found) == [(32, "linear", 0), (32, "none", 0), (64, "linear", 0), (64, "none", 0)]
    # 1440 training examples: 45 steps per epoch at batch 32, 22 at batch 64.
    assert [r["step"] for r in found[(32, "none", 0)]] == [22, 44, 66, 88, 110, 132, 154, 176, 180]
    assert [r["step"] for r in found[(64, "none", 0)]][-1] == 90  # round(4 x 1440 / 64)
    last = found[(64, "linear", 0)][-1]
    assert last["lr"] == pytest.approx(0.1) and last["diverged"] is False
    assert last["host"] and last["device"] == "cpu" and last["gpu_ids"] == ""
    assert (list(reference.glob("*/checkpoint_*")) != []) and list(reference.glob("tuner.pkl"))


@pytest.mark.parametrize("spec", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_dry_runs(cli, spec, tmp_path):
    code, out, _ = cli("run", spec, "--dry-run", "--storage", tmp_path)
    loaded = load_spec(spec)
    grid = loaded.points()
    assert code == 0 and f"{loaded.trial_count} trials" in out
    assert out.count("[cpu ") == len(grid)


def test_the_quickstart_files_sqrt_rule_gives_its_trials_their_rates():
    """The shipped file as a user narrows it; it runs through Ray as `quickstart_experiment`
    (the linear rule and none) and the README's quickstart (all three rules)."""
    overrides = ["grid.batch_size=[16, 256]", "grid.lr.scaling=[sqrt]"]
    trials = load_spec(QUICKSTART_FILE, overrides).trials
    assert [(t.batch_size, t.lr.scaling, t.seed) for t in trials] == [
        (16, "sqrt", 0),
        (256, "sqrt", 0),
    ]
    assert [peak_lr(t.lr, t.batch_size) for t in trials] == pytest.approx([0.01, 0.01 * 4])


@pytest.mark.ray
@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar10_wrn.yaml"])
def test_cifar_files_run_tiny_on_real_cifar_files(ray_cluster, tmp_path, name):
    write_cifar10(tmp_path / "data", n_train=40, n_test=8)
    overrides = [
        f"base.data.dir={tmp_path / 'data'}",
        "base.data.val_fraction=0.2",
        "base.steps=1",
        "base.eval_batch_size=8",
        "grid.batch_size=[8]",
        "grid.seed=[0]",
        "grid.lr.scaling=[linear]",
        "resources.cpu=1",
    ]
    if name == "cifar10_wrn.yaml":
        # WRN-28-10 takes 20 s a step on 2 CPU cores; the file's accumulation and ghost batch
        # norm run at the same ratios to the batch, scaled down.
        overrides += ["base.model=wrn16_4", "base.max_device_batch=4", "base.ghost_batch_size=2"]
    spec = Path(__file__).parent.parent / "sweeps" / name
    assert run(spec, overrides, storage=str(tmp_path / "results"), address=ray_cluster.address) == 0
    (rows,) = histories(tmp_path / "results" / load_spec(spec, overrides).name).values()
    assert rows[-1]["step"] == 1 and rows[-1]["gpu_ids"] != "", "the 0.25/0.5 GPU request is kept"


@pytest.mark.ray
def test_driver_killed_with_sigkill_then_rerun_completes_exactly(ray_cluster, reference, tmp_path):
    spec = sweep_spec(tmp_path, "tiny")
    storage = tmp_path / "results"
    driver = subprocess.Popen(
        driver_command(spec, storage, ray_cluster.address),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill once two trials have checkpoints (they reach the storage as they are made) and Ray
    # has saved its state there.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        folder = storage / "tiny"
        if len({p.parent for p in folder.glob("*/checkpoint_*")}) >= 2 and states(folder):
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the driver finished before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_at = raw_steps(storage / "tiny")
    # The rerun joins the same Ray, where Ray takes up the killed driver's staging folder: what
    # the driver wrote there and never copied must not reach the rerun's files. (It did: a trial
    # unknown to Ray's saved state was filed twice, one that started again kept old reports.)
    plant_in_dead_staging(storage / "tiny", reference)
    killed_state = states(storage / "tiny")[-1]

    # The same command again resumes and completes the sweep. Meanwhile the sweep record stays
    # whole for its readers: Ray copies the experiment's .json files into its staging folder on
    # resume and back over the storage's at each sync, in place (a reader once found it empty).
    record, broken = storage / "tiny" / "lbs_sweep.json", []

    def read_record() -> None:
        try:
            json.loads(record.read_text())
        except ValueError as exc:
            broken.append(exc)

    with polling(read_record, every_s=0.002):
        assert run(spec, storage=str(storage), address=ray_cluster.address) == 0
    assert broken == []
    (staged,) = staged_folders(storage / "tiny", killed_state)
    assert not (staged / "lbs_sweep.json").exists(), "Ray would copy it back over the record"
    assert len(list((storage / "tiny").glob("train_trial_*"))) == 4, "a trial folder twice"
    expected, found = histories(reference), histories(storage / "tiny")
    assert sorted(found) == sorted(expected)
    for key, rows in expected.items():
        assert [without_timing(r) for r in found[key]] == [without_timing(r) for r in rows], key
    # Reports made after the last checkpoint were made again: result.json may hold a step twice
    # (the analysis keeps the last); none of them is lost and none is missing.
    for trial, steps in raw_steps(storage / "tiny").items():
        assert steps[: len(killed_at.get(trial, []))] == killed_at.get(trial, [])
    meta = json.loads((storage / "tiny" / "lbs_sweep.json").read_text())
    assert len(meta["runs"]) == 2 and meta["ended"]


@pytest.mark.ray
def test_resume_command_and_finished_sweep(cli, ray_cluster, reference):
    code, out, _ = cli("resume", reference, "--address", ray_cluster.address)
    assert code == 0 and "4 finished, 0 diverged, 0 errored" in out


@pytest.mark.ray
def test_other_spec_under_the_same_name_is_refused_then_fresh_moves_it_aside(
    cli, ray_cluster, reference, tmp_path
):
    spec = sweep_spec(tmp_path, "tiny", lr__base=0.07)
    storage = reference.parent
    code, _, err = cli("run", spec, "--storage", storage, "--address", ray_cluster.address)
    assert code == 2 and "with another spec (base.lr.base: 0.05 -> 0.07)" in err
    assert "--fresh" in err and "Traceback" not in err
    before = sorted(p.name for p in storage.iterdir())
    code, out, _ = cli("run", spec, "--storage", storage, "--dry-run")
    assert code == 0 and sorted(p.name for p in storage.iterdir()) == before
    assert "another spec is there (base.lr.base: 0.05 -> 0.07): running would be refused" in out


@pytest.mark.ray
def test_fake_gpus_are_assigned_and_fractions_pack(ray_cluster, tmp_path):
    import ray
    import ray.util.state

    base = tiny_base(steps=100, eval_every=10, checkpoint_every=10)
    spec = write_spec(
        tmp_path / "gpus.yaml",
        base,
        {"seed": list(range(6))},
        resources={"cpu": 0.25, "gpu": {"32": 0.5, "default": 1}},
    )

    # On an idle cluster: the trials of a driver killed by an earlier test may hold CPUs, GPUs
    # and placement groups until Ray notices that their job is gone; then the ten trials would
    # wait, and start one by one on whichever GPU is free.
    def busy() -> dict[str, float]:
        free, total = ray.available_resources(), ray.cluster_resources()
        held = {k: total[k] - free.get(k, 0) for k in ("CPU", "GPU") if total[k] > free.get(k, 0)}
        groups = ray.util.state.list_placement_groups(
            address=ray_cluster.dashboard, filters=[("state", "=", "CREATED")], limit=1000
        )
        return held | ({"placement groups": len(groups)} if groups else {})

    deadline = time.monotonic() + 120
    while held := busy():
        assert time.monotonic() < deadline, f"still held: {held}"
        time.sleep(0.5)
    # Ray reserves each trial's resources as a placement group: count those reserved at once.
    reserved = [0]

    def watch() -> None:
        groups = ray.util.state.list_placement_groups(
            address=ray_cluster.dashboard, filters=[("state", "=", "CREATED")], limit=1000
        )
        reserved[0] = max(reserved[0], len(groups))

    with polling(watch, every_s=0.1):
        assert run(spec, storage=str(tmp_path), address=ray_cluster.address) == 0
    results = tmp_path.glob("gpus/*/result.json")
    ids = [json.loads(p.read_text().splitlines()[-1])["gpu_ids"] for p in results]
    # Distinct GPUs (which of the four a trial ends on depends on the order Ray starts them).
    assert len(ids) == 6 and {"0", "1", "2", "3"} >= set(ids) and len(set(ids)) >= 3
    # 0.5 GPU per trial: all 6 at once on 4 GPUs, so fractions packed two to a GPU.
    assert reserved[0] == 6


@pytest.mark.ray
def test_trial_killed_mid_run_is_retried_from_its_checkpoint(ray_cluster, reference, tmp_path):
    spec = sweep_spec(tmp_path, "tiny")
    storage = tmp_path / "results"
    killed = []

    import ray.util.state

    def trial_actors() -> dict[str, int]:
        actors = ray.util.state.list_actors(
            address=ray_cluster.dashboard, filters=[("state", "=", "ALIVE")], limit=10_000
        )
        # 'ImplicitFunc', or 'wrap_function.<locals>.ImplicitFunc' when Ray pickled it by value
        return {a.actor_id: a.pid for a in actors if a.class_name.endswith("ImplicitFunc")}

    def training(pid: int) -> bool:
        # Ray titles an actor's process by the method it runs: "ray::ImplicitFunc.train" while
        # it trains; a finished trial's actor, kept for reuse, is idle.
        try:
            return b"ImplicitFunc.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    earlier = set(trial_actors())  # of earlier tests' sweeps, maybe not yet cleaned up

    def kill_one_worker() -> bool:
        # Checkpoints reach the storage as they are made, a moment before Ray's driver takes
        # the report that registers one: kill the process of a trial that has two (its first
        # surely registered) and is still training. A trial's process works in its trial's
        # folder (Ray Tune's working directory per trial): its cwd names the trial.
        made = {p.parent.name for p in (storage / "tiny").glob("*/checkpoint_000001")}
        for actor, pid in trial_actors().items() if made else ():
            try:
                trial = Path(os.readlink(f"/proc/{pid}/cwd")).name
            except OSError:
                continue
            if actor not in earlier and trial in made and training(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return True
        return False

    with polling(kill_one_worker, every_s=0.05):
        assert run(spec, storage=str(storage), address=ray_cluster.address) == 0
    assert killed, "no trial was killed"
    expected, found = histories(reference), histories(storage / "tiny")
    for key, rows in expected.items():
        assert [without_timing(r) for r in found[key]] == [without_timing(r) for r in rows], key
    state = json.loads(sorted((storage / "tiny").glob("experiment_state-*.json"))[-1].read_text())
    failures = {
        json.loads(t)["trial_id"]: json.loads(m)["num_failures"] for t, m in state["trial_data"]
    }
    assert sorted(failures.values()) == [0, 0, 0, 1]
    # The killed trial resumed from its checkpoint: it first sent that checkpoint's reports again.
    retried = [
        p for p in (storage / "tiny").glob("*/result.json") if '"replayed": true' in p.read_text()
    ]
    assert len(retried) == 1
    # The failure stays visible in status: its count in the table, its error below it.
    trial_id = json.loads(retried[0].read_text().splitlines()[0])["trial_id"]
    text = status(str(storage / "tiny"), wide=True)
    (row,) = [line for line in text.splitlines() if line.startswith(trial_id)]
    assert "  1  " in row
    assert "errors:" in text and trial_id in text.split("errors:")[1]


@pytest.mark.ray
def test_gauges_reach_the_prometheus_endpoint(ray_cluster, tmp_path):
    """A sweep's gauges, scraped while it runs and until they show (Ray exports them on its
    report interval, and drops a series a few exports after its worker stops sending it);
    those of earlier sweeps may still be there, under another `sweep` tag."""
    # About 4 s of reports: several of the test cluster's 1 s export intervals, even loaded.
    base = tiny_base(steps=5000, eval_every=100, checkpoint_every=5000)
    spec = write_spec(tmp_path / "gauges.yaml", base, {"batch_size": [32]}, resources={"cpu": 1})
    url = f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics"
    wanted = {"ray_lbs_step", "ray_lbs_train_loss", "ray_lbs_images_per_s"}
    found: set[str] = set()

    def scrape() -> bool:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found.update(
            line.split("{")[0]
            for line in text.splitlines()
            if line.startswith("ray_lbs_")
            and 'sweep="gauges"' in line
            and 'batch_size="32"' in line
        )
        return wanted <= found

    with polling(scrape, every_s=0.2):
        assert run(spec, storage=str(tmp_path), address=ray_cluster.address) == 0
    # Those not seen yet may show in the exports that follow the sweep's end.
    deadline = time.monotonic() + 60
    while not scrape() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wanted <= found, found


@pytest.mark.ray
def test_dashboard_is_on_and_needs_the_token(ray_cluster):
    url = f"{ray_cluster.dashboard}/api/version"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    assert json.loads(urllib.request.urlopen(request, timeout=10).read())["ray_version"]


def test_git_commit_of_the_working_directory_or_of_the_image(tmp_path, monkeypatch):
    from lbs_tune.record import git_commit

    monkeypatch.delenv("LBS_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("LBS_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(repo) == head.strip()
    (repo / "a.txt").write_text("b")
    assert git_commit(repo) == head.strip() + "+dirty"


def test_missing_dataset_files_stop_a_local_sweep_before_it_starts(cli, tmp_path):
    missing = tmp_path / "no-data"
    base = tiny_base(dataset="cifar10", model="lenet", data__dir=str(missing))
    spec = write_spec(tmp_path / "cifar.yaml", base, {"seed": [0, 1]})
    code, _, err = cli("run", spec, "--storage", tmp_path / "results")
    assert code == 2 and err.count("\n") == 1
    assert f"CIFAR-10 files missing from {missing}/cifar-10-batches-py" in err
    assert not (tmp_path / "results").exists(), "nothing is written"


def test_a_damaged_tune_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, data_dir):
    from ray import tune

    from lbs_tune.checkpoints import save_checkpoint
    from lbs_tune.errors import UserError
    from lbs_tune.experiment import CHECKPOINT_FILE
    from lbs_tune.trainable import tune_resume_state

    trial = tmp_path / "train_trial_00000"
    for index in range(3):
        folder = trial / f"checkpoint_{index:06d}"
        state = {"step": index, "finished": False, "model": {}, "optimizer": {}}
        save_checkpoint(
            {**state, "sampler": {}, "rng": {}, "reports": []}, folder / CHECKPOINT_FILE
        )
    (trial / "checkpoint_000002" / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 truncated")
    (trial / "checkpoint_000001" / CHECKPOINT_FILE).unlink()

    state = tune_resume_state(tune.Checkpoint(str(trial / "checkpoint_000002")))
    assert state["step"] == 0
    err = without_ray_lines(capsys.readouterr().err).splitlines()
    assert "checkpoint_000002/state.pt: corrupted or truncated checkpoint" in err[0]
    assert err[0].endswith("resuming from checkpoint_000000")
    assert "checkpoint_000001/state.pt: cannot read" in err[1]
    assert err[1].endswith("resuming from checkpoint_000000")
    assert (trial / "checkpoint_000002" / CHECKPOINT_FILE).exists(), "nothing is deleted"

    # The oldest one damaged too: nothing to resume from.
    (trial / "checkpoint_000000" / CHECKPOINT_FILE).write_bytes(b"")
    with pytest.raises(UserError, match="no earlier checkpoint to resume from"):
        tune_resume_state(tune.Checkpoint(str(trial / "checkpoint_000002")))


@pytest.mark.ray
def test_a_trial_that_raises_is_retried_and_its_error_stays_visible(ray_cluster, tmp_path):
    """CIFAR-10 arrives late: the trial raises (a data file is missing), Ray retries it, the
    file is put back after the first failure, and the retry trains exactly as an unhindered run."""
    data = tmp_path / "data"
    write_cifar10(data, n_train=40, n_test=8)
    late = data / "cifar-10-batches-py" / "data_batch_3"
    content = late.read_bytes()
    late.unlink()
    base = tiny_base(
        dataset="cifar10", model="lenet", data__dir=str(data), data__val_fraction=0.2,
        batch_size=8, epochs=2, eval_batch_size=8,
    )  # fmt: skip
    spec = write_spec(tmp_path / "late.yaml", base, {"seed": [0]}, max_failures=10)

    class PutBackAfterTheFirstFailure(logging.Handler):
        """Tune's controller logs each trial failure before it schedules the retry (with Ray's
        own output on: the quiet console turns that log off)."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Trial task failed") and not late.exists():
                late.write_bytes(content)

    controller = logging.getLogger("ray.tune.execution.tune_controller")
    handler = PutBackAfterTheFirstFailure(level=logging.ERROR)
    controller.addHandler(handler)
    storage = tmp_path / "results"
    try:
        assert run(spec, storage=str(storage), address=ray_cluster.address, verbose=True) == 0
    finally:
        controller.removeHandler(handler)

    experiment = storage / "late"
    state = json.loads(sorted(experiment.glob("experiment_state-*.json"))[-1].read_text())
    ((trial, meta),) = [(json.loads(t), json.loads(m)) for t, m in state["trial_data"]]
    assert trial["status"] == "TERMINATED" and meta["num_failures"] == 1
    text = status(str(experiment), wide=True)
    errors = text.partition("\nerrors:\n")[2]
    assert f"CIFAR-10 files missing from {late.parent}: data_batch_3" in errors
    assert f"  {meta['num_failures']}  " in text.splitlines()[5], "the failures column"

    (rows,) = histories(experiment).values()
    expected = ListReporter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrialConfig.model_validate(base), expected)
    finally:
        torch.set_num_threads(threads)
    assert [without_timing(r) for r in rows] == [without_timing(r) for r in expected.rows]


def test_an_address_nobody_answers_at_is_a_clear_error_at_once(cli, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = Path(__file__).parent.parent / "sweeps" / "quickstart.yaml"
    storage = tmp_path / "results"
    started = time.monotonic()
    code, out, err = cli("run", spec, "--storage", storage, "--address", f"127.0.0.1:{port}")
    assert code == 2 and out == "" and time.monotonic() - started < 60
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--address 127.0.0.1:{port}: cannot join the Ray cluster (nothing answers" in err
    assert not storage.exists()


def test_trials_are_made_longest_first_each_with_its_whole_config():
    """Ray Tune's own generator, fed as `lbs-tune run` feeds it, makes the quickstart's 24 trials
    smallest batch (most steps) first, each config one of the spec's full trial configs."""
    from ray import tune
    from ray.tune.experiment import Experiment

    from lbs_tune.runner import _order, param_space

    def made(spec) -> list:
        options = _order(spec)
        generator = options["search_alg"]
        space = param_space(spec, tune.grid_search)
        generator.add_configurations(
            Experiment("order", lambda c: None, config=space, num_samples=options["num_samples"])
        )
        return list(iter(generator.next_trial, None))

    spec = load_spec(QUICKSTART_FILE)
    trials = made(spec)
    sizes = [t.config["batch_size"] for t in trials]
    assert sizes == sorted(sizes) and len(trials) == len(spec.trials) == 24
    assert sorted(json.dumps(t.config, sort_keys=True) for t in trials) == sorted(
        json.dumps(c.model_dump(mode="json"), sort_keys=True) for c in spec.trials
    )
    grid_order = load_spec(QUICKSTART_FILE, ["schedule=grid"])
    in_grid_order = [t.config for t in made(grid_order)]
    assert in_grid_order == [c.model_dump(mode="json") for c in grid_order.trials]
    assert grid_order.digest() == spec.digest(), "the start order is no part of the sweep"


@pytest.mark.parametrize(
    "name, why",
    [
        ("quickstart_tuned.yaml", "a sweep with a `search` keeps its Optuna studies in SQLite"),
        ("quickstart_branch.yaml", "a branched sweep reads its reference's checkpoints and Ray's "
         "state from files"),
    ],
)  # fmt: skip
def test_a_sweep_that_keeps_files_is_refused_an_object_store(tmp_path, name, why):
    import pyarrow.fs as pafs

    from lbs_tune import runner
    from lbs_tune.errors import UserError
    from lbs_tune.storage import Location

    spec = load_spec(QUICKSTART_FILE.with_name(name))
    # A filesystem that is not pyarrow's LocalFileSystem: what an s3:// experiment looks like.
    bucket = Location(
        pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "x", "s3://b/x"
    )
    prepare = runner._studies if spec.search else runner._branched
    with pytest.raises(UserError) as error:
        prepare(spec, bucket)
    assert str(error.value) == (
        f"--storage s3://b: {why}, which needs a local or shared folder, not an object store"
    )
    assert os.listdir(tmp_path) == []
