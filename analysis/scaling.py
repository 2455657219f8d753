"""The critical batch size: S(B) = S_min (1 + B_noise / B) fitted to steps-to-target (pure).

McCandlish et al. 2018 ("An empirical model of large-batch training") model the steps S and the
examples E = B S that training needs to reach a target at batch size B as

    S(B) = S_min (1 + B_noise / B),    E(B) = E_min (1 + B / B_noise),    E_min = S_min B_noise,

and define the critical batch size B_crit = E_min / S_min. Within this form B_crit equals
B_noise; both are returned, as the paper names both. Steps halve with each doubling of B far
below B_crit (perfect scaling), stop falling far above it (maximal data parallelism), and at
B_crit training takes 2 S_min steps and 2 E_min examples.

`fit_scaling` fits the form to the best steps-to-target at each batch size (those that reached
the target) by robust least squares on log S, with bootstrap intervals over the batch sizes.
numpy and scipy only: no I/O, no torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares

RESAMPLES = 1000  # bootstrap fits for the intervals
LEVEL = 0.95  # the intervals' coverage: the 2.5th and 97.5th percentiles of the bootstrap fits
# soft_l1's scale on log S: a batch size whose steps miss the curve by up to ~10% counts as in
# least squares; one that misses by more (one lucky or unlucky study) counts only linearly.
F_SCALE = 0.1
# B_noise is searched within this factor beyond the batch sizes swept; data that do not bracket
# the critical batch size put it at this bound (and the fit says so: `bracketed`).
REACH = 1000.0
# The regimes' boundaries, at B_crit / 4 and 4 B_crit (see `regimes`).
REGIME_FACTOR = 4.0
PARAMETERS = ("s_min", "e_min", "b_noise", "b_crit")


class ScalingFit(NamedTuple):
    """The fit: parameters (None when there is no fit, with `reason`), their bootstrap
    intervals ({name: (low, high)} at LEVEL, {} with fewer than 3 batch sizes), and the
    points it used."""

    s_min: float | None
    e_min: float | None
    b_noise: float | None
    b_crit: float | None
    intervals: dict[str, tuple[float, float]]
    batch_sizes: tuple[float, ...]  # the batch sizes that reached the target, as given
    steps: tuple[float, ...]  # their steps to target
    resamples: int  # bootstrap fits behind the intervals
    bracketed: bool  # B_crit lies within the batch sizes fitted
    reason: str | None  # why there is no fit


class Regimes(NamedTuple):
    """Perfect scaling below `perfect_below`, maximal data parallelism above `maximal_above`,
    diminishing returns between."""

    perfect_below: float
    maximal_above: float


class Curve(NamedTuple):
    batch_sizes: np.ndarray
    steps: np.ndarray  # S(B)
    examples: np.ndarray  # E(B) = B S(B)


def fit_scaling(
    batch_sizes: Sequence[float],
    steps: Sequence[float | None],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> ScalingFit:
    """Fit S(B) = S_min (1 + B_noise / B) to `steps` (the best steps to target at each of
    `batch_sizes`; None, NaN or inf where the target was not reached: left out).

    Robust least squares (scipy's soft_l1, scale F_SCALE) on log S over (log S_min, log B_noise),
    so every batch size weighs by its relative error; started from the linear least-squares fit
    of S = S_min + E_min / B. Intervals: `resamples` fits to the batch sizes drawn with
    replacement (resamples with fewer than 2 distinct batch sizes are skipped), `seed`ed, the
    central `level` percentile interval of each parameter.
    """
    points = [
        (float(b), float(s))
        for b, s in zip(batch_sizes, steps, strict=True)
        if s is not None and math.isfinite(s) and s > 0
    ]
    b = np.array([p[0] for p in points])
    s = np.array([p[1] for p in points])
    if np.any(b <= 0):
        raise ValueError(f"batch sizes are > 0, got {sorted(b.tolist())}")
    distinct = len(set(b.tolist()))
    if distinct < 2:
        return ScalingFit(
            None,
            None,
            None,
            None,
            {},
            tuple(b),
            tuple(s),
            0,
            False,
            f"{distinct} batch size(s) reached the target; the fit needs 2",
        )
    bounds = _bounds(b, s)
    s_min, b_noise = _fit(b, s, bounds)
    intervals, used = {}, 0
    if distinct >= 3 and resamples:
        rng = np.random.default_rng(seed)
        fits = []
        for _ in range(resamples):
            pick = rng.integers(0, len(b), len(b))
            if len(set(b[pick].tolist())) >= 2:
                fits.append(_fit(b[pick], s[pick], bounds))
        used = len(fits)
        fitted = np.array(fits)
        values = {
            "s_min": fitted[:, 0],
            "e_min": fitted[:, 0] * fitted[:, 1],
            "b_noise": fitted[:, 1],
            "b_crit": fitted[:, 1],
        }
        tail = 100 * (1 - level) / 2
        intervals = {
            name: tuple(float(q) for q in np.percentile(values[name], [tail, 100 - tail]))
            for name in PARAMETERS
        }
    return ScalingFit(
        s_min,
        s_min * b_noise,
        b_noise,
        b_noise,  # E_min / S_min
        intervals,
        tuple(b),
        tuple(s),
        used,
        bool(b.min() <= b_noise <= b.max()),
        None,
    )


def _bounds(b: np.ndarray, s: np.ndarray) -> tuple[list[float], list[float]]:
    """Bounds on (log S_min, log B_noise): S_min up to the largest steps seen (S(B) > S_min),
    down to REACH times below the smallest; B_noise within REACH of the batch sizes swept."""
    low = [math.log(s.min() / REACH), math.log(b.min() / REACH)]
    high = [math.log(s.max()), math.log(b.max() * REACH)]
    return low, high


def _fit(b: np.ndarray, s: np.ndarray, bounds) -> tuple[float, float]:
    """(S_min, B_noise) fitted to the points (b, s); see fit_scaling."""

    def residuals(theta: np.ndarray) -> np.ndarray:
        return theta[0] + np.log1p(np.exp(theta[1]) / b) - np.log(s)

    # S = S_min + E_min (1 / B) is linear: its least squares, weighted by 1 / S (relative
    # errors), start the fit where it is sensible.
    design = np.stack([np.ones_like(b), 1 / b], axis=1) / s[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    start = np.clip(
        [math.log(max(s_min, s.min() / 10)), math.log(max(e_min, 1e-12) / max(s_min, 1e-12))],
        np.array(bounds[0]) + 1e-9,
        np.array(bounds[1]) - 1e-9,
    )
    result = least_squares(residuals, start, loss="soft_l1", f_scale=F_SCALE, bounds=bounds)
    return float(math.exp(result.x[0])), float(math.exp(result.x[1]))


def regimes(b_crit: float) -> Regimes:
    """The regimes' boundaries, B_crit / 4 and 4 B_crit.

    McCandlish et al. call B << B_crit the regime where steps fall in proportion to the batch
    size (perfect scaling) and B >> B_crit the one where they stop falling (maximal data
    parallelism; Shallue et al. 2018 name the three regimes). In S(B) the local exponent
    -dlog S / dlog B = B_crit / (B + B_crit) is 0.8 at B_crit / 4, 1/2 at B_crit and 0.2 at
    4 B_crit: below B_crit / 4 the steps are within 25% of perfect scaling (E_min / B), above
    4 B_crit within 25% of S_min. Symmetric in log B about B_crit.
    """
    return Regimes(b_crit / REGIME_FACTOR, b_crit * REGIME_FACTOR)


def fitted_curve(fit: ScalingFit, batch_sizes: Sequence[float]) -> Curve:
    """S(B) and E(B) of a fit at `batch_sizes` (e.g. np.geomspace(16, 8192, 100))."""
    if fit.s_min is None:
        raise ValueError(f"no fit to evaluate: {fit.reason}")
    b = np.asarray(batch_sizes, dtype=float)
    steps = fit.s_min * (1 + fit.b_noise / b)
    return Curve(b, steps, b * steps)
