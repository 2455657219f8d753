"""A sweep stopped at any moment, then run again (issue 21): killed before Ray first saves its
state, with Ray's newest state cut short, copied or moved elsewhere and resumed there. Each ends
with exactly the trials of an uninterrupted run, and never touches the folder it was copied
from. Drivers are real processes, SIGKILLed; the sweeps join the shared Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import (
    QUICKSTART_TUNED,
    TINY_TUNED,
    check_studies,
    driver_command,
    histories,
    kill_when,
    states,
    sweep_spec,
    told,
    without_timing,
)

from lbs_tune.leftovers import dead_staging
from lbs_tune.spec import load_spec


def files(folder: Path) -> dict[str, str]:
    """Every file below `folder` by relative path, with the MD5 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cut_short(state: Path) -> None:
    """What a kill leaves while Ray rewrites its state in place: the file's first part."""
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])


@pytest.mark.ray
def test_a_tuned_sweep_killed_before_ray_saves_then_copied_and_cut_short_runs_every_trial(
    cli, ray_cluster, tmp_path
):
    """Killed before Ray first saves its state, then once trials were told; the folder copied,
    the copy's newest Ray state cut short, the copy resumed: every study of the copy ends with
    exactly its trials, each asked and told once, and the original is left as it was. The
    storage's name holds `?`, `%41` and a space."""
    storage = tmp_path / "results?v=1%41 x"
    folder = storage / "quickstart_tuned"
    command = driver_command(
        QUICKSTART_TUNED,
        storage,
        ray_cluster.address,
        *(arg for override in TINY_TUNED for arg in ("--set", override)),
    )
    kill_when(command, lambda: (folder / "tuner.pkl").exists())
    assert states(folder) == [], "Ray had saved its state: not the kill this test is about"
    kill_when(command, lambda: told(folder) >= 2 and len(states(folder)) == 1)
    before = files(folder)
    copy = storage / "copy"
    shutil.copytree(folder, copy, symlinks=True)
    cut_short(states(copy)[-1])

    code, out, err = cli("resume", copy, "--address", ray_cluster.address)
    assert files(folder) == before, "the copy's run wrote into the original"
    assert code == 0, (out, err)
    count = load_spec(QUICKSTART_TUNED, TINY_TUNED).trial_count  # 6 searched, 4 confirmations
    assert f"sweep quickstart_tuned: {count} of {count} trials: " in out
    assert "cannot be read (cut short when the run was stopped?): its trials start again" in err
    check_studies(copy)
    db = (copy / "optuna.db").read_bytes()
    code, _, err = cli("report", copy, "-o", tmp_path / "report.html")
    assert code == 0, err
    assert (copy / "optuna.db").read_bytes() == db, "a reader wrote to the studies"
    assert sorted(os.listdir(tmp_path)) == ["report.html", storage.name, "summary.json"]
    # (and the lock the killed run left beside its folder)
    assert sorted(p.name for p in storage.iterdir() if p.name[0] != ".") == [
        "copy",
        "quickstart_tuned",
    ]


@pytest.mark.ray
def test_a_grid_sweep_whose_ray_state_is_cut_short_reruns_without_duplicates(
    ray_cluster, reference, tmp_path
):
    from lbs_tune.runner import run

    spec = sweep_spec(tmp_path, "tiny")
    storage = tmp_path / "results"
    folder = storage / "tiny"
    # Killed once two trials' reports reached the experiment folder (with Ray's state).
    kill_when(
        driver_command(spec, storage, ray_cluster.address),
        lambda: len(list(folder.glob("*/result.json"))) >= 2 and states(folder),
    )
    cut_short(states(folder)[-1])
    assert run(spec, storage=str(storage), address=ray_cluster.address) == 0
    assert len(list(folder.glob("train_trial_*"))) == 4, "a trial folder twice"
    expected, found = histories(reference), histories(folder)
    assert sorted(found) == sorted(expected)
    for key, rows in expected.items():
        assert [without_timing(r) for r in found[key]] == [without_timing(r) for r in rows], key


def test_a_dead_runs_staging_folder_is_the_one_of_this_sweep_with_its_state_and_no_open_file(
    tmp_path,
):
    artifacts = tmp_path / "artifacts"  # a Ray session's: <stamp>/<name>/driver_artifacts
    state = "experiment_state-2026-12-07_21-27-59.json"

    def staging(stamp: str, name: str, saved: str) -> Path:
        folder = artifacts / stamp / name / "driver_artifacts"
        folder.mkdir(parents=True)
        (folder / saved).write_text("{}")
        return folder

    dead = staging("2026-12-07_21-27-58", "tiny[1]", state)
    staging("2026-12-07_21-30-00", "tiny[1]", "experiment_state-2026-12-07_21-30-01.json")
    staging("2026-12-07_21-27-58", "tiny1", state)  # another sweep's name ([1] is no pattern)
    live = staging("2026-12-07_21-31-00", "tiny[1]", state)  # its copy's original, running
    with (live / "result.json").open("w"):
        assert dead_staging(artifacts, "tiny[1]", [state]) == [dead]
    assert sorted(dead_staging(artifacts, "tiny[1]", [state])) == [dead, live]


@pytest.mark.ray
def test_a_copied_grid_sweep_resumes_in_its_new_place_and_leaves_the_old(
    cli, ray_cluster, reference, tmp_path
):
    """Two trials at a time (`sweep_spec`), so that Ray makes the last two after the copy
    resumes: they too are filed in the copy."""
    spec = sweep_spec(tmp_path, "tiny")
    storage = tmp_path / "results"
    folder = storage / "tiny"
    kill_when(
        driver_command(spec, storage, ray_cluster.address),
        lambda: len({p.parent for p in folder.glob("*/checkpoint_*")}) >= 2 and states(folder),
    )
    before = files(folder)
    copy = tmp_path / "elsewhere" / "tiny-copy"
    shutil.copytree(folder, copy, symlinks=True)
    code, out, err = cli("resume", copy, "--address", ray_cluster.address)
    assert files(folder) == before, "the copy's run wrote into the original"
    assert code == 0 and "4 of 4 trials: 4 finished" in out, (out, err)
    assert len(list(copy.glob("train_trial_*"))) == 4
    expected, found = histories(reference), histories(copy)
    assert sorted(found) == sorted(expected)
    for key, rows in expected.items():
        assert [without_timing(r) for r in found[key]] == [without_timing(r) for r in rows], key
    assert json.loads((copy / "lbs_sweep.json").read_text())["ended"]


# ---------------------------------------------------------------------------- Before Ray starts


def tuned_folder(tmp_path: Path, *trial_folders: str) -> tuple:
    """(spec, experiment, record) of a tiny tuned sweep recorded in tmp_path/results, whose
    folder holds the trial folders named (what a run left there), and nothing of Ray's."""
    from lbs_tune.record import record_start
    from lbs_tune.storage import locate

    spec = load_spec(QUICKSTART_TUNED, TINY_TUNED)
    experiment = locate(tmp_path / "results").join(spec.name)
    record = record_start(experiment, spec.model_dump(mode="json"), spec.digest(), None, [])
    for name in trial_folders:
        Path(experiment.path, name, "checkpoint_000000").mkdir(parents=True)
    return spec, experiment, record


@pytest.mark.parametrize("damage", ["missing", "zero bytes"])
def test_a_tuned_sweep_whose_studies_are_gone_is_refused_before_ray_starts(
    cli, tmp_path, data_dir, damage
):
    _, experiment, _ = tuned_folder(tmp_path, "train_trial_1a2b3c4d_batch_size=32,search.number=0")
    db = Path(experiment.path, "optuna.db")
    if damage == "zero bytes":
        db.write_bytes(b"")
    code, out, err = cli("resume", experiment.path)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    if damage == "missing":
        assert f"{db}: the studies of this sweep are missing, though its trials ran" in err
    else:
        assert f"{db}: damaged study storage (" in err
        assert db.read_bytes() == b""
    assert "Ray dashboard" not in out


def test_studies_left_mid_write_are_refused_by_readers_and_undone_by_the_next_run(tmp_path):
    import sqlite3
    import sys

    from lbs_tune.errors import UserError
    from lbs_tune.preflight import resume_point
    from lbs_tune.studies import create_storage, read_studies

    spec, experiment, record = tuned_folder(tmp_path)
    db = Path(experiment.path, "optuna.db")
    create_storage(db)
    # A writer killed in the middle of a transaction too big for its page cache: some of it is
    # in the file already, the journal beside it holds what it replaced.
    write = (
        "import os, signal, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA cache_size = 1')\n"
        "db.execute('BEGIN')\n"
        "db.executemany('INSERT INTO studies (study_name) VALUES (?)',\n"
        "               [(f'half {i:04d}' + 'x' * 200,) for i in range(2000)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", write, str(db)], check=False)
    assert Path(f"{db}-journal").exists()
    with pytest.raises(UserError) as info:
        read_studies(experiment.path)
    assert "a run was stopped while writing it; running the sweep again" in str(info.value)
    assert Path(f"{db}-journal").exists(), "a reader changed the studies"
    assert resume_point(spec, experiment, record) is False
    assert not Path(f"{db}-journal").exists() and read_studies(experiment.path) == []
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT count(*) FROM studies").fetchone() == (0,)
