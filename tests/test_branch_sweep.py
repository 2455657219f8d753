"""A branched sweep on Ray (sweeps/quickstart_branch.yaml at a tiny size, TINY_BRANCH): the
reference, its branches and the comparison run as trials of one experiment, the plan made of the
branches' losses, and a driver SIGKILLed twice and run again ending with exactly the trials,
points, branch losses and plan of an uninterrupted run. `python tests/test_branch_sweep.py`
writes the committed copy (tests/experiments/quickstart_branch) that the fast tier reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from conftest import TINY_EXPERIMENTS, TINY_MNIST1D  # noqa: E402 (found through the path above)

from lbs_tune.experiment import BRANCH_STATE_FILE, STATE_FILE  # noqa: E402

QUICKSTART_BRANCH = TESTS.parent / "sweeps" / "quickstart_branch.yaml"
# 1440 training examples, a reference of 2 epochs (90 steps at 32) with a checkpoint every
# quarter epoch (11 steps); branches at 25% and 75% of it, k = 1, 2, 4, seeds 0 and 1, 1024
# examples each (4 reports); the comparison with one seed: 1 + 12 + 3 = 16 trials.
TINY_BRANCH = [
    f"base.data.samples={TINY_MNIST1D}",
    "base.epochs=2",
    "base.eval_every=0.25",
    "base.checkpoint_every=0.25",
    "base.eval_batch_size=256",
    "base.noise_scale.every=0.5",
    "branch.points=[0.25, 0.75]",
    "branch.multiples=[1, 2, 4]",
    "branch.seeds=[0, 1]",
    "branch.examples=1024",
    "branch.compare_seeds=[0]",
    "max_concurrent=2",
    "loggers.tensorboard=false",
]
TRIALS = 16


def branch_state(folder: Path) -> dict:
    return json.loads((folder / BRANCH_STATE_FILE).read_text())


def ended(folder: Path) -> int:
    """Trials the searcher has seen end so far (0 before its state exists)."""
    try:
        return sum(s["ended"] for s in branch_state(folder)["slots"])
    except (FileNotFoundError, ValueError):
        return 0


def ray_trials(folder: Path) -> list[tuple[str, str]]:
    """(trial id, status) of every trial in Ray's newest experiment state."""
    newest = max(p for p in folder.iterdir() if STATE_FILE.match(p.name))
    pairs = json.loads(newest.read_text())["trial_data"]
    return sorted((json.loads(t)["trial_id"], json.loads(t)["status"]) for t, _ in pairs)


def outcome(folder: Path) -> dict:
    """What must not depend on kills: each branch's losses and steps, where each point fell
    (its step and examples), the local critical batch sizes and the schedule, and the
    comparison's final losses."""
    from analysis.branches import branch_rows, comparison
    from analysis.load import load

    results = load(folder, cache=False)
    state = branch_state(folder)
    keys = ("point", "point_step", "k", "seed", "smoothed_loss", "final_loss", "steps", "examples")
    return {
        "branches": [{k: r[k] for k in keys} for r in branch_rows(results)],
        "points": [p[1:] for p in state["points"]],
        "plan": state["plan"],
        "runs": [(r.arm, r.seed, r.final_loss, r.steps) for r in comparison(results)],
    }


def check_complete(folder: Path) -> None:
    """Every slot ended once, each by a trial that Ray's state holds as TERMINATED, no other."""
    state = branch_state(folder)
    assert len(state["slots"]) == TRIALS
    assert all(s["ended"] and not s["errored"] for s in state["slots"])
    trials = ray_trials(folder)
    assert [status for _, status in trials] == ["TERMINATED"] * TRIALS
    assert sorted(s["trial"] for s in state["slots"]) == [t for t, _ in trials]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory) -> Path:
    from lbs_tune.runner import run

    storage = tmp_path_factory.mktemp("branch")
    assert (
        run(QUICKSTART_BRANCH, TINY_BRANCH, storage=str(storage), address=ray_cluster.address) == 0
    )
    return storage / "quickstart_branch"


@pytest.mark.ray
def test_a_branch_sweep_runs_its_phases_and_plans_from_its_branches(uninterrupted):
    from analysis.branches import branches_json, local_sizes
    from analysis.load import load

    check_complete(uninterrupted)
    state = branch_state(uninterrupted)
    # Points at 25% and 75% of 2880 examples fall on checkpoints at steps 22 and 66.
    assert [p[1:] for p in state["points"]] == [[22, 704], [66, 2112]]
    results = load(uninterrupted, cache=False)
    # The readers find the searcher's own local critical batch sizes and plan in the files.
    sizes = {str(p.point): [p.batch, p.upper, p.per_seed] for p in local_sizes(results)}
    planned = {
        i: [v["batch"], v["upper"], v["per_seed"]] for i, v in state["plan"]["local_cbs"].items()
    }
    assert sizes == planned
    summary = branches_json(results)
    assert summary["schedule"] == state["plan"]["schedule"]
    assert len(summary["points"]) == 2 and len(summary["comparison"]["runs"]) == 3


@pytest.mark.ray
def test_the_committed_branch_experiment_matches_what_a_sweep_writes_now(uninterrupted):
    assert outcome(TINY_EXPERIMENTS / "quickstart_branch") == outcome(uninterrupted)


@pytest.mark.ray
def test_driver_killed_twice_then_rerun_ends_as_the_uninterrupted_run(
    ray_cluster, uninterrupted, tmp_path
):
    from lbs_tune.runner import run

    storage = tmp_path / "results"
    folder = storage / "quickstart_branch"
    command = [
        *(sys.executable, "-m", "lbs_tune.cli", "run", str(QUICKSTART_BRANCH)),
        *("--storage", str(storage), "--address", ray_cluster.address),
        *(arg for override in TINY_BRANCH for arg in ("--set", override)),
    ]

    def kill_once_ended(at_least: int) -> int:
        """Start the driver, SIGKILL it once `at_least` trials ended; return those ended."""
        driver = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if ended(folder) >= at_least:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        return ended(folder)

    first = kill_once_ended(2)  # the reference and a branch: inside the second phase
    second = kill_once_ended(first + 4)  # later: more branches, or the comparison
    assert 2 <= first < second < TRIALS
    assert (
        run(QUICKSTART_BRANCH, TINY_BRANCH, storage=str(storage), address=ray_cluster.address) == 0
    )

    check_complete(folder)
    assert outcome(folder) == outcome(uninterrupted)
    record = json.loads((folder / "lbs_sweep.json").read_text())
    assert len(record["runs"]) == 3 and record["ended"]


# ---------------------------------------------------------------------------- The committed copy


def main() -> int:
    """Run TINY_BRANCH on a local Ray and copy what the readers read (and the searcher's state)
    into tests/experiments/quickstart_branch."""
    import shutil

    import ray
    from make_tiny_experiment import copy_text_files

    from lbs_tune.cluster import start_ray
    from lbs_tune.runner import run

    with tempfile.TemporaryDirectory(prefix="lbs-branch-") as scratch:
        storage = Path(scratch)
        os.environ["LBS_DATA_DIR"] = str(storage / "data")
        start_ray(cpus=4, gpus=4)
        address = ray.get_runtime_context().gcs_address
        assert run(QUICKSTART_BRANCH, TINY_BRANCH, storage=str(storage), address=address) == 0
        ray.shutdown()
        experiment = storage / "quickstart_branch"
        target = TINY_EXPERIMENTS / "quickstart_branch"
        copy_text_files(experiment, target)
        shutil.copy2(experiment / BRANCH_STATE_FILE, target / BRANCH_STATE_FILE)
        size = sum(p.stat().st_size for p in target.rglob("*"))
        print(f"{target}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
