"""The search-budget curve (analysis.budget.best_of_k) against enumeration of every k-subset
and a case worked by hand; censoring by the step cap and the step caps on hand-made tables
with the quickstart_tuned sweep's numbers."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from analysis.budget import (
    HALF,
    QUANTILES,
    best_distribution,
    best_of_k,
    censoring,
    scaled_caps,
)
from lbs_tune.config import TrialConfig, total_steps

# quickstart_tuned: MNIST-1D with 7200 training examples, batch sizes 16..2048, 10 epochs;
# its fit S_min 22.6, B_crit 217; the best trial at 2048 needed 27 steps of a cap of 35.
TRAIN, EPOCHS = 7200, 10
SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048]
S_MIN, B_CRIT = 22.6, 217.0


def step_caps(sizes, epochs=EPOCHS, min_steps=None):
    """The quickstart's step budgets through the budget's one formula, `total_steps`."""
    return [
        total_steps(TrialConfig(batch_size=b, epochs=epochs, min_steps=min_steps), TRAIN)
        for b in sizes
    ]


def enumerate_best(values, k):
    """The best of every k-subset, counted exactly: {best: Fraction of subsets}."""
    subsets = list(itertools.combinations(values, k))
    counts: dict[float, Fraction] = {}
    for subset in subsets:
        best = min(subset)
        counts[best] = counts.get(best, 0) + Fraction(1, len(subsets))
    return counts


def quantile(distribution, q):
    """The smallest value with at least q of the searches at or below it."""
    total = Fraction(0)
    for value in sorted(distribution):
        total += distribution[value]
        if total >= q:
            return value
    raise AssertionError("probabilities do not sum to 1")


# ============================================================================ best_of_k


def test_a_budget_curve_worked_by_hand():
    # Trials 10, 20, 30 steps and one that never reached the target.
    # k = 1: each trial alone: mean of the feasible (10 + 20 + 30) / 3 = 20, infeasible 1/4.
    # k = 2: the 6 pairs' bests 10, 10, 10, 20, 20, 30: mean 100/6, never infeasible.
    # k = 3: the 4 triples' bests 10, 10, 10, 20: mean 12.5. k = 4: 10.
    curve = best_of_k([10, 20, 30, None])
    assert curve.k.tolist() == [1, 2, 3, 4]
    assert curve.expected == pytest.approx([20, 100 / 6, 12.5, 10])
    assert curve.infeasible.tolist() == [0.25, 0, 0, 0]
    assert curve.median.tolist() == [20, 10, 10, 10]
    # 90%: a single trial misses the target 1 time in 4; the pairs' bests are 30 in 1 of 6.
    assert curve.high.tolist() == [math.inf, 30, 20, 10]
    assert curve.low.tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("n", range(1, 8))
def test_the_budget_curve_is_exact_over_all_subsets(n):
    rng = np.random.default_rng(n)
    # Values with ties and trials that never reached the target.
    values = [None if rng.random() < 0.3 else float(rng.integers(1, 5)) * 10 for _ in range(n)]
    values = [math.inf if v is None else v for v in values]
    curve = best_of_k(values)
    for k in range(1, n + 1):
        exact = enumerate_best(values, k)
        never = exact.get(math.inf, Fraction(0))
        assert curve.infeasible[k - 1] == pytest.approx(float(never), abs=1e-15)
        if never < 1:
            mean = sum(p * v for v, p in exact.items() if v != math.inf) / (1 - never)
            assert curve.expected[k - 1] == pytest.approx(float(mean))
        else:
            assert math.isnan(curve.expected[k - 1])
        assert curve.median[k - 1] == quantile(exact, Fraction(1, 2))
        assert curve.low[k - 1] == quantile(exact, Fraction(QUANTILES[0]).limit_denominator())
        assert curve.high[k - 1] == quantile(exact, Fraction(QUANTILES[1]).limit_denominator())


def test_the_best_of_k_distribution_sums_to_one():
    for n in (1, 5, 40):
        assert best_distribution(n).sum(axis=1) == pytest.approx(np.ones(n))


def test_a_study_with_no_trials_has_no_curve():
    with pytest.raises(ValueError, match="no trials"):
        best_of_k([])


# ============================================================================ censoring


def test_the_quickstart_budget_censors_batch_2048():
    caps = dict(zip(SIZES, step_caps(SIZES), strict=True))
    trials = [
        # batch 16: best 330 steps of 4500; two rates too small ran to the cap; one diverged
        (16, 330.0, caps[16], False),
        (16, 900.0, caps[16], False),
        (16, None, caps[16], False),
        (16, None, caps[16], False),
        (16, None, caps[16], True),
        # batch 2048: best 27 of 35, six ran to the cap without diverging, one diverged
        (2048, 27.0, caps[2048], False),
        *[(2048, None, caps[2048], False)] * 6,
        (2048, None, caps[2048], True),
    ]
    small, large = censoring(trials)
    assert small == (16.0, 5, 2, 1, 2, 330.0, 4500, pytest.approx(330 / 4500), False)
    assert large == (2048.0, 8, 1, 1, 6, 27.0, 35, pytest.approx(27 / 35), True)
    # The same best under a floor of 100 steps uses 27% of its cap: not flagged.
    floored = [(b, s, 100, d) for b, s, _, d in trials if b == 2048]
    (point,) = censoring(floored)
    assert (point.used, point.flagged) == (0.27, False)


def test_censoring_edge_cases():
    points = censoring(
        [
            (64, 50.0, 100, False),  # exactly half its cap: not more than half
            (128, None, 80, True),  # nothing reached, all diverged: the cap decided nothing
            (256, None, 40, False),  # nothing reached, one ran to its cap: flagged
            (512, 30.0, 40, False),  # ties on steps go to the larger cap
            (512, 30.0, 90, False),
            (512, math.inf, 90, False),  # inf is never reached
        ]
    )
    assert [p.batch_size for p in points] == [64, 128, 256, 512]
    assert [p.flagged for p in points] == [False, False, True, False]
    assert (points[1].best_steps, points[1].used, points[1].capped) == (None, None, 0)
    assert (points[3].best_cap, points[3].capped, points[3].reached) == (90, 1, 2)
    assert censoring([(64, 51.0, 100, False)])[0].flagged and HALF == 0.5


# ============================================================================ caps


def test_equal_epochs_and_a_floor():
    # round(10 x 7200 / B): the quickstart's caps, 4500 steps at batch 16 and 35 at 2048.
    assert step_caps(SIZES) == [4500, 2250, 1125, 562, 281, 141, 70, 35]
    assert step_caps(SIZES, min_steps=100) == [4500, 2250, 1125, 562, 281, 141, 100, 100]
    assert step_caps([4096], epochs=0.1) == [1]  # never 0 steps
    # An examples budget takes the floor too; a steps budget is its own and refuses one.
    assert total_steps(TrialConfig(batch_size=2048, examples=8192, min_steps=30), TRAIN) == 30
    with pytest.raises(ValueError, match="min_steps is a floor on an epochs or examples"):
        TrialConfig(steps=10, min_steps=20)


def test_caps_from_perfect_scaling_leave_the_model_half_its_cap():
    # By hand: 330 steps at batch 16 are 5280 examples; at batch 32 perfect scaling predicts
    # 165 steps, and 4 times that is 660.
    assert scaled_caps([16, 32], [330, None]) == [None, 660]
    # A noisy low value at 32 does not lower the cap at 64: the most examples of the smaller.
    assert scaled_caps([16, 32, 64], [330, 100, None]) == [None, 660, 330]
    # On the quickstart's fitted curve, doubling batch sizes and factor 4 (2 x the ratio of
    # neighbours): every batch size's steps use at most half of its cap.
    truth = [S_MIN * (1 + B_CRIT / b) for b in SIZES]
    caps = scaled_caps(SIZES, truth)
    assert caps[0] is None
    for steps, cap in zip(truth[1:], caps[1:], strict=True):
        assert steps <= HALF * cap
    # Far above B_crit (steps flat) the half is nearly used: factor 4 is the least that works.
    assert truth[-1] / caps[-1] == pytest.approx(0.5, abs=0.05)
