"""The console of `lbs-tune run`.

Most tests feed `lbs_tune.console_lines` literal trial states and assert literal lines, as Ray
Tune's own tests of its console do (no Ray, no terminal, no clock). A few drive the `Console`
callback with Ray Tune's real Trial objects (no cluster) to check what it adds: the conversion,
the status period, the terminal's block. With Ray: a fixed-rule sweep through a Tuner, the
24-trial quickstart and a tuned sweep, each printing to pipes or a file as a user's log does.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    HOSTILE,
    QUICKSTART,
    QUICKSTART_TINY,
    TINY_MNIST1D,
    tiny_base,
    without_ray_lines,
)
from ray.tune import PlacementGroupFactory
from ray.tune.experiment import Trial

from lbs_tune.console import (
    QUIET_RAY_ENV,
    UP_AND_CLEAR,
    Console,
    quiet_logs,
    ray_init_options,
    trial_state,
)
from lbs_tune.console_lines import (
    Events,
    Progress,
    Reached,
    TrialState,
    best_by_size,
    cost_left,
    counts,
    duration,
    ending,
    error_line,
    failure,
    label,
    plan_of,
    progress,
    status_block,
    status_line,
    told_before,
    where,
)
from lbs_tune.storage import locate
from lbs_tune.studies import StudyRecord
from lbs_tune.sweep import SweepSpec

STAMP = r"\d\d:\d\d:\d\d"
ESC = "\x1b"
AT = "12:00:00"  # the time stamp of the events in the tests of lines
QUICKSTART_TUNED = Path(__file__).parent.parent / "sweeps" / "quickstart_tuned.yaml"


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


def tuned(**search) -> SweepSpec:
    """Two batch sizes, lr.base searched, 3 trials each, steps to val/accuracy >= 0.5."""
    space = {"lr.base": {"log_uniform": [0.001, 1.0]}}
    body = {"space": space, "trials_per_point": 3, "objective": "steps_to_target", **search}
    return sweep(grid={"batch_size": [16, 64]}, search=body)


PLAN = plan_of(sweep())
TUNED = plan_of(tuned())


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


def fixed(i: int, state: str = "RUNNING", result: dict | None = None, best=None) -> TrialState:
    """Trial i of `sweep()`: grid point i (batch 16, 16, 64, 64; none, linear, none, linear)."""
    size, scaling = [(16, "none"), (16, "linear"), (64, "none"), (64, "linear")][i]
    config = {"batch_size": size, "lr": {"scaling": scaling}}
    best = {} if best is None else {"val/accuracy": best}
    return TrialState(f"c0ffe_{i:05d}", state, config, result or {}, best)


def searched(i, size, state="TERMINATED", result=None, best=None, reached=None) -> TrialState:
    """Trial i of `tuned()`, at batch `size`, lr.base 0.01."""
    point = [16, 64].index(size)
    config = {"batch_size": size, "lr": {"base": 0.01}, "search": {"point": point, "number": i}}
    best = {} if best is None else {"val/accuracy": best}
    return TrialState(f"c0ffe_{i:05d}", state, config, result or {}, best, reached)


# ============================================================================ Event lines


def test_started_line_says_where_and_finished_with_metric_steps_and_target():
    events = Events(PLAN)
    events.start(fixed(0, "PENDING"), "wants 1 CPU, 0.25 GPU")
    # Where it runs is known at its first report.
    assert events.result(AT, fixed(0), report(45, 0.41)) == [
        "12:00:00 started   c0ffe_00000 (batch_size=16 lr.scaling=none)  "
        "on gpu-node-3 node 9f8e7d6c, gpu 2"
    ]
    for step, accuracy in ((60, 0.52), (75, 0.61), (90, 0.58)):  # past the target again at 75
        assert events.result(AT, fixed(0), report(step, accuracy)) == []
    # Reached and finished before a flush: one line says both.
    assert events.complete(AT, fixed(0, result=report(90, 0.58), best=0.61)) == [
        "12:00:00 finished  c0ffe_00000 (batch_size=16 lr.scaling=none)  "
        "val/accuracy 0.58 (best 0.61) at step 90/90; target at step 60"
    ]


def test_target_reached_is_a_line_at_the_next_flush_while_the_trial_runs_on():
    events = Events(PLAN)
    events.start(fixed(1, "PENDING"), "wants 1 CPU, 0.25 GPU")
    assert len(events.result(AT, fixed(1), report(45, 0.51))) == 1  # started
    assert events.flush(AT) == [
        "12:00:00 target    c0ffe_00001 (batch_size=16 lr.scaling=linear)  "
        "val/accuracy 0.51 >= 0.5 at step 45"
    ]
    assert events.result(AT, fixed(1), report(60, 0.55)) == []
    assert events.flush(AT) == []
    assert events.complete(AT, fixed(1, result=report(90, 0.6), best=0.6)) == [
        "12:00:00 finished  c0ffe_00001 (batch_size=16 lr.scaling=linear)  "
        "val/accuracy 0.6 (best 0.6) at step 90/90"
    ]


def test_a_trial_without_a_report_is_announced_with_its_placement_at_the_next_flush():
    events = Events(PLAN)
    events.start(fixed(1, "PENDING"), "wants 1 CPU, 0.25 GPU")
    assert events.flush(AT) == [
        "12:00:00 started   c0ffe_00001 (batch_size=16 lr.scaling=linear)  wants 1 CPU, 0.25 GPU"
    ]
    assert events.flush(AT) == []


def test_diverged_trial_is_one_line_with_its_step():
    events = Events(PLAN)
    events.start(fixed(3, "PENDING"), "wants 1 CPU")
    result = report(6, 0.1, total=22, diverged=True, **{"train/loss": None})
    events.result(AT, fixed(3), result)
    assert events.complete(AT, fixed(3, result=result, best=0.1)) == [
        "12:00:00 diverged  c0ffe_00003 (batch_size=64 lr.scaling=linear)  "
        "at step 6/22 (train/loss -)"
    ]


def test_failure_retried_then_errored_names_the_error_and_its_file():
    events = Events(PLAN)
    error_file = "/results/console/train_trial_c0ffe_00002/error.txt"
    first = failure(
        "Failure # 1\nTraceback (most recent call last):\n  File ...\n"
        f"lbs_tune.errors.UserError: cifar10: no file data_batch_1 in /data/{HOSTILE}"
        "\x1b]0;owned\x07\n",
        error_file,
    )
    events.start(fixed(2, "PENDING"), "wants 1 CPU, 0.25 GPU")
    assert events.recover(AT, fixed(2), 1, first) == [
        "12:00:00 started   c0ffe_00002 (batch_size=64 lr.scaling=none)  wants 1 CPU, 0.25 GPU",
        "12:00:00 retrying  c0ffe_00002 (batch_size=64 lr.scaling=none)  retry 1 of 1 from its "
        "last checkpoint, after: lbs_tune.errors.UserError: cifar10: no file data_batch_1 in "
        f"/data/{HOSTILE}; full error: {error_file}",
    ]
    # The restart that fails before it reports has no line of its own.
    events.start(fixed(2, "PENDING"), "wants 1 CPU, 0.25 GPU")
    assert events.error(AT, fixed(2), 2, failure("", error_file)) == [
        "12:00:00 errored   c0ffe_00002 (batch_size=64 lr.scaling=none)  after 2 failures: "
        f"no error text; full error: {error_file}"
    ]


def test_a_restart_that_reports_says_where_it_runs_now():
    events = Events(PLAN)
    events.start(fixed(2, "PENDING"), "wants 1 CPU")
    events.result(AT, fixed(2), report(45, 0.3))
    assert [line.split()[1] for line in events.recover(AT, fixed(2), 1, "boom")] == ["retrying"]
    events.start(fixed(2, "PENDING", report(45, 0.3)), "wants 1 CPU")
    assert events.flush(AT) == []  # no placement-only line for a restart
    assert events.result(AT, fixed(2), report(45, 0.3, replayed=True)) == []
    assert events.result(AT, fixed(2), report(60, 0.3, host="gpu-node-5", gpu_ids="0")) == [
        "12:00:00 restarted c0ffe_00002 (batch_size=64 lr.scaling=none)  "
        "on gpu-node-5 node 9f8e7d6c, gpu 0"
    ]


def test_replayed_reports_of_a_resumed_trial_print_nothing_again():
    events = Events(PLAN)
    # It reported in the sweep's earlier run, then the sweep was resumed.
    events.start(fixed(0, "PENDING", report(60, 0.52)), "wants 1 CPU")
    assert events.result(AT, fixed(0), report(45, 0.41, replayed=True, host="old")) == []
    assert events.result(AT, fixed(0), report(60, 0.52, replayed=True, host="old")) == []
    assert events.result(AT, fixed(0), report(75, 0.61)) == [
        "12:00:00 resumed   c0ffe_00000 (batch_size=16 lr.scaling=none)  "
        "on gpu-node-3 node 9f8e7d6c, gpu 2"
    ]
    # Its target was reached in the earlier run: that run said so.
    assert events.flush(AT) == []


def test_config_values_and_hosts_are_printed_without_escape_sequences():
    config = {"batch_size": 16, "data": {"dir": f"/data/{ESC}[2J{ESC}]0;t{ESC}\\x"}}
    trial = TrialState("c0ffe_00000", "RUNNING", config, {})
    assert (
        label(trial, ("batch_size", "data.dir")) == "c0ffe_00000 (batch_size=16 data.dir=/data/x)"
    )
    assert where({"host": f"evil{ESC}[31m", "node_id": None}) == "on evil, cpu"


def test_searched_sweep_counts_every_trial_and_names_its_searched_values():
    plan = plan_of(tuned(objective="metric"))
    assert plan.total == 6 and plan.keys == ("batch_size", "lr.base")
    config = {"batch_size": 16, "lr": {"base": 0.012345678901234567}}  # what Optuna drew
    trial = TrialState("c0ffe_00000", "RUNNING", config, report(45, 0.3))
    assert label(trial, plan.keys) == "c0ffe_00000 (batch_size=16 lr.base=0.01235)"
    assert counts([trial], plan) == "0 done, 1 running, 5 pending, 0 errored, 0 diverged"


# ============================================================================ A tuned sweep


def test_tuned_trials_say_reached_at_step_missed_with_their_best_or_diverged():
    events = Events(TUNED)
    for i in range(3):
        events.start(searched(i, 16, "PENDING"), "wants 1 CPU")
    # The trial stops at the report that reaches the target: no line of its own for that.
    assert len(events.result(AT, searched(0, 16, "RUNNING"), report(45, 0.51))) == 1
    assert events.flush(AT)[-1].split()[1] == "started"  # the two that have not reported
    assert events.complete(AT, searched(0, 16, result=report(45, 0.51), best=0.51)) == [
        "12:00:00 reached   c0ffe_00000 (batch_size=16 lr.base=0.01)  "
        "the target at step 45 (val/accuracy 0.51 >= 0.5)"
    ]
    assert events.complete(AT, searched(1, 16, result=report(90, 0.45), best=0.47)) == [
        "12:00:00 missed    c0ffe_00001 (batch_size=16 lr.base=0.01)  "
        "the target (best 0.47) at step 90/90"
    ]
    result = report(6, 0.1, diverged=True, **{"train/loss": None})
    assert events.complete(AT, searched(2, 16, result=result, best=0.1)) == [
        "12:00:00 diverged  c0ffe_00002 (batch_size=16 lr.base=0.01)  at step 6/90 (train/loss -)"
    ]
    assert events.flush(AT) == []


def test_a_tuned_trial_that_diverged_after_its_target_counts_as_reached_as_in_its_study():
    result = report(45, 0.51, diverged=True)
    trial = searched(0, 16, result=result, best=0.51, reached=Reached(45, 0.51))
    assert ending(trial, TUNED) == ("reached", "the target at step 45 (val/accuracy 0.51 >= 0.5)")
    assert counts([trial], TUNED) == (
        "1 reached, 0 missed, 0 running, 5 pending, 0 errored, 0 diverged"
    )


def tuned_states() -> list[TrialState]:
    """Batch 16: one reached at 45, one missed, one half-way; batch 64: one reached at 12, one
    diverged, one not made yet."""
    return [
        searched(0, 16, result=report(45, 0.51), best=0.51, reached=Reached(45, 0.51)),
        searched(1, 16, result=report(90, 0.45), best=0.47),
        searched(2, 16, "RUNNING", result=report(45, 0.4), best=0.4),
        searched(3, 64, result=report(12, 0.55, total=22), best=0.55, reached=Reached(12, 0.55)),
        searched(4, 64, result=report(3, 0.1, total=22, diverged=True), best=0.1),
    ]


def test_tuned_status_has_the_best_steps_to_target_and_trials_done_per_batch_size():
    # Done: 4 ended, one half-way = 4.5 trials in 60 s; left: half of one and one not made.
    assert status_line(tuned_states(), TUNED, Progress(0, 0), 60) == (
        "status: 2 reached, 1 missed, 1 running, 1 pending, 0 errored, 1 diverged; "
        "best steps to val/accuracy>=0.5 (trials done/total) by batch size 16: 45 (2/3), "
        "64: 12 (2/3); elapsed 1m00s, 270 trials/h, ~20s left"
    )
    states = [t._replace(reached=None) for t in tuned_states()]
    assert best_by_size(states, TUNED).endswith("by batch size 16: - (2/3), 64: - (2/3)")


def test_a_tuned_metric_sweep_shows_the_best_value_leaving_out_diverged_trials():
    plan = plan_of(tuned(objective="metric"))
    assert best_by_size(tuned_states(), plan) == (
        "best val/accuracy (trials done/total) by batch size 16: 0.51 (2/3), 64: 0.55 (2/3)"
    )
    states = tuned_states()[3:]
    assert best_by_size(states, plan).endswith("16: - (0/3), 64: 0.55 (2/3)")


def test_a_resumed_tuned_sweep_counts_the_trials_its_studies_were_told_before_this_run():
    """Told to its study after Ray last saved its state, a trial is not in Ray's restored list:
    the status counts it from the studies (a reached one at its steps), not as pending."""

    def run(number, state, ray, value=None):
        return {
            "number": number,
            "state": state,
            "value": value,
            "at_value": 0.52,
            "ray_trial_id": ray,
            "diverged": False,
        }

    studies = [  # tuned_states' trials as their studies hold them, and one more told at 64
        StudyRecord("batch_size=16", {"batch_size": 16}, 0, TUNED.tuned, [
            run(0, "COMPLETE", "c0ffe_00000", 45.0), run(1, "PRUNED", "c0ffe_00001"),
            run(2, "RUNNING", "c0ffe_00002")]),
        StudyRecord("batch_size=64", {"batch_size": 64}, 1, TUNED.tuned, [
            run(0, "COMPLETE", "c0ffe_00003", 12.0), run(1, "FAIL", "c0ffe_00004"),
            run(2, "COMPLETE", "told", 9.0)]),
    ]  # fmt: skip
    earlier = told_before(studies, TUNED)
    assert [(t.id, t.config["batch_size"], t.reached) for t in earlier] == [
        ("c0ffe_00000", 16, Reached(45, 0.52)),
        ("c0ffe_00001", 16, None),
        ("c0ffe_00003", 64, Reached(12, 0.52)),
        ("c0ffe_00004", 64, None),
        ("told", 64, Reached(9, 0.52)),
    ]
    assert {t.state for t in earlier} == {"TERMINATED"}
    # As Console.states adds them: those Ray's list lacks.
    ids = {t.id for t in tuned_states()}
    states = tuned_states() + [t for t in earlier if t.id not in ids]
    assert (
        counts(states, TUNED) == "3 reached, 1 missed, 1 running, 0 pending, 0 errored, 1 diverged"
    )
    assert best_by_size(states, TUNED).endswith("16: 45 (2/3), 64: 9 (3/3)")


def test_trials_told_before_this_run_keep_a_batch_size_set_outside_the_grid():
    space = {"lr.base": {"log_uniform": [0.001, 1.0]}}
    search = {"space": space, "trials_per_point": 1, "objective": "steps_to_target"}
    plan = plan_of(sweep(grid={"seed": [0, 1]}, search=search))
    told = {"number": 0, "state": "COMPLETE", "value": 30.0, "at_value": 0.52,
            "ray_trial_id": "told", "diverged": False}  # fmt: skip
    studies = [StudyRecord("seed=1", {"seed": 1}, 1, plan.tuned, [told])]
    (state,) = told_before(studies, plan)
    size = tiny_base()["batch_size"]
    assert state.config == {"batch_size": size, "seed": 1, "search": {"point": 1}}
    assert best_by_size([state], plan).endswith(f"by batch size {size}: 30 (1/2)")


# ============================================================================ Status and pace


def test_status_line_counts_best_per_batch_size_pace_and_time_left():
    trials = [
        fixed(0, "TERMINATED", report(90, 0.7), best=0.7),
        fixed(1, "RUNNING", report(45, 0.55), best=0.55),
        fixed(2, "TERMINATED", report(2, 0.2, total=22, diverged=True), best=0.2),
        fixed(3, "PENDING"),
    ]
    # Done: trial 0 (1), trial 2 (1), trial 1 half-way (0.5) = 2.5 trials in 60 s = 150/h;
    # 1.5 left = 36 s.
    assert status_line(trials, PLAN, Progress(0, 0), 60) == (
        "status: 1 done, 1 running, 1 pending, 0 errored, 1 diverged; "
        "best val/accuracy by batch size 16: 0.7, 64: 0.2; "
        "elapsed 1m00s, 150 trials/h, ~36s left"
    )
    # What was done before this run (a resumed sweep) is not this run's pace.
    before = progress(trials[:1], PLAN)
    assert status_line(trials, PLAN, before, 60).endswith("elapsed 1m00s, 90 trials/h, ~1m00s left")


def test_time_left_weighs_each_trial_by_the_cost_model():
    """Batch 16 costs 8 times batch 64 (the cost model's steps x seconds per step). Counting
    trials would say 1m40s after the three slow trials and 30 s after the three quick ones;
    the cost done per second says 15 s and 4 minutes."""
    plan = plan_of(tuned(), costs=[80.0, 10.0])
    slow_first = [searched(i, 16) for i in range(3)]
    assert (progress(slow_first, plan), cost_left(slow_first, plan)) == (Progress(3, 240), 30)
    assert status_line(slow_first, plan, Progress(0, 0), 120).endswith(
        "elapsed 2m00s, 90 trials/h, ~15s left"
    )
    quick_first = [searched(i, 64) for i in range(3)]
    assert status_line(quick_first, plan, Progress(0, 0), 30).endswith(
        "elapsed 30s, 360 trials/h, ~4m00s left"
    )
    # The end: one slow trial left, 80% of its steps done; 254 of 270 done in 400 s.
    last = [*quick_first, searched(3, 16, "RUNNING", report(72, 0.3)), searched(4, 16)]
    last.append(searched(5, 16))
    assert cost_left(last, plan) == pytest.approx(16)
    assert status_line(last, plan, Progress(0, 0), 400).endswith("~25s left")


def test_rates_are_over_the_time_since_the_first_trial_started():
    trials = [fixed(0, "TERMINATED", best=0.7), fixed(1, "PENDING")]
    trials += [fixed(2, "PENDING"), fixed(3, "PENDING")]
    # Ray took 50 s to start the first trial, which then took 10 s: 3 more take 30 s.
    assert status_line(trials, PLAN, Progress(0, 0), 60, working=10).endswith(
        "elapsed 1m00s, 360 trials/h, ~30s left"
    )


def test_no_time_left_is_guessed_before_anything_is_done():
    trials = [fixed(0, "RUNNING", report(0, None))]
    assert status_line(trials, PLAN, Progress(0, 0), 10).endswith("; elapsed 10s")


def test_terminal_block_lines_are_wrapped_to_its_width():
    trials = [fixed(0), fixed(1, "PENDING"), fixed(2, "PENDING"), fixed(3, "PENDING")]
    assert status_block(trials, PLAN, Progress(0, 0), 1, width=59) == [
        "console: 0 done, 1 running, 3 pending, 0 errored, 0",
        "  diverged",
        "elapsed 1s",
        "best val/accuracy by batch size 16: -, 64: -",
    ]


# ============================================================================ Pieces


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


def test_ray_init_options_relay_trial_output_and_ray_info_only_when_verbose_or_ray_client():
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    assert ray_init_options(False) == quiet
    assert ray_init_options(False, "10.0.0.1:6379") == quiet
    assert ray_init_options(True, None) == {"log_to_driver": True}
    assert ray_init_options(False, "ray://head:10001") == {"log_to_driver": True}
    assert QUIET_RAY_ENV["RAY_AIR_NEW_OUTPUT"] == "0"


def test_quiet_logs_keep_ray_and_optuna_info_and_slow_step_notes_out():
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(f"{record.name}: {record.getMessage()}")
    loggers = [logging.getLogger(n) for n in ("ray", "optuna", "ray.tune.utils.util")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
    logging.getLogger("ray").setLevel(logging.INFO)
    try:
        with quiet_logs():
            logging.getLogger("optuna").info("A new study created in RDB with name: x")
            logging.getLogger("ray.tune.tune").info("Wrote the latest version of all result files")
            logging.getLogger("ray.tune.utils.util").warning(
                "The `process_trial_result` operation took 0.612 s, which may be a performance "
                "bottleneck."
            )
            logging.getLogger("ray.tune.tune").warning("Trials did not complete: [x]")
        logging.getLogger("ray.tune.tune").info("after")
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert seen == ["ray.tune.tune: Trials did not complete: [x]", "ray.tune.tune: after"]


# ============================================================================ The callback


def ray_trials(spec: SweepSpec) -> list[Trial]:
    """Ray Tune's Trials of the sweep's grid points, as its controller makes them: config,
    resources (1 CPU, 0.25 GPU); no storage (no trial folder: nothing here fails)."""
    found = []
    for i, config in enumerate(spec.trials):
        trial = Trial(
            "train_trial",
            stub=True,
            config=config.model_dump(mode="json"),
            trial_id=f"c0ffe_{i:05d}",
            placement_group_factory=PlacementGroupFactory([{"CPU": 1, "GPU": 0.25}]),
            max_failures=spec.max_failures,
        )
        trial.create_placement_group_factory()
        found.append(trial)
    return found


class Driver:
    """Plays Ray Tune's controller: the callback's calls and the Trials' updates in its order."""

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
        now=lambda: AT,
    )
    return Driver(console, ray_trials(spec), clock)


def events(text: str) -> list[tuple[str, str, str]]:
    """(kind, trial id, rest) of every event line."""
    found = re.findall(rf"^{STAMP} (\w+) +(c0ffe_\d+) \([^)]*\)  (.*)$", text, re.MULTILINE)
    return [tuple(f) for f in found]


def test_a_ray_trial_becomes_a_plain_state():
    (trial, *_) = ray_trials(sweep())
    trial.set_status(Trial.RUNNING)
    for step, accuracy in ((45, 0.41), (90, 0.62), (135, 0.58)):
        trial.update_last_result(report(step, accuracy))
    state = trial_state(trial, PLAN, Reached(90, 0.62))
    assert (state.id, state.state, state.best, state.reached) == (
        "c0ffe_00000",
        "RUNNING",
        {"val/accuracy": 0.62},
        Reached(90, 0.62),
    )
    assert state.result["step"] == 135 and state.config == trial.config


def test_the_callback_forwards_ray_events_and_prints_their_lines(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    a, b, *_ = ray.trials
    ray.start(a)
    ray.start(b)
    assert out.getvalue() == ""  # where they run is known at their first report
    ray.result(a, report(45, 0.41))
    ray.result(a, report(60, 0.52))
    ray.wait(21)  # b is announced with its placement, a's target said
    ray.result(a, report(90, 0.58))
    ray.complete(a)
    assert out.getvalue().splitlines() == [
        "12:00:00 started   c0ffe_00000 (batch_size=16 lr.scaling=none)  "
        "on gpu-node-3 node 9f8e7d6c, gpu 2",
        "12:00:00 started   c0ffe_00001 (batch_size=16 lr.scaling=linear)  wants 1 CPU, 0.25 GPU",
        "12:00:00 target    c0ffe_00000 (batch_size=16 lr.scaling=none)  "
        "val/accuracy 0.52 >= 0.5 at step 60",
        "status: 0 done, 2 running, 2 pending, 0 errored, 0 diverged; "
        "best val/accuracy by batch size 16: 0.52, 64: -; elapsed 21s, 114 trials/h, ~1m45s left",
        "12:00:00 finished  c0ffe_00000 (batch_size=16 lr.scaling=none)  "
        "val/accuracy 0.58 (best 0.58) at step 90/90",
    ]


def test_the_callback_measures_the_pace_from_the_first_trial_start(tmp_path):
    out = io.StringIO()
    ray = console_for(sweep(), tmp_path, out, every_s=20)
    ray.wait(45)  # Ray starts its workers: no trial yet
    a = ray.trials[0]
    ray.start(a)
    ray.result(a, report(90, 0.6))
    ray.wait(15)
    ray.complete(a)
    ray.wait(5)
    assert out.getvalue().splitlines()[-1].endswith("; elapsed 1m05s, 180 trials/h, ~1m00s left")


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
        with ray.console.guarded():
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
    trial output), 35 at the end (the status table of 24 trials, blank lines, the --wide note,
    summary, next)."""
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
    assert len(lines) <= 120 - 4 - 35, len(lines)


# ============================================================================ With Ray


def tuner_for(spec: SweepSpec, experiment, console):
    """A Tuner built as lbs_tune.runner builds one, `console` its callback, Ray quiet."""
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
            callbacks=[console],
            verbose=0,
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
    from lbs_tune.record import record_start

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
    tuner = tuner_for(spec, experiment, console)
    # Ray's logger writes to the stderr it found at import, which pytest had replaced then:
    # its records are read here instead.
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray"):
            results = console.fit(tuner.fit, quiet=True)
    finally:
        ray_logger.removeHandler(caplog.handler)
    console.finish("sweep console: done")
    out, err = capfd.readouterr()
    out, err = without_ray_lines(out), without_ray_lines(err)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("ray")]
    assert len(results) == 4
    kinds: dict[str, list[str]] = {}
    for kind, point in re.findall(rf"^{STAMP} (\w+) +\w+_\d+ \(([^)]*)\)", out, re.MULTILINE):
        kinds.setdefault(point, []).append(kind)
    assert len(kinds) == 4, kinds
    for point, found in kinds.items():
        if "dataset=cifar10" in point:
            assert found == ["started", "retrying", "errored"], point
        else:
            assert found[0] == "started" and found[-1] in ("finished", "diverged"), point
            assert set(found[1:-1]) <= {"target"}, point
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
        "max_concurrent=2",
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


# Ray's log lines ("2026-01-01 12:00:00,000\tINFO worker.py:2029 -- Started a local Ray
# instance", "... INFO tune.py:1007 -- Wrote the latest version ...") and Optuna's
# ("[I 2026-01-01 12:00:00,000] A new study created in RDB ...").
RAY_INFO = re.compile(r"\bINFO [\w.]+\.py:\d+ -- ")
OPTUNA_INFO = re.compile(r"^\[I \d{4}-\d\d-\d\d ", re.MULTILINE)


@pytest.mark.ray
def test_a_tuned_sweep_log_file_has_its_outcomes_and_no_colour_or_info_lines(ray_cluster, tmp_path):
    """`lbs-tune run sweeps/quickstart_tuned.yaml > log 2>&1`, tiny: 2 batch sizes x 2 trials of
    at most 2 epochs, to 30%. The log says reached, missed or diverged of every trial, the best
    steps to target per batch size, and ends with a table of at most 120 columns, by grid point
    and trial number; no escape sequence, no INFO line of Ray or Optuna."""
    overrides = [
        f"base.data.samples={TINY_MNIST1D}",
        "base.epochs=2",
        "base.eval_every=0.25",
        "base.checkpoint_every=1",
        "grid.batch_size=[32, 128]",
        "search.trials_per_point=2",
        "search.confirm=null",  # the search's own trials only: confirmation is test_tuned's
        "target.value=0.3",
        "max_concurrent=2",
    ]
    command = [sys.executable, "-m", "lbs_tune.cli", "run", str(QUICKSTART_TUNED)]
    command += ["--storage", str(tmp_path), "--address", ray_cluster.address]
    for override in overrides:
        command += ["--set", override]
    log = tmp_path / "run.log"
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert done.returncode == 0, text
    assert ESC not in text
    assert not RAY_INFO.search(text) and not OPTUNA_INFO.search(text), text
    assert "performance bottleneck" not in text
    kinds = re.findall(rf"^{STAMP} (\w+) ", text, re.MULTILINE)
    assert kinds.count("started") == 4, text
    assert kinds.count("reached") + kinds.count("missed") + kinds.count("diverged") == 4, text
    assert "finished" not in kinds
    for line in re.findall(rf"^{STAMP} reached .*$", text, re.MULTILINE):
        assert re.search(r"  the target at step \d+ \(val/accuracy [\d.]+ >= 0.3\)$", line), line
    (last,) = [line for line in text.splitlines() if line.startswith("status: ")][-1:]
    assert "best steps to val/accuracy>=0.3 (trials done/total) by batch size 32: " in last
    assert re.search(r" 32: (\d+|-) \(2/2\), 128: (\d+|-) \(2/2\);", last), last
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trial  "))
    table = lines[start : lines.index("", start)]
    assert all(len(line) <= 120 for line in table), table
    header = re.split(r"\s{2,}", table[0])
    assert header[:4] == ["trial", "batch_size", "lr.base", "optimizer.momentum"], header
    assert "steps to target" in header
    sizes = [int(re.split(r"\s{2,}", row)[1]) for row in table[1:]]
    assert sizes == [32, 32, 128, 128]
