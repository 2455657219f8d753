"""The local critical batch size on hand-made loss tables, the step accounting of batch-size
schedules (by hand, against a step-by-step simulation, and against Merrill et al.'s Table 1), and
the batch-size warmup planner."""

from __future__ import annotations

import math

import pytest

from lbs_tune.branching import (
    LocalCBS,
    batch_at,
    critical_multiple,
    examples_after,
    local_cbs,
    parse_schedule,
    plan_schedule,
    smoothed,
    steps_saved,
    steps_to,
    switch_steps,
)
from lbs_tune.config import LRConfig
from lbs_tune.rules import scheduled_lrs

# --------------------------------------------------------------------------- Local CBS


def test_smoothed_is_an_exponential_moving_average():
    # alpha 0.5: 4 -> 0.5 x 2 + 0.5 x 4 = 3 -> 0.5 x 1 + 0.5 x 3 = 2.
    assert smoothed([4.0, 2.0, 1.0]) == 2.0
    # alpha 0.25: 4 -> 0.25 x 2 + 0.75 x 4 = 3.5 -> 0.25 x 1 + 0.75 x 3.5 = 2.875.
    assert smoothed([4.0, 2.0, 1.0], alpha=0.25) == 2.875
    assert smoothed([4.0, 2.0, 1.0], alpha=1.0) == 1.0  # the last loss alone
    assert smoothed([3.5]) == 3.5
    with pytest.raises(ValueError, match="no losses"):
        smoothed([])
    with pytest.raises(ValueError, match="alpha"):
        smoothed([1.0], alpha=0.0)


def test_monotone_table():
    # eps 0.01: k = 2 (3.005 <= 3.01) and k = 4 (3.009 <= 3.01, <= 3.015) pass; k = 8 does not.
    losses = {1: 3.0, 2: 3.005, 4: 3.009, 8: 3.02, 16: 3.05}
    assert critical_multiple(losses) == 4
    assert local_cbs({k: [v] for k, v in losses.items()}, 64) == LocalCBS(256, 512, (256,))


def test_every_smaller_k_counts_not_only_the_first():
    # k = 4 is within eps of k = 1 (3.00 <= 3.01) but not of k = 2 (3.00 > 2.98 + 0.01).
    assert critical_multiple({1: 3.0, 2: 2.98, 4: 3.0}) == 2


def test_non_monotone_table_takes_the_largest_k_that_passes():
    # k = 2 fails (3.02 > 3.01); k = 4 is within eps of both k = 1 and k = 2, so k* = 4: the
    # paper's rule read literally ("the maximum k such that, for all k < k*, ...").
    assert critical_multiple({1: 3.0, 2: 3.02, 4: 3.005}) == 4


def test_no_larger_k_within_eps():
    assert local_cbs({1: [3.0], 2: [3.1], 4: [3.2]}, 32) == LocalCBS(32, 64, (32,))


def test_every_k_within_eps():
    assert local_cbs({1: [3.0], 2: [3.0], 4: [3.0], 8: [3.009]}, 32) == LocalCBS(256, None, (256,))


def test_tolerance_and_unsorted_keys():
    losses = {8: 3.05, 1: 3.0, 4: 3.03, 2: 3.02}
    assert critical_multiple(losses) == 1
    assert critical_multiple(losses, tolerance=0.035) == 4
    assert critical_multiple(losses, tolerance=0.06) == 8


def test_multiples_below_one():
    # As at Merrill et al.'s step-0 checkpoints (k in 0.0625, 0.125, 0.25): batch 1024 x k.
    result = local_cbs({0.0625: [7.0], 0.125: [7.005], 0.25: [7.2]}, 1024)
    assert result == LocalCBS(128, 256, (128,))


def test_seeds_compare_means_and_give_a_spread():
    # Three seeds at batch 64. Means: k=1 3.00, k=2 3.005, k=4 3.00667, k=8 3.05: k* = 4.
    losses = {
        1: [3.00, 3.02, 2.98],
        2: [3.005, 3.00, 3.01],
        4: [3.03, 2.99, 3.00],
        8: [3.05, 3.04, 3.06],
    }
    # Seed 0: k=2 passes, k=4 fails (3.03 > 3.01) -> 2. Seed 1: k=2 (3.00 <= 3.03) and k=4
    # (2.99 <= 3.01) pass, k=8 fails -> 4. Seed 2: k=2 fails (3.01 > 2.99), k=4 fails -> 1.
    assert local_cbs(losses, 64) == LocalCBS(batch=256, upper=512, per_seed=(128, 256, 64))


def test_diverged_branches_fail_and_hold_nothing_back():
    assert critical_multiple({1: 3.0, 2: 3.001, 4: math.inf, 8: math.nan}) == 2
    # A diverged seed makes its k's mean infinite.
    assert local_cbs({1: [3.0, 3.0], 2: [3.0, math.nan]}, 16) == LocalCBS(16, 32, (32, 16))
    # A diverged smaller k does not count against a larger one.
    assert critical_multiple({1: 3.0, 2: math.nan, 4: 3.005}) == 4
    # But a failed reference (the smallest k) is no loss to keep up with: every larger k beat
    # its inf, and k* was the largest tried.
    assert critical_multiple({1: math.inf, 2: 3.0, 4: 3.0}) == 1
    assert local_cbs({1: [3.0, math.inf], 2: [3.0, 3.0], 4: [3.0, 3.0]}, 32) == LocalCBS(
        32, 64, (128, 32)
    )


def test_bad_tables():
    with pytest.raises(ValueError, match="empty"):
        local_cbs({}, 64)
    with pytest.raises(ValueError, match="same number of seeds"):
        local_cbs({1: [3.0, 3.1], 2: [3.0]}, 64)


# --------------------------------------------------------------------------- Schedules

SCHEDULE = ((0, 64), (200, 128), (600, 256))


def test_parse_schedule_list_form():
    assert parse_schedule([[0, 64], [2e5, 128], [6e5, 256]]) == (
        (0, 64),
        (200_000, 128),
        (600_000, 256),
    )


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "at least one"),
        ([[10, 64]], "must start at 0"),
        ([[0, 64], [100, 128], [100, 256]], "entry 2 starts at 100 examples, not after entry 1"),
        ([[0, 64], [50, 128], [20, 256]], "must increase"),
        ([[0, 64.5]], "batch size 64.5 is not a whole number"),
        ([[0, 0]], "batch size 0 must be positive"),
        ([[0, 64, 3]], r"entry 0 is \[0, 64, 3\]"),
        (["0, 64"], "each entry is"),
        ([[0, "64"]], "is not a number"),
        ([[0, 64], [math.inf, 128]], "not a whole number"),
    ],
)
def test_parse_schedule_refuses(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(entries)


def test_batch_at_switches_exactly_at_the_threshold():
    assert [batch_at(SCHEDULE, e) for e in (0, 199, 200, 599, 600, 10**12)] == [
        64,
        64,
        128,
        128,
        256,
        256,
    ]


def test_step_accounting_by_hand():
    # Steps of 64 start at 0, 64, 128, 192 (< 200): the fourth ends at 256, past the switch.
    # Steps of 128 start at 256, 384, 512 (< 600) and end at 640; then steps of 256.
    assert switch_steps(SCHEDULE) == (0, 4, 7)
    assert [examples_after(SCHEDULE, n) for n in range(10)] == [
        0, 64, 128, 192, 256, 384, 512, 640, 896, 1152,
    ]  # fmt: skip
    assert [steps_to(SCHEDULE, e) for e in (0, 1, 64, 65, 256, 257, 640, 641, 1152)] == [
        0, 1, 1, 2, 4, 5, 7, 8, 9,
    ]  # fmt: skip


def _simulate(schedule, steps, per_row=1):
    """Examples seen after each step, one step at a time, by `batch_at` at the step's start."""
    seen = [0]
    for _ in range(steps):
        seen.append(seen[-1] + batch_at(schedule, seen[-1]) * per_row)
    return seen


@pytest.mark.parametrize(
    ("schedule", "per_row"),
    [
        (SCHEDULE, 1),
        (((0, 3), (10, 5), (11, 7), (40, 2)), 1),
        (((0, 100), (150, 10), (160, 1000)), 1),  # the batch of 10 is jumped over
        (((0, 20), (7000, 40), (20000, 80)), 35),  # rows of bptt 35 tokens
    ],
)
def test_step_accounting_matches_a_step_by_step_simulation(schedule, per_row):
    seen = _simulate(schedule, 60, per_row)
    assert [examples_after(schedule, n, per_row) for n in range(61)] == seen
    # Every count next to a step's start or a switch: where an off-by-one would show.
    near = {e + d for e in seen + [start for start, _ in schedule] for d in (-1, 0, 1)}
    for examples in sorted(e for e in near if 0 <= e <= seen[-1]):
        expected = next(n for n, e in enumerate(seen) if e >= examples)
        assert steps_to(schedule, examples, per_row) == expected
    firsts = tuple(next(n for n, e in enumerate(seen) if e >= start) for start, _ in schedule)
    assert switch_steps(schedule, per_row) == firsts


def test_jumped_over_entry_has_no_steps():
    # Steps of 100 start at 0 and 100; the second ends at 200, past 150 and 160.
    assert switch_steps(((0, 100), (150, 10), (160, 1000))) == (0, 2, 2)


def test_merrill_table_1_step_savings():
    # Merrill et al. 2025, section 4.2 and Table 1 (OLMo 1B). Batch sizes in documents of 4096
    # tokens ("We measure the CBS in documents, with a pretraining sequence length of 4096
    # tokens per document"), switches in tokens: batch size warmup starts at 1024 and doubles
    # where "the CBS reaches 2048 by 168B tokens and 4096 by 503B tokens"; pretraining runs for
    # "608B tokens", then mid-training anneals the LR "for 50B tokens, keeping the batch size
    # fixed at its final value". Table 1 counts "the percentage of gradient steps saved vs. the
    # small-batch control (including annealing steps)": 43% for batch size warmup, 75% for the
    # large-batch control (constant 4096).
    tokens_per_document = 4096
    warmup = parse_schedule([[0, 1024], [168e9, 2048], [503e9, 4096]])
    small, large = ((0, 1024),), ((0, 4096),)
    total = 608 * 10**9 + 50 * 10**9
    saved = steps_saved(warmup, small, total, per_row=tokens_per_document)
    assert round(100 * saved) == 43  # Table 1: 43%
    assert saved == pytest.approx(0.4312, abs=1e-4)
    assert round(100 * steps_saved(large, small, total, per_row=tokens_per_document)) == 75
    # Without the 50B annealing tokens the saving is 40.5%: the 43% needs them counted.
    pretraining = steps_saved(warmup, small, 608 * 10**9, per_row=tokens_per_document)
    assert pretraining == pytest.approx(0.405, abs=1e-3)


def test_learning_rate_moves_with_the_rule_at_each_switch():
    # Merrill et al. section 4.2: base LR sqrt(2) x 0.0004 at batch 1024, square-root rule at
    # each doubling; their large-batch control at 4096 uses 2 sqrt(2) x 0.0004, the warmup's
    # last LR.
    warmup = ((0, 1024), (168 * 10**9, 2048), (503 * 10**9, 4096))
    adam = LRConfig(base=math.sqrt(2) * 4e-4, base_batch_size=1024, scaling="sqrt")
    assert scheduled_lrs(warmup, adam) == pytest.approx(
        (math.sqrt(2) * 4e-4, 2 * 4e-4, 2 * math.sqrt(2) * 4e-4)
    )
    # SGD's linear rule doubles the LR with the batch; the SDE rule moves it as sqrt does.
    sgd = LRConfig(base=0.1, base_batch_size=1024, scaling="linear")
    assert scheduled_lrs(warmup, sgd) == pytest.approx((0.1, 0.2, 0.4))
    sde = LRConfig(base=1e-3, base_batch_size=1024, scaling="sde")
    assert scheduled_lrs(warmup, sde) == pytest.approx((1e-3, 1e-3 * math.sqrt(2), 2e-3))


# --------------------------------------------------------------------------- Planner


def test_planner_reproduces_merrills_warmup_and_its_savings():
    # Their reading of the CBS (section 4.2): near 0 at the start, 2048 by 168B tokens, 4096 by
    # 503B tokens, with the batch starting at 1024.
    probes = [(0, 0), (50 * 10**9, 1500), (168 * 10**9, 2048), (300 * 10**9, 3000),
              (503 * 10**9, 4096), (600 * 10**9, 4500)]  # fmt: skip
    plan = plan_schedule(probes, 1024)
    assert plan == [[0, 1024], [168 * 10**9, 2048], [503 * 10**9, 4096]]
    saved = steps_saved(parse_schedule(plan), ((0, 1024),), 658 * 10**9, per_row=4096)
    assert round(100 * saved) == 43


def test_planner_doubles_only_when_the_cbs_reaches_twice_the_batch():
    assert plan_schedule([(100, 127), (200, 128)], 64) == [[0, 64], [200, 128]]


def test_planner_never_goes_down_and_takes_probes_in_order():
    probes = [(900, 100), (300, 300), (600, 140)]  # at 600 the CBS dips: no change
    assert plan_schedule(probes, 64) == [[0, 64], [300, 256]]


def test_planner_doubles_several_times_at_one_probe():
    # The CBS grew from 64 to 600 between probes: 64 -> 128 -> 256 -> 512 (1024 > 600).
    assert plan_schedule([(1000, 600)], 64) == [[0, 64], [1000, 512]]


def test_planner_caps_the_batch():
    assert plan_schedule([(10, 256), (20, 10**6)], 64, max_batch=512) == [
        [0, 64],
        [10, 256],
        [20, 512],
    ]


def test_planner_with_a_large_cbs_at_the_start():
    assert plan_schedule([(0, 300), (50, 600)], 64) == [[0, 256], [50, 512]]


def test_planner_without_a_reason_to_switch():
    assert plan_schedule([(10, 64), (20, 100)], 64) == [[0, 64]]
    assert plan_schedule([], 64) == [[0, 64]]
