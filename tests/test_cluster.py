"""Beyond one machine, on one machine: worker nodes join the shared Ray head, one is lost mid-sweep.

Two `ray start` worker nodes (2 CPUs each) join the head of the test run; a sweep runs against
the cluster with a file:// storage URI; once one worker node has a trial with a checkpoint, that
node is killed (SIGKILL to every process it started: a lost machine). Its trials must be
rescheduled on the remaining nodes and continue from their newest checkpoints, and every trial's
history must equal a run of the same config without any fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_tree, polling, process_tree, tiny_base, without_timing, write_spec

from analysis.report import write_report
from analysis.status import status
from lbs_tune.checkpoints import load_checkpoint
from lbs_tune.config import TrialConfig
from lbs_tune.errors import UserError
from lbs_tune.runner import run
from lbs_tune.training import ListReporter, train


class WorkerNode:
    """A `ray start --block` worker node in its own process group."""

    def __init__(self, address: str, cpus: int, log: Path):
        import ray

        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [
                *(str(Path(sys.executable).with_name("ray")), "start", "--block"),
                *(f"--address={address}", f"--num-cpus={cpus}", "--num-gpus=0"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "token"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            new = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
            if new:
                (self.node_id,) = new
                return
            assert self.process.poll() is None, log.read_text()
            time.sleep(0.5)
        raise TimeoutError("the worker node did not join")

    def kill(self) -> None:
        """Lose the node: SIGKILL its raylet and everything it started, at once (`kill_tree`;
        with its group alone, a tiny trial could finish before its process noticed, and no
        trial failed)."""
        if self.process.poll() is None:
            kill_tree(self.process.pid)
            self.process.wait()
        self.log.close()


@pytest.fixture
def workers(ray_cluster, tmp_path):
    nodes = [WorkerNode(ray_cluster.address, 2, tmp_path / f"worker{i}.log") for i in range(2)]
    yield nodes
    for node in nodes:
        node.kill()


def reports_by_trial(experiment: Path) -> dict[int, list[dict]]:
    """Seed -> reports of that trial, a re-made step replacing the earlier one."""
    found = {}
    for params in experiment.glob("*/params.json"):
        rows = {}
        for line in (params.parent / "result.json").read_text().splitlines():
            row = json.loads(line)
            rows[row["step"]] = row
        found[json.loads(params.read_text())["seed"]] = [rows[s] for s in sorted(rows)]
    return found


def _mid_trial_on(trial: Path, node_id: str, epochs: float = 6) -> bool:
    """Whether the trial's newest checkpoint was made on `node_id` before `epochs` epochs, and
    it is not the first: a checkpoint reaches the storage a moment before Ray's driver takes
    the report that registers it, and a trial lost before then starts over; once there are
    two, the first is surely registered, and the trial resumes from a checkpoint."""
    made = sorted(trial.glob("checkpoint_*/state.pt"))
    if len(made) < 2:
        return False
    try:
        last = load_checkpoint(made[-1])["reports"][-1]
    except UserError:  # still being copied into the storage
        return False
    return last["node_id"] == node_id and last["epoch"] < epochs


def _training_on(node: WorkerNode) -> bool:
    """Whether a trial process of `node` (below its `ray start`) is training now: Ray titles an
    actor's process by the method it runs, "ray::ImplicitFunc.train" while a trial trains."""
    for pid in process_tree(node.process.pid):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if b"ImplicitFunc.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


@pytest.mark.ray
def test_node_lost_mid_sweep_trials_continue_on_the_others(ray_cluster, workers, tmp_path):
    # Trials long enough (12 epochs, a checkpoint every half) that one seen in its first half on
    # a node is still running there when the node is lost a moment later.
    base = tiny_base(epochs=12, eval_every=0.5, checkpoint_every=0.5)
    # CPU trials: a GPU placement group bundle on a node that dies can outlive it in Ray and hold
    # the shared head's fake GPUs that later tests count on.
    spec = write_spec(tmp_path / "nodes.yaml", base, {"seed": list(range(8))}, resources={"cpu": 1})
    storage = f"file://{tmp_path / 'shared'}"
    experiment = tmp_path / "shared" / "nodes"
    lost_nodes: list[WorkerNode] = []  # the worker node that is lost: the first to run a trial
    killed = []

    def lose_a_node() -> bool:
        # Checkpoints reach the storage as they are made, and carry the reports sent so far:
        # once one says its trial runs on a worker node and is in its first half, that node is
        # lost. (Which worker nodes get trials first is Ray's choice: trials start one by one
        # and the head's CPUs free up as the first ones finish.)
        for node in workers:
            mid = [f.name for f in experiment.glob("*/") if _mid_trial_on(f, node.node_id)]
            # ... and one of its trial processes trains now: a tiny trial seen mid-way in its
            # checkpoint may have ended by then (on a loaded machine), and losing a node that
            # trains nothing fails no trial.
            if mid and _training_on(node):
                killed.extend(mid)
                lost_nodes.append(node)
                node.kill()
                return True
        return False

    with polling(lose_a_node, every_s=0.1):
        assert run(spec, storage=storage, address=ray_cluster.address) == 0
    assert killed, "no worker node ran a trial to lose"
    (lost,) = lost_nodes

    state = json.loads(sorted(experiment.glob("experiment_state-*.json"))[-1].read_text())
    trials = [(json.loads(t), json.loads(m)) for t, m in state["trial_data"]]
    assert all(t["status"] == "TERMINATED" for t, _ in trials)
    retried = [t["relative_logdir"] for t, m in trials if m["num_failures"]]
    assert retried, "no trial of the lost node failed and was retried"

    def raw(folder: str) -> list[dict]:
        lines = (experiment / folder / "result.json").read_text().splitlines()
        return [json.loads(line) for line in lines]

    for folder in killed:
        # Mid-way on the lost node when it was chosen: retried, unless it ended there in the
        # moment before the node went down (on a loaded machine, tiny trials end fast).
        assert folder in retried or raw(folder)[-1]["node_id"] == lost.node_id, folder
    for folder in retried:
        # Finished elsewhere; those checkpointed on the lost node resumed from their checkpoint
        # (its reports were sent again). A trial still starting there when the node went down
        # had none, and started over.
        rows = raw(folder)
        assert rows[-1]["node_id"] != lost.node_id
        assert any(row.get("replayed") for row in rows) or folder not in killed, folder

    found = reports_by_trial(experiment)
    # status and the report read the sweep at its storage URI; status says where each trial
    # ended, and why the retried ones failed.
    text = status(f"{storage}/nodes", wide=True)
    assert {rows[-1]["node_id"][:8] for rows in found.values()} <= set(text.split())
    errors = text.partition("\nerrors:\n")[2].splitlines()
    assert len(errors) == len(retried), text
    report = write_report(f"{storage}/nodes", tmp_path / "report.html")
    assert report.stat().st_size > 0

    nodes = {row["node_id"] for rows in found.values() for row in rows}
    assert lost.node_id in nodes and len(nodes) >= 2, "trials spread over the nodes"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trials (1 CPU each): CPU reductions depend on threads
    # The retried trials (and one that ran once, as a control) train as an uninterrupted run.
    retried_seeds = {
        json.loads((experiment / f / "params.json").read_text())["seed"] for f in retried
    }
    others = sorted(set(found) - retried_seeds)[:1]
    try:
        expected = {}
        for seed in sorted(retried_seeds) + others:
            expected[seed] = ListReporter()
            train(TrialConfig.model_validate({**base, "seed": seed}), expected[seed])
    finally:
        torch.set_num_threads(threads)
    for seed, reporter in expected.items():
        assert [without_timing(r) for r in found[seed]] == [
            without_timing(r) for r in reporter.rows
        ]
