"""The critical batch size: S(B) = S_min (1 + B_crit / B) fitted to steps-to-target (pure).

McCandlish et al. 2018 ("An empirical model of large-batch training") model the steps S and the
examples E = B S that training needs to reach a target at batch size B as

    S(B) = S_min (1 + B_noise / B),    E(B) = E_min (1 + B / B_noise),    E_min = S_min B_noise,

and define the critical batch size B_crit = E_min / S_min, which within this form equals the
B_noise of the formula (not the gradient noise scale measured during training). Steps halve
with each doubling of B far below B_crit (perfect scaling), stop falling far above it (maximal
data parallelism), and at B_crit training takes 2 S_min steps and 2 E_min examples.

The model of the data: log S_i = log S(B_i) + e_i with independent e_i ~ N(0, sigma^2), one
observation per (batch size, seed) (a batch size may repeat). `fit_scaling` gives its maximum
likelihood fit, plain least squares on log S (every batch size weighs by its relative error),
and profile-likelihood intervals; `bootstrap_studies` gives intervals that also see the seeds'
spread and the best-of-n selection of a tuned sweep, by resampling the studies' trials.
numpy and scipy only: no I/O, no torch, no Ray.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import t as student_t

LEVEL = 0.95  # the intervals' coverage
RESAMPLES = 1000  # bootstrap fits behind `bootstrap_studies`' intervals
# B_crit is searched within this factor beyond the batch sizes swept; data that do not bracket
# the critical batch size put it at this bound (and the fit says so: `bracketed`).
REACH = 1000.0
# Points of the grid over log B_crit on which the fit starts: ~0.04 apart for batch sizes
# 16..2048, fine enough that the refinement between two of them finds the global minimum.
GRID = 501
# The regimes' boundaries, at B_crit / 4 and 4 B_crit (see `regimes`).
REGIME_FACTOR = 4.0
# Fitted numbers by name: one name per number (the fitted B_crit = E_min / S_min is no measured
# noise scale, whose names are the metrics noise/b_simple and noise/b_noise).
PARAMETERS = ("s_min", "e_min", "b_crit")
PROFILE = "profile likelihood"
BOOTSTRAP = "hierarchical bootstrap"


class ScalingFit(NamedTuple):
    """The fit: parameters (None when there is no fit, with `reason`), their intervals
    ({name: (low, high)} at `level`; {} with fewer than 3 observations; a side the data do not
    bound is 0 or inf), and the points it used."""

    s_min: float | None
    e_min: float | None
    b_crit: float | None  # E_min / S_min
    intervals: dict[str, tuple[float, float]]
    batch_sizes: tuple[float, ...]  # the batch sizes that reached the target, as given
    steps: tuple[float, ...]  # their steps to target
    resamples: int  # bootstrap fits behind the intervals (0 for profile likelihood)
    bracketed: bool  # B_crit lies within the batch sizes fitted
    reason: str | None  # why there is no fit
    method: str = PROFILE  # how the intervals were made: PROFILE or BOOTSTRAP
    level: float | None = None  # the intervals' coverage (None without intervals)
    residual_sd: float | None = None  # sqrt(RSS / (n - 2)) of log S (None with n <= 2)


class StudyBootstrap(NamedTuple):
    """`bootstrap_studies`' result: per batch size (as given) the median over seeds of each
    study's best steps (inf: the median seed never reached the target) and its percentile
    interval over the resamples, and the fit of the medians with bootstrap intervals."""

    batch_sizes: tuple[float, ...]
    median: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    fit: ScalingFit


class Regimes(NamedTuple):
    """Perfect scaling below `perfect_below`, maximal data parallelism above `maximal_above`,
    diminishing returns between."""

    perfect_below: float
    maximal_above: float


class Curve(NamedTuple):
    batch_sizes: np.ndarray
    steps: np.ndarray  # S(B)
    examples: np.ndarray  # E(B) = B S(B)


# ============================================================================ The fit


def fit_scaling(
    batch_sizes: Sequence[float],
    steps: Sequence[float | None],
    resamples: int | None = None,
    level: float = LEVEL,
    seed: int | None = None,
) -> ScalingFit:
    """Fit S(B) = S_min (1 + B_crit / B) to `steps` (steps to target at each of `batch_sizes`,
    one observation each: a batch size may repeat, e.g. once per seed; None, NaN or inf where
    the target was not reached: left out).

    Least squares on log S over (log S_min, log B_crit), the maximum-likelihood fit under
    log-normal noise: for a given B_crit the best log S_min is a mean, so the fit is a search
    over log B_crit alone (a grid within REACH of the batch sizes, then refined), which finds
    the global minimum. Intervals at `level` (with at least 3 observations): profile likelihood,
    {parameter: RSS_profile <= RSS_min (1 + t^2 / (n - 2))} with t the (1 + level) / 2 quantile
    of Student's t with n - 2 degrees of freedom (Bates & Watts 1988, ch. 6); a side that
    reaches the search bound is 0 or inf (e.g. B_crit beyond the batch sizes swept).
    `resamples` and `seed` are ignored (the intervals need no resampling); they are accepted
    for callers written for the earlier bootstrap.
    """
    b, s = _points(batch_sizes, steps)
    distinct = len(set(b.tolist()))
    if distinct < 2:
        return _no_fit(b, s, f"{distinct} batch size(s) reached the target; the fit needs 2")
    y = np.log(s)
    ls = _least_squares(b, y)
    n = len(b)
    intervals, sd = {}, None
    if n > 2:
        sd = math.sqrt(ls.rss / (n - 2))
        intervals = _profile_intervals(b, y, ls, level)
    s_min, b_crit = math.exp(ls.log_s_min), math.exp(ls.log_b_crit)
    return ScalingFit(
        s_min,
        s_min * b_crit,
        b_crit,
        _named(intervals),
        tuple(b.tolist()),
        tuple(s.tolist()),
        0,
        bool(b.min() <= b_crit <= b.max()),
        None,
        PROFILE,
        level if intervals else None,
        sd,
    )


def bootstrap_studies(
    batch_sizes: Sequence[float],
    studies: Sequence[Sequence[Sequence[float | None]]],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> StudyBootstrap:
    """The fit of a tuned sweep with intervals that see its seeds and its search.

    `studies[i]` holds the studies (one per seed) of `batch_sizes[i]`, each a list of its
    trials' steps to target (None, NaN or inf: never reached). The steps of a batch size are
    the median over its seeds of each study's best (fewest) steps, a study that never reached
    the target counting as the worst (as `analysis.metrics.seed_spread`); the fit is
    `fit_scaling`'s of those medians (a median that never reached is left out). Intervals: the
    central `level` percentiles over `resamples` refits, each to the medians of a hierarchical
    resample (`resample_steps`, `seed`ed); resamples with fewer than 2 batch sizes that reached
    the target are skipped. Returns the medians with their percentile intervals and the fit
    (`method` BOOTSTRAP, `resamples` the refits used).
    """
    if len(studies) != len(batch_sizes):
        raise ValueError(f"{len(batch_sizes)} batch sizes but studies for {len(studies)}")
    median = np.array([np.median([_best(t) for t in seeds] or [math.inf]) for seeds in studies])
    fit = fit_scaling(batch_sizes, median, level=level)
    draws = resample_steps(studies, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail], axis=0, method="inverted_cdf")
    if fit.s_min is not None:
        b_all = np.asarray(batch_sizes, dtype=float)
        fits = [_point_fit(*_points(b_all, row)) for row in draws]
        fits = np.array([f for f in fits if f is not None])
        intervals = {}
        if len(fits):
            values = {"s_min": fits[:, 0], "e_min": fits[:, 0] * fits[:, 1], "b_crit": fits[:, 1]}
            for name, v in values.items():
                lo, hi = np.quantile(v, [tail, 1 - tail], method="inverted_cdf")
                intervals[name] = (float(lo), float(hi))
        fit = fit._replace(
            intervals=_named(intervals), resamples=len(fits), method=BOOTSTRAP, level=level
        )
    return StudyBootstrap(
        tuple(float(x) for x in batch_sizes),
        tuple(float(m) for m in median),
        tuple(float(x) for x in low),
        tuple(float(x) for x in high),
        fit,
    )


def resample_steps(
    studies: Sequence[Sequence[Sequence[float | None]]], resamples: int, seed: int = 0
) -> np.ndarray:
    """`resamples` hierarchical bootstrap draws of each batch size's steps: (resamples,
    len(studies)). In each draw, for each batch size (`studies[i]`: its seeds' studies, each
    a list of trial steps, None/NaN/inf for never reached), its seeds are drawn with
    replacement, in each seed drawn its study's trials with replacement, the best of those is
    the seed's steps and the median over the seeds the batch size's (inf: never reached)."""
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(studies)))
    for i, seeds in enumerate(studies):
        trials = [_steps(t) for t in seeds] or [np.array([math.inf])]
        pick = rng.integers(0, len(trials), (resamples, len(trials)))
        best = np.empty(pick.shape)
        for j, values in enumerate(trials):
            mine = pick == j
            draws = rng.integers(0, len(values), (int(mine.sum()), len(values)))
            best[mine] = values[draws].min(axis=1)
        out[:, i] = np.median(best, axis=1)
    return out


def _steps(trials: Sequence[float | None]) -> np.ndarray:
    """A study's trial steps as floats, inf for never reached (a study of no trials: [inf])."""
    values = np.array([math.inf if v is None else float(v) for v in trials] or [math.inf])
    values[~np.isfinite(values)] = math.inf
    return values


def _best(trials: Sequence[float | None]) -> float:
    return float(_steps(trials).min())


def _point_fit(b: np.ndarray, s: np.ndarray) -> tuple[float, float] | None:
    """(S_min, B_crit) of the least-squares fit, None with fewer than 2 batch sizes."""
    if len(set(b.tolist())) < 2:
        return None
    ls = _least_squares(b, np.log(s))
    return math.exp(ls.log_s_min), math.exp(ls.log_b_crit)


def _points(batch_sizes: Sequence[float], steps: Sequence[float | None]):
    """(b, s) arrays of the observations that reached the target."""
    points = [
        (float(b), float(s))
        for b, s in zip(batch_sizes, steps, strict=True)
        if s is not None and math.isfinite(s) and s > 0
    ]
    b = np.array([p[0] for p in points])
    s = np.array([p[1] for p in points])
    if np.any(b <= 0):
        raise ValueError(f"batch sizes are > 0, got {sorted(b.tolist())}")
    return b, s


def _no_fit(b: np.ndarray, s: np.ndarray, reason: str) -> ScalingFit:
    return ScalingFit(None, None, None, {}, tuple(b.tolist()), tuple(s.tolist()), 0, False, reason)


def _named(intervals: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The intervals in PARAMETERS' order."""
    return {name: intervals[name] for name in PARAMETERS if name in intervals}


def _grid(b: np.ndarray) -> np.ndarray:
    """log B_crit from REACH times below the smallest batch size to REACH times the largest."""
    return np.linspace(math.log(b.min() / REACH), math.log(b.max() * REACH), GRID)


def _profile(b: np.ndarray, y: np.ndarray, log_b_crit: np.ndarray):
    """For each log B_crit (an array), the best log S_min (the mean residual) and the residual
    sum of squares at it."""
    r = y - np.log1p(np.exp(np.asarray(log_b_crit, dtype=float))[..., None] / b)
    log_s_min = r.sum(axis=-1) / r.shape[-1]
    return log_s_min, ((r - log_s_min[..., None]) ** 2).sum(axis=-1)


def _rss(b: np.ndarray, y: np.ndarray, log_b_crit: float) -> float:
    return float(_profile(b, y, log_b_crit)[1])


class _LeastSquares(NamedTuple):
    grid: np.ndarray  # log B_crit, see _grid
    profile: np.ndarray  # the residual sum of squares at each grid point (see _profile)
    log_b_crit: float
    log_s_min: float
    rss: float


def _least_squares(b: np.ndarray, y: np.ndarray) -> _LeastSquares:
    """The least-squares fit of log S = `y` at batch sizes `b`: the best point of the grid,
    refined between its neighbours."""
    grid = _grid(b)
    profile = _profile(b, y, grid)[1]
    i = int(np.argmin(profile))
    low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = minimize_scalar(
        lambda x: _rss(b, y, x), bounds=(low, high), method="bounded", options={"xatol": 1e-9}
    )
    x = float(best.x) if best.fun <= profile[i] else float(grid[i])
    log_s_min, rss = _profile(b, y, x)
    return _LeastSquares(grid, profile, x, float(log_s_min), float(rss))


@functools.cache
def _quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy's takes ~0.5 ms, as long as the rest of a fit)."""
    return float(student_t.ppf(p, dof))


def _profile_intervals(b, y, ls: _LeastSquares, level: float) -> dict[str, tuple[float, float]]:
    """Profile-likelihood intervals of S_min, E_min and B_crit (see fit_scaling).

    The set {theta: RSS(theta) <= threshold} projected on a parameter is that parameter's
    profile interval. For each log B_crit inside it, log S_min ranges over the mean residual
    +- sqrt((threshold - RSS_profile) / n) (RSS is quadratic in log S_min), so every interval
    comes from the one-dimensional profile over log B_crit."""
    grid, log_b_crit, n = ls.grid, ls.log_b_crit, len(b)
    q = _quantile((1 + level) / 2, n - 2)
    threshold = ls.rss * (1 + q * q / (n - 2))
    inside = ls.profile <= threshold

    def end(step: int) -> float:
        # The outermost grid point inside the set on this side of the optimum (else the optimum
        # itself), then the crossing between it and the next grid point out; the bound itself
        # when the set reaches it.
        beyond = grid > log_b_crit if step > 0 else grid < log_b_crit
        ours, out = np.flatnonzero(inside & beyond), np.flatnonzero(beyond)
        if len(ours):
            inner, j = grid[ours[-1 if step > 0 else 0]], ours[-1 if step > 0 else 0] + step
        else:
            inner, j = log_b_crit, (out[0] if step > 0 else out[-1]) if len(out) else -1
        if not 0 <= j < len(grid):
            return -math.inf if step < 0 else math.inf
        return brentq(lambda x: _rss(b, y, x) - threshold, *sorted((inner, grid[j])))

    low, high = end(-1), end(+1)
    # S_min and E_min: their extremes over the log B_crit inside, on a grid over the interval,
    # then on a 20 times finer one between the best point's neighbours (the values are smooth
    # there: a miss of 1e-4 in log B_crit moves them by ~1e-8).
    span = np.union1d(np.linspace(max(low, grid[0]), min(high, grid[-1]), 401), [log_b_crit])

    def values(x: np.ndarray, profiled, offset: float, sign: float) -> np.ndarray:
        # sign * (log S_min + offset * log B_crit) + the half-width, over the set
        log_s_min, r = profiled
        half = np.sqrt(np.maximum(threshold - r, 0) / n)
        inside = r <= threshold * (1 + 1e-9) + 1e-300
        return np.where(inside, sign * (log_s_min + offset * x) + half, -np.inf)

    on_span = _profile(b, y, span)

    def extreme(offset: float, sign: float) -> float:
        coarse = values(span, on_span, offset, sign)
        i = int(np.argmax(coarse))
        fine = np.linspace(span[max(i - 1, 0)], span[min(i + 1, len(span) - 1)], 41)
        return sign * max(coarse[i], float(values(fine, _profile(b, y, fine), offset, sign).max()))

    unbounded_above, unbounded_below = high == math.inf, low == -math.inf
    log_s = (-math.inf if unbounded_above else extreme(0, -1), extreme(0, +1))
    log_e = (-math.inf if unbounded_below else extreme(1, -1), extreme(1, +1))
    return {
        "s_min": (math.exp(log_s[0]), math.exp(log_s[1])),
        "e_min": (math.exp(log_e[0]), math.exp(log_e[1])),
        "b_crit": (math.exp(low), math.exp(high)),
    }


# ============================================================================ The curve


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
    steps = fit.s_min * (1 + fit.b_crit / b)
    return Curve(b, steps, b * steps)
