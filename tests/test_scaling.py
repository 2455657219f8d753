"""The critical-batch-size fit (analysis.scaling) on data made from its own formula, on noisy
data with a tolerance from least-squares theory, and on a worked example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.scaling import REGIME_FACTOR, fit_scaling, fitted_curve, regimes

S_MIN, B_NOISE = 1000.0, 256.0
BATCHES = 2.0 ** np.arange(4, 14)  # 16 .. 8192: B_noise / 16 .. 32 B_noise


def steps(b, s_min=S_MIN, b_noise=B_NOISE):
    return s_min * (1 + b_noise / np.asarray(b, dtype=float))


def test_exact_points_give_the_parameters_back():
    fit = fit_scaling(BATCHES, steps(BATCHES), resamples=100)
    assert fit.reason is None and fit.bracketed
    assert fit.s_min == pytest.approx(S_MIN, rel=0.02)
    assert fit.b_noise == pytest.approx(B_NOISE, rel=0.02)
    assert fit.e_min == pytest.approx(S_MIN * B_NOISE, rel=0.02)
    assert fit.b_crit == pytest.approx(fit.e_min / fit.s_min)
    assert fit.resamples == 100
    for name, truth in {"s_min": S_MIN, "b_noise": B_NOISE, "e_min": S_MIN * B_NOISE}.items():
        low, high = fit.intervals[name]
        assert low == pytest.approx(truth, rel=0.02) and high == pytest.approx(truth, rel=0.02)


def test_a_worked_example_of_two_points():
    # S = S_min + E_min / B is linear in 1/B. From S(64) = 5000 and S(1024) = 1250:
    #   5000 - 1250 = E_min (1/64 - 1/1024) = E_min * 15/1024  ->  E_min = 3750 * 1024/15 = 256000
    #   S_min = 1250 - 256000/1024 = 1250 - 250 = 1000;  B_noise = B_crit = E_min / S_min = 256.
    # A third point on the same curve, S(256) = 1000 (1 + 256/256) = 2000, changes nothing.
    for batch_sizes, measured in (
        ([64, 1024], [5000, 1250]),
        ([64, 256, 1024], [5000, 2000, 1250]),
    ):
        fit = fit_scaling(batch_sizes, measured, resamples=50)
        assert fit.s_min == pytest.approx(1000, rel=1e-6)
        assert fit.e_min == pytest.approx(256000, rel=1e-6)
        assert fit.b_noise == pytest.approx(256, rel=1e-6)
        assert fit.b_crit == pytest.approx(256, rel=1e-6)
    assert fit_scaling([64, 1024], [5000, 1250]).intervals == {}  # 2 points: no interval


def test_ten_percent_noise_is_recovered_within_three_standard_errors():
    # Multiplicative noise of 10% is a residual of sigma = 0.1 on log S. Least-squares theory
    # gives the standard errors of (log S_min, log B_noise): sigma^2 (J^T J)^-1 with J the
    # Jacobian of log S at the truth: d/dlog S_min = 1, d/dlog B_noise = B_noise / (B + B_noise).
    # Over these 10 batch sizes that is about 5% on S_min and 9% on B_noise; the fit must land
    # within three of them (a miss has odds of about 1 in 400 per parameter and draw; this draw
    # is seeded).
    sigma = 0.1
    jacobian = np.stack([np.ones_like(BATCHES), B_NOISE / (BATCHES + B_NOISE)], axis=1)
    se_log_s_min, se_log_b_noise = sigma * np.sqrt(np.diag(np.linalg.inv(jacobian.T @ jacobian)))
    assert 0.04 < se_log_s_min < 0.07 and 0.07 < se_log_b_noise < 0.12
    noise = np.exp(np.random.default_rng(7).normal(0, sigma, len(BATCHES)))
    fit = fit_scaling(BATCHES, steps(BATCHES) * noise, resamples=300)
    assert abs(math.log(fit.s_min / S_MIN)) < 3 * se_log_s_min
    assert abs(math.log(fit.b_noise / B_NOISE)) < 3 * se_log_b_noise
    low, high = fit.intervals["b_crit"]
    assert low < B_NOISE < high and low < fit.b_crit < high


def test_one_far_off_batch_size_moves_the_robust_fit_little():
    measured = steps(BATCHES)
    measured[3] *= 2  # one study found only a poor learning rate
    fit = fit_scaling(BATCHES, measured, resamples=0)
    # Within 5% (plain least squares puts B_noise 15% off).
    assert fit.s_min == pytest.approx(S_MIN, rel=0.05)
    assert fit.b_noise == pytest.approx(B_NOISE, rel=0.05)
    assert fit.intervals == {}


def test_batch_sizes_that_never_reached_the_target_are_left_out():
    measured = list(steps(BATCHES))
    measured[0], measured[-1] = None, math.nan
    fit = fit_scaling(BATCHES, measured, resamples=20)
    assert fit.batch_sizes == tuple(BATCHES[1:-1])
    assert fit.b_noise == pytest.approx(B_NOISE, rel=0.02)


@pytest.mark.parametrize(
    "batch_sizes, measured, count",
    [([64, 128], [None, 3000.0], 1), ([64, 128], [None, None], 0), ([64, 64], [3000.0, 2900.0], 1)],
)
def test_fewer_than_two_batch_sizes_that_reached_give_no_fit(batch_sizes, measured, count):
    fit = fit_scaling(batch_sizes, measured)
    assert (fit.s_min, fit.e_min, fit.b_noise, fit.b_crit) == (None, None, None, None)
    assert fit.reason == f"{count} batch size(s) reached the target; the fit needs 2"
    with pytest.raises(ValueError, match="no fit"):
        fitted_curve(fit, [64])


def test_perfect_scaling_throughout_puts_b_crit_beyond_the_swept_range():
    fit = fit_scaling(BATCHES, 1e6 / BATCHES, resamples=0)  # steps halve at every doubling
    assert not fit.bracketed and fit.b_crit > BATCHES.max()
    assert fit.e_min == pytest.approx(1e6, rel=0.01)  # the product is still determined


def test_curve_and_regimes():
    fit = fit_scaling(BATCHES, steps(BATCHES), resamples=0)
    curve = fitted_curve(fit, [64, 256, 1024])
    assert curve.steps == pytest.approx([5000, 2000, 1250], rel=1e-4)
    # E(B) = E_min (1 + B / B_noise); at B_crit, twice S_min steps and twice E_min examples.
    assert curve.examples == pytest.approx(256000 * (1 + np.array([64, 256, 1024]) / 256), rel=1e-4)
    below, above = regimes(fit.b_crit)
    assert (below, above) == pytest.approx((256 / REGIME_FACTOR, 256 * REGIME_FACTOR), rel=1e-4)
    # The local exponent -dlog S/dlog B is 0.8 and 0.2 at the boundaries.
    for b, exponent in ((below, 0.8), (above, 0.2)):
        s1, s2 = fitted_curve(fit, [b * 0.999, b * 1.001]).steps
        assert -math.log(s2 / s1) / math.log(1.001 / 0.999) == pytest.approx(exponent, rel=1e-3)
