"""A trial with a batch schedule (`batch_schedule`) and a trial that starts from a checkpoint
(`start_from`): the batch of each step, the LR and Adam's moved hyper-parameters at each switch,
the budget and the reports counted in examples, and resume across a switch bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KeepingReporter, tiny_base, without_timing

from lbs_tune.branching import batch_at, examples_after, steps_to
from lbs_tune.checkpoints import save_checkpoint
from lbs_tune.config import TrialConfig
from lbs_tune.rules import peak_lr, sde_moved
from lbs_tune.training import train

# 1440 training examples (TINY_MNIST1D): batch 32 for 480 examples (15 steps), 64 up to 1200
# (12 steps, to 1248), then 128; 2 epochs = 2880 examples take 15 + 12 + 13 = 40 steps.
SCHEDULE = [[0, 32], [480, 64], [1200, 128]]


def scheduled(**changes) -> TrialConfig:
    base = tiny_base(
        batch_schedule=SCHEDULE, epochs=2, eval_every=0.125, checkpoint_every=0.25, **changes
    )
    del base["batch_size"]  # the schedule's first
    return TrialConfig.model_validate(base)


@pytest.fixture(scope="module")
def linear_run(data_dir) -> tuple[TrialConfig, KeepingReporter]:
    config = scheduled(lr__scaling="linear")
    keeper = KeepingReporter()
    train(config, keeper)
    return config, keeper


def test_each_report_counts_the_examples_and_the_batch_of_the_schedule(linear_run):
    config, keeper = linear_run
    schedule = config.batch_schedule
    assert config.batch_size == 32
    last = keeper.rows[-1]
    assert last["step"] == last["total_steps"] == 40 == steps_to(schedule, 2 * 1440)
    for row in keeper.rows:
        seen = examples_after(schedule, row["step"])
        assert row["examples"] == seen
        assert row["epoch"] == round(seen / 1440, 6)
        # The batch and LR of the step just made: the schedule's at the examples before it.
        batch = batch_at(schedule, examples_after(schedule, row["step"] - 1))
        assert row["batch"] == row["bn_batch"] == row["micro_batch"] == batch
        assert row["lr"] == row["peak_lr"] == peak_lr(config.lr, batch) == 0.05 * batch / 32
    # Every eighth of an epoch (180 examples) is crossed by exactly one report.
    marks = [math.floor(r["examples"] / 180) for r in keeper.rows]
    assert marks == list(range(1, 17))
    assert sorted({r["batch"] for r in keeper.rows}) == [32, 64, 128]


def test_resume_from_a_checkpoint_after_a_switch_is_bit_identical(linear_run):
    config, keeper = linear_run
    # The first checkpoint at batch 128: after both switches, before the end.
    step = min(s for s in keeper.states if 27 < s < 40)
    assert batch_at(config.batch_schedule, examples_after(config.batch_schedule, step)) == 128
    resumed = KeepingReporter()
    train(config, resumed, resume=keeper.states[step])
    after = [without_timing(r) for r in keeper.rows if r["step"] > step]
    assert [without_timing(r) for r in resumed.rows] == after and after
    # Between the switches too (batch 64): a resume must move the LR and optimizer itself.
    middle = min(s for s in keeper.states if 15 < s < 27)
    again = KeepingReporter()
    train(config, again, resume=keeper.states[middle])
    after = [without_timing(r) for r in keeper.rows if r["step"] > middle]
    assert [without_timing(r) for r in again.rows] == after


def test_measurements_follow_the_examples_across_switches_and_resume_bit_for_bit(data_dir):
    """Noise-scale windows every quarter epoch (360 examples) and the sharpness every half (720),
    as the evaluations: counted in examples, not in steps of the first batch (at batch 32 a
    quarter epoch is 11 steps, which after the switches to 64 and 128 spanned an epoch: 4
    windows of the 8 asked). A window (10 steps by default) ends where the next one starts:
    at batch 128 a quarter epoch is under 3 steps."""
    config = scheduled(
        noise_scale={"every": 0.25, "batch": 64, "hessian_examples": 0},
        sharpness={"every": 0.5, "batch": 64, "iterations": 2},
    )
    keeper = KeepingReporter()
    train(config, keeper)
    noise = [r for r in keeper.rows if "noise/b_simple" in r]
    sharp = [r for r in keeper.rows if "sharpness/top_eig" in r]
    # Windows start at step 0 and after each step that crosses 360, 720, ..., 2520 examples;
    # the sharpness after each that crosses 720, ..., 2880: one report each.
    assert len(noise) == 8 and len(sharp) == 4
    assert [math.floor(r["examples"] / 360) for r in noise] == list(range(1, 9))
    assert [math.floor(r["examples"] / 720) for r in sharp] == [1, 2, 3, 4]
    assert all(r["noise/b_simple"] is None or r["noise/b_simple"] > 0 for r in noise)
    # A checkpoint at batch 128 inside a window, resumed: the same numbers, measurements too.
    step = min(s for s in keeper.states if 27 < s < 40)
    resumed = KeepingReporter()
    train(config, resumed, resume=keeper.states[step])
    after = [without_timing(r) for r in keeper.rows if r["step"] > step]
    assert [without_timing(r) for r in resumed.rows] == after and after


def test_the_sde_rule_moves_adams_betas_and_eps_at_each_switch(data_dir):
    config = scheduled(
        optimizer={"name": "adamw", "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0},
        lr={"base": 1e-3, "base_batch_size": 32, "scaling": "sde"},
    )
    keeper = KeepingReporter()
    train(config, keeper)
    for row in keeper.rows:
        k = row["batch"] / 32
        betas, eps = sde_moved((0.9, 0.99), 1e-8, k)
        assert (row["optimizer/beta1"], row["optimizer/beta2"]) == betas
        assert row["optimizer/eps"] == eps
        assert row["peak_lr"] == pytest.approx(1e-3 * math.sqrt(k))
    step = min(s for s in keeper.states if 27 < s < 40)
    resumed = KeepingReporter()
    train(config, resumed, resume=keeper.states[step])
    after = [without_timing(r) for r in keeper.rows if r["step"] > step]
    assert [without_timing(r) for r in resumed.rows] == after


def test_a_trial_started_from_a_checkpoint_takes_its_weights_and_optimizer(tmp_path, data_dir):
    """start_from: model and optimizer from the file, the step counter from 0, the data order
    from the trial's own seed; under sde the optimizer moved to the trial's own batch."""
    adam = {"name": "adamw", "betas": [0.9, 0.99], "weight_decay": 0.0}
    first = TrialConfig.model_validate(
        tiny_base(optimizer=adam, lr={"base": 1e-3, "base_batch_size": 32}, steps=10)
    )
    keeper = KeepingReporter()
    train(first, keeper)
    path = tmp_path / "state.pt"
    save_checkpoint({**keeper.states[10], "reports": keeper.rows}, path)

    # A continuation at 4 x the batch by the SDE rule, its betas moved from the reference's.
    branch = TrialConfig.model_validate(
        tiny_base(
            optimizer=adam,
            lr={"base": 1e-3, "base_batch_size": 32, "scaling": "sde"},
            batch_size=128,
            seed=5,
            steps=3,
            eval_every=100,
            start_from=str(path),
        )
    )
    moved = KeepingReporter()
    train(branch, moved)
    assert [r["step"] for r in moved.rows] == [3]
    state = moved.states[3]
    groups = state["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == pytest.approx((0.6, 0.96)) for g in groups)
    # Adam's step count went on from the reference's 10.
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {13.0}
    # From scratch (no start_from) the weights differ: the start was used.
    fresh = KeepingReporter()
    train(branch.model_copy(update={"start_from": None}), fresh)
    weights = next(iter(state["model"].values()))
    assert not torch.equal(weights, next(iter(fresh.states[3]["model"].values())))
