"""The console of `lbs-tune run`: Ray Tune's real Trial objects and result dicts drive the
callback (no cluster), then one real sweep through a Tuner counts what a person sees."""

from __future__ import annotations

import functools
import io
import logging
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from conftest import (
    HOSTILE,
    QUICKSTART,
    QUICKSTART_TINY,
    tiny_base,
    without_ray_lines,
)
from ray.exceptions import RayTaskError
from ray.train._internal.storage import StorageContext
from ray.tune import PlacementGroupFactory
from ray.tune.experiment import Trial

from lbs_tune.config import SweepSpec
from lbs_tune.console import (
    QUIET_RAY_ENV,
    UP_AND_CLEAR,
    Console,
    duration,
    error_line,
    ray_init_options,
)
from lbs_tune.errors import UserError
from lbs_tune.storage import locate

STAMP = r"\d\d:\d\d:\d\d"
ESC = "\x1b"


def sweep(**extra) -> SweepSpec:
    """Four grid points (batch size x LR rule), target val/accuracy >= 0.5, one retry."""
    body = {
        "name": "console",
        "base": tiny_base(),
        "grid": {"batch_size": [16, 64], "lr.scaling": ["none", "linear"]},
        "target": {"metric": "val/accuracy", "value": 0.5},
        "max_failures": 1,
    }
    return SweepSpec.model_validate({**body, **extra})


class OfflineStorage(StorageContext):
    """Ray's StorageContext with its driver staging folder in `staging` instead of the Ray
    session's folder (which needs ray.init): a Trial writes its real error.txt there."""

    def __init__(self, staging: Path, **kwargs):
        super().__init__(**kwargs)
        self.staging = staging

    def _get_session_path(self) -> str:
        return str(self.staging)


def trials_of(spec: SweepSpec, tmp_path: Path) -> list[Trial]:
    """Ray Tune's Trials of the sweep's grid points, as the controller makes them: config,
    resources (1 CPU, 0.25 GPU), a trial folder."""
    storage = OfflineStorage(
        tmp_path / "staging", storage_path=str(tmp_path / "results"), experiment_dir_name=spec.name
    )
    found = []
    for i, config in enumerate(spec.trials):
        trial = Trial(
            "train_trial",
            stub=True,
            config=config.model_dump(mode="json"),
            trial_id=f"c0ffe_{i:05d}",
            storage=storage,
            placement_group_factory=PlacementGroupFactory([{"CPU": 1, "GPU": 0.25}]),
            max_failures=spec.max_failures,
        )
        trial.create_placement_group_factory()
        trial.init_local_path()
        found.append(trial)
    return found


def report(step: int, accuracy: float | None, total: int = 90, **changes) -> dict:
    """A result as Ray hands it to callbacks: the loop's metrics, where the trial ran, Ray's
    own keys."""
    row = {
        "step": step,
        "epoch": step / 45,
        "examples": step * 16,
        "lr": 0.05,
        "train/loss": 1.2,
        "train/accuracy": 0.5,
        "val/loss": 1.3,
        "val/accuracy": accuracy,
        "images_per_s": 5000.0,
        "diverged": False,
        "total_steps": total,
        "peak_lr": 0.05,
        "time_s": 1.5,
        "host": "gpu-node-3",
        "node_id": "9f8e7d6c5b4a39281706",
        "gpu_ids": "2",
        "device": "cuda:0 (NVIDIA H200)",
        "training_iteration": step // 45,
        "trial_id": "c0ffe_00000",
        "hostname": "gpu-node-3",
        "node_ip": "10.0.0.3",
        "pid": 4242,
        "done": False,
    }
    return {**row, **changes}


class Driver:
    """Plays Ray Tune's controller: the callback calls and Trial updates in its order."""

    def __init__(self, console: Console, trials: list[Trial], clock: list[float]):
        self.console, self.trials, self.clock = console, trials, clock
        self.iteration = 0

    def start(self, trial: Trial) -> None:
        self.console.on_trial_start(self.iteration, self.trials, trial)
        trial.set_status(Trial.RUNNING)

    def result(self, trial: Trial, result: dict) -> None:
        # The controller tells callbacks first, then stores the result in the trial.
        self.console.on_trial_result(self.iteration, self.trials, trial, result=result)
        trial.update_last_result(result)

    def complete(self, trial: Trial) -> None:
        self.console.on_trial_complete(self.iteration, self.trials, trial)
        trial.set_status(Trial.TERMINATED)

    def fail(self, trial: Trial, message: str) -> None:
        """A failure as Ray reports one: RayTaskError of the trial's exception, error.txt
        written, then a retry while failures are left, else ERROR."""
        try:
            raise UserError(message)
        except UserError as exc:
            error = RayTaskError("ImplicitFunc.train", traceback.format_exc(), exc)
        trial.handle_error(error)
        if trial.should_recover():
            self.console.on_trial_recover(self.iteration, self.trials, trial)
            trial.set_status(Trial.PENDING)
        else:
            self.console.on_trial_error(self.iteration, self.trials, trial)
            trial.set_status(Trial.ERROR)

    def wait(self, seconds: float) -> None:
        self.clock[0] += seconds
        self.iteration += 1
        self.console.on_step_end(self.iteration, self.trials)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def console_for(spec, tmp_path, stream, every_s=20.0, redraw_s=1.0) -> Driver:
    """A console printing to `stream` on a clock that only the driver moves."""
    clock = [0.0]
    console = Console(
        spec,
        locate(tmp_path / "results" / spec.name),
        stream=stream,
        every_s=every_s,
        redraw_s=redraw_s,
        clock=lambda: clock[0],
    )
    return Driver(console, trials_of(spec, tmp_path), clock)


def events(text: str) -> list[tuple[str, str, str]]:
    """(kind, trial id, rest) of every event line."""
    found = re.findall(rf"^{STAMP} (\w+) +(c0ffe_\d+) \([^)]*\)  (.*)$", text, re.MULTILINE)
    return [tuple(f) for f in found]


# ---------------------------------------------------------------------------- Events


def test_started_line_says_where_and_finished_with_metric_steps_and_target(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    trial = ray.trials[0]
    ray.start(trial)
    assert out.getvalue() == ""  # where it runs is known at its first report
    ray.result(trial, report(45, 0.41))
    ray.result(trial, report(60, 0.52))
    ray.result(trial, report(75, 0.61))  # past the target again
    ray.result(trial, report(90, 0.58))
    ray.wait(5)
    ray.complete(trial)
    # Reached and finished within one status period: one line says both.
    assert events(out.getvalue()) == [
        ("started", "c0ffe_00000", "on gpu-node-3 node 9f8e7d6c, gpu 2"),
        (
            "finished",
            "c0ffe_00000",
            "val/accuracy 0.58 (best 0.61) at step 90/90; target at step 60",
        ),
    ]
    assert "(batch_size=16 lr.scaling=none)" in out.getvalue()


def test_target_reached_is_a_line_at_the_next_status_while_the_trial_runs_on(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    trial = ray.trials[1]
    ray.start(trial)
    ray.result(trial, report(45, 0.51))
    ray.wait(10)
    ray.result(trial, report(60, 0.55))
    ray.wait(11)
    ray.result(trial, report(90, 0.6))
    ray.complete(trial)
    assert events(out.getvalue()) == [
        ("started", "c0ffe_00001", "on gpu-node-3 node 9f8e7d6c, gpu 2"),
        ("target", "c0ffe_00001", "val/accuracy 0.51 >= 0.5 at step 45"),
        ("finished", "c0ffe_00001", "val/accuracy 0.6 (best 0.6) at step 90/90"),
    ]


def test_a_trial_without_a_report_is_announced_with_its_placement_at_the_next_status(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    ray.start(ray.trials[1])
    ray.wait(19)
    assert out.getvalue() == ""
    ray.wait(2)
    assert events(out.getvalue()) == [("started", "c0ffe_00001", "wants 1 CPU, 0.25 GPU")]


def test_diverged_trial_is_one_line_with_its_step(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out)
    trial = ray.trials[3]
    ray.start(trial)
    ray.result(trial, report(6, 0.1, total=22, diverged=True, **{"train/loss": None}))
    ray.complete(trial)
    assert events(out.getvalue())[1:] == [
        ("diverged", "c0ffe_00003", "at step 6/22 (train/loss -)")
    ]


def test_failure_retried_then_errored_names_the_error_and_its_file(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out)
    trial = ray.trials[2]
    error_file = tmp_path / "results" / "console" / trial.storage.trial_dir_name / "error.txt"
    ray.start(trial)
    ray.fail(trial, f"cifar10: no file data_batch_1 in /data/{HOSTILE}\x1b]0;owned\x07")
    ray.start(trial)
    ray.fail(trial, "cifar10: still missing")
    lines = events(out.getvalue())
    # The restart that failed before it reported has no line of its own.
    assert [(kind, trial_id) for kind, trial_id, _ in lines] == [
        ("started", "c0ffe_00002"),
        ("retrying", "c0ffe_00002"),
        ("errored", "c0ffe_00002"),
    ]
    assert lines[1][2] == (
        "retry 1 of 1 from its last checkpoint, after: lbs_tune.errors.UserError: "
        f"cifar10: no file data_batch_1 in /data/{HOSTILE}; full error: {error_file}"
    )
    assert lines[2][2] == (
        "after 2 failures: lbs_tune.errors.UserError: cifar10: still missing; "
        f"full error: {error_file}"
    )
    assert ESC not in out.getvalue() and "\x07" not in out.getvalue()


def test_a_restart_that_reports_says_where_it_runs_now(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    trial = ray.trials[2]
    ray.start(trial)
    ray.result(trial, report(45, 0.3))
    ray.fail(trial, "the node went away")
    ray.start(trial)
    ray.wait(30)  # the status passes: no placement-only line for a restart
    ray.result(trial, report(45, 0.3, replayed=True))
    ray.result(trial, report(60, 0.3, host="gpu-node-5", gpu_ids="0"))
    kinds = [(kind, text[:20]) for kind, _, text in events(out.getvalue())]
    assert kinds == [
        ("started", "on gpu-node-3 node 9"),
        ("retrying", "retry 1 of 1 from it"),
        ("restarted", "on gpu-node-5 node 9"),
    ]


def test_replayed_reports_of_a_resumed_trial_print_nothing_again(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out)
    trial = ray.trials[0]
    trial.update_last_result(report(60, 0.52))  # reported by the sweep's earlier run
    ray.start(trial)
    ray.result(trial, report(45, 0.41, replayed=True, host="old-node"))
    ray.result(trial, report(60, 0.52, replayed=True, host="old-node"))
    ray.result(trial, report(75, 0.61))
    assert events(out.getvalue()) == [
        ("resumed", "c0ffe_00000", "on gpu-node-3 node 9f8e7d6c, gpu 2")
    ]


def test_config_values_are_printed_without_escape_sequences(tmp_path):
    spec = sweep(grid={"batch_size": [16], "data.dir": [f"/data/{ESC}[2J{ESC}]0;t{ESC}\\x"]})
    out = io.StringIO()
    ray = console_for(spec, tmp_path, out)
    ray.start(ray.trials[0])
    ray.result(ray.trials[0], report(45, 0.2, host=f"evil{ESC}[31m"))
    assert ESC not in out.getvalue()
    assert "data.dir=/data/x)" in out.getvalue() and "on evil node" in out.getvalue()


def test_searched_sweep_counts_every_trial_and_names_its_searched_values(tmp_path):
    spec = sweep(
        grid={"batch_size": [16, 64]},
        search={"space": {"lr.base": {"log_uniform": [0.001, 1.0]}}, "trials_per_point": 3},
    )
    out = io.StringIO()
    ray = console_for(spec, tmp_path, out, every_s=20)
    assert ray.console.total == 6
    trial = ray.trials[0]
    trial.config["lr"]["base"] = 0.012345678901234567  # what the searcher suggested
    ray.start(trial)
    ray.result(trial, report(45, 0.3))
    ray.wait(21)
    assert "c0ffe_00000 (batch_size=16 lr.base=0.01235)  on gpu-node-3" in out.getvalue()
    assert "0 done, 1 running, 5 pending" in out.getvalue()


# ---------------------------------------------------------------------------- Status


def test_status_line_counts_best_per_batch_size_pace_and_time_left(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    a, b, c, _ = ray.trials
    for trial in (a, b):
        ray.start(trial)
    ray.result(a, report(90, 0.7))
    ray.result(b, report(45, 0.55))
    ray.complete(a)
    ray.start(c)
    ray.result(c, report(2, 0.2, total=22, diverged=True))
    ray.complete(c)
    ray.wait(60)
    status = out.getvalue().splitlines()[-1]
    # Done: a (1), c (1), b half-way (0.5) = 2.5 trials in 60 s = 150/h; 1.5 left = 36 s.
    assert status == (
        "status: 1 done, 1 running, 1 pending, 0 errored, 1 diverged; "
        "best val/accuracy by batch size 16: 0.7, 64: 0.2; "
        "elapsed 1m00s, 150 trials/h, ~36s left"
    )


def test_log_file_status_only_when_it_changed_or_after_a_heartbeat(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    ray.start(ray.trials[0])
    ray.result(ray.trials[0], report(45, 0.3))
    ray.wait(21)
    ray.wait(21)  # nothing changed: no line
    ray.wait(600)  # ten minutes: a heartbeat
    statuses = [line for line in out.getvalue().splitlines() if line.startswith("status:")]
    assert len(statuses) == 2 and "elapsed 21s" in statuses[0]
    assert "elapsed 10m42s" in statuses[1]
    assert ESC not in out.getvalue()


def screen(text: str) -> list[str]:
    """The lines a terminal shows after `text`, for output that moves the cursor only by whole
    lines: newline, ESC[nA (up n lines) and ESC[J (clear to the end of the screen)."""
    shown: list[str] = []
    row = 0
    for part in re.split(r"(\x1b\[\d*A|\x1b\[J|\n)", text):
        if part == "\n":
            row += 1
        elif part.startswith(ESC) and part.endswith("A"):
            row -= int(part[2:-1] or 1)
        elif part == f"{ESC}[J":
            del shown[row:]
        elif part:
            assert ESC not in part, part
            shown += [""] * (row + 1 - len(shown))
            shown[row] += part
    return shown


def test_terminal_status_is_one_block_redrawn_in_place_below_the_events(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    out = Terminal()
    ray = console_for(sweep(), tmp_path, out, every_s=20, redraw_s=1)
    trial = ray.trials[0]
    ray.start(trial)
    ray.wait(1)  # first draw, nothing to erase
    assert ESC not in out.getvalue()
    # Lines as wide as the terminal at most (59 columns), so that the block can be erased.
    assert screen(out.getvalue()) == [
        "console: 0 done, 1 running, 3 pending, 0 errored, 0",
        "  diverged",
        "elapsed 1s",
        "best val/accuracy by batch size 16: -, 64: -",
    ]
    drawn = len(out.getvalue())
    ray.wait(1)  # redrawn in place
    assert out.getvalue()[drawn:].startswith(UP_AND_CLEAR.format(n=4))
    assert screen(out.getvalue())[2] == "elapsed 2s"
    ray.result(trial, report(45, 0.6))
    ray.wait(1)
    # The event stays above; the block is below it, once.
    shown = screen(out.getvalue())
    assert [kind for kind, _, _ in events(shown[0])] == ["started"]
    assert shown[1:] == [
        "console: 0 done, 1 running, 3 pending, 0 errored, 0",
        "  diverged",
        "elapsed 3s, 600 trials/h, ~21s left",
        "best val/accuracy by batch size 16: 0.6, 64: -",
    ]


def test_terminal_block_steps_aside_for_other_output(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = Terminal()
    ray = console_for(sweep(), tmp_path, out, redraw_s=1)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", out)
    handler = logging.StreamHandler(out)
    ray_logger = logging.getLogger("ray.tune.test_console")
    ray_logger.addHandler(handler)
    try:
        with ray.console._guarded():
            ray.wait(1)
            drawn = len(out.getvalue())
            ray_logger.warning("Ray's warning")
            print("(raylet) a worker died")
            assert out.getvalue()[drawn:] == (
                UP_AND_CLEAR.format(n=3) + "Ray's warning\n(raylet) a worker died\n"
            )
            ray.wait(1)  # drawn again below them, nothing erased first
            assert out.getvalue().count(UP_AND_CLEAR.format(n=3)) == 1
            assert screen(out.getvalue()) == [
                "Ray's warning",
                "(raylet) a worker died",
                "console: 0 done, 0 running, 4 pending, 0 errored, 0 diverged",
                "elapsed 2s",
                "best val/accuracy by batch size 16: -, 64: -",
            ]
        assert sys.stdout is out and handler.stream is out
    finally:
        ray_logger.removeHandler(handler)


def test_a_24_trial_sweep_fits_in_a_log_file(tmp_path):
    """The console's lines while 24 trials run, four at a time, every one reaching the target:
    24 started, 24 finished (a target reached within a status period of the end is part of
    that line), the status lines. The rest of 120: 4 lines before (dashboard, sign-in, sweep,
    trial output), 33 at the end (the status table of 24 trials, blank lines, summary, next)."""
    spec = sweep(
        grid={
            "batch_size": [16, 32, 64, 128],
            "lr.scaling": ["none", "linear", "sqrt"],
            "seed": [0, 1],
        }
    )
    out = io.StringIO()
    ray = console_for(spec, tmp_path, out, every_s=20)
    queue = list(ray.trials)
    running = []
    while queue or running:
        while queue and len(running) < 4:
            running.append(queue.pop(0))
            ray.start(running[-1])
        for trial in running:
            step = trial.last_result.get("step", 0) + 30
            ray.result(trial, report(step, 0.3 + step / 150))
        for trial in [t for t in running if t.last_result["step"] >= 90]:
            ray.complete(trial)
            running.remove(trial)
        ray.wait(9)
    lines = out.getvalue().splitlines()
    found = events(out.getvalue())
    kinds = [kind for kind, _, _ in found]
    assert kinds.count("started") == kinds.count("finished") == 24
    targets = {trial for kind, trial, _ in found if kind == "target"}
    targets |= {trial for kind, trial, text in found if kind == "finished" and "target at" in text}
    assert len(targets) == 24
    assert len(lines) <= 120 - 4 - 33, len(lines)


# ---------------------------------------------------------------------------- Pieces


def test_error_line_is_the_exception_of_a_ray_traceback():
    text = (
        "Failure # 1 (occurred at 2025-01-01_00-00-00)\n"
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.3)\n"
        '  File "lbs_tune/trainable.py", line 120, in train_trial\n'
        "lbs_tune.errors.UserError: cifar10: no file\n\n"
    )
    assert error_line(text) == "lbs_tune.errors.UserError: cifar10: no file"
    assert error_line("") == ""
    assert len(error_line("x" * 500)) == 200


def test_duration():
    assert [duration(s) for s in (0, 59.4, 60, 725, 3600, 11220)] == [
        "0s",
        "59s",
        "1m00s",
        "12m05s",
        "1h00m",
        "3h07m",
    ]


def test_ray_init_options_relay_trial_output_only_when_verbose_or_through_ray_client():
    assert ray_init_options(False) == {"log_to_driver": False}
    assert ray_init_options(False, "10.0.0.1:6379") == {"log_to_driver": False}
    assert ray_init_options(True, None) == {"log_to_driver": True}
    assert ray_init_options(False, "ray://head:10001") == {"log_to_driver": True}
    assert QUIET_RAY_ENV["RAY_AIR_NEW_OUTPUT"] == "0"


# ---------------------------------------------------------------------------- With Ray


def tuner_for(spec: SweepSpec, experiment):
    """A Tuner built as lbs_tune.runner.execute builds a new one."""
    from ray import tune

    from lbs_tune.runner import SYNC_PERIOD_S, _gpu_for_batch, param_space
    from lbs_tune.trainable import placement, train_trial

    gpu_of = functools.partial(_gpu_for_batch, spec.resources)
    trainable = tune.with_resources(
        train_trial, functools.partial(placement, cpu=spec.resources.cpu, gpu_by_batch=gpu_of)
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, tune.grid_search),
        tune_config=tune.TuneConfig(
            metric=spec.metric.name,
            mode=spec.metric.mode,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=experiment.parent().uri,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
        ),
    )


@pytest.mark.ray
def test_tiny_sweep_through_a_tuner_prints_its_events_and_no_ray_tables(
    ray_cluster, tmp_path, capfd, caplog
):
    """Two mnist1d trials finish; two cifar10 trials (no files in their data folder) fail,
    are retried once and end in ERROR. Ray's tables and tracebacks are gone, its warnings and
    errors still logged."""
    from analysis.status import status
    from lbs_tune.experiment import record_start

    base = {**tiny_base(data__dir=str(tmp_path / "empty")), "examples": 960}
    del base["epochs"]
    (tmp_path / "empty").mkdir()
    spec = sweep(
        base=base,
        grid={"batch_size": [32], "dataset": ["mnist1d", "cifar10"], "seed": [0, 1]},
        target={"metric": "val/accuracy", "value": 0.2},
        resources={"cpu": 1, "gpu": 0.25},
        max_concurrent=2,
    )
    experiment = locate(tmp_path / "results" / spec.name)
    record_start(experiment, spec.model_dump(mode="json"), spec.digest(), None, [])
    console = Console(spec, experiment, table=status, every_s=2)
    # Ray's logger writes to the stderr it found at import, which pytest had replaced then:
    # its records are read here instead.
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray"):
            results = console.fit(tuner_for(spec, experiment))
    finally:
        ray_logger.removeHandler(caplog.handler)
    console.finish("sweep console: done")
    out, err = capfd.readouterr()
    out, err = without_ray_lines(out), without_ray_lines(err)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("ray")]
    assert len(results) == 4
    kinds: dict[str, list[str]] = {}
    for kind, label in re.findall(rf"^{STAMP} (\w+) +\w+_\d+ \(([^)]*)\)", out, re.MULTILINE):
        kinds.setdefault(label, []).append(kind)
    assert len(kinds) == 4, kinds
    for label, found in kinds.items():
        if "dataset=cifar10" in label:
            assert found == ["started", "retrying", "errored"], label
        else:
            assert found[0] == "started" and found[-1] in ("finished", "diverged"), label
            assert set(found[1:-1]) <= {"target"}, label
    errors = re.findall(r" errored .*after 2 failures: (.*); full error: (.*)$", out, re.MULTILINE)
    assert len(errors) == 2
    for line, path in errors:
        assert line.startswith("lbs_tune.errors.UserError: ") and Path(path).is_file()
    for text in (
        "Configuration for experiment",
        "Trial status",
        "Current best trial",
        "View detailed results",
        "Checkpoint successfully",
        "Result for",
    ):
        assert text not in out + err, text
    assert any(m.startswith("Trials did not complete") for m in logged), logged
    assert not any(m.startswith("Trial task failed") for m in logged), logged
    assert f"next: lbs-tune report {experiment.uri}" in out
    # Measured 34: 2 header, 10 event and 5 status lines, 16 of the table and the end, Ray's
    # one error line. (Ray's snapshot warning, 3 more lines, is off: see QUIET_RAY_ENV.)
    lines = len((out + err).splitlines()) + sum(len(m.splitlines()) for m in logged)
    assert lines <= 50, out + err


@pytest.mark.ray
def test_24_trial_quickstart_prints_at_most_120_lines_without_a_tty(ray_cluster, tmp_path):
    """`lbs-tune run` as a user runs it, its output to pipes (no TTY)."""
    overrides = [
        *QUICKSTART_TINY,
        "base.examples=1152",
        "grid.batch_size=[16, 32, 64, 256]",
        "grid.lr.scaling=[none, linear, sqrt]",
        "grid.seed=[0, 1]",
        "max_concurrent=4",
    ]
    command = [sys.executable, "-m", "lbs_tune.cli", "run", str(QUICKSTART)]
    command += ["--storage", str(tmp_path), "--address", ray_cluster.address]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    out, err = without_ray_lines(done.stdout), without_ray_lines(done.stderr)
    assert done.returncode == 0, err
    kinds = re.findall(rf"^{STAMP} (\w+) ", out, re.MULTILINE)
    assert kinds.count("started") == 24
    assert kinds.count("finished") + kinds.count("diverged") == 24
    assert "sweep quickstart" in out and "trial        batch_size" in out
    assert f"next: lbs-tune report {tmp_path / 'quickstart'}" in out
    assert len((out + err).splitlines()) <= 120, out + err
