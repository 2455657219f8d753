"""Is a tuned sweep's budget enough? The search budget, censoring by the step cap, and step caps
that give every batch size room (pure numpy: no I/O, no torch, no Ray).

- `best_of_k`: Shallue et al. 2018's search-budget analysis. For a study of n trials, the best
  steps to target of a search of k trials (k = 1..n) drawn from them without replacement, exact
  over all k-subsets through order statistics. A best that still falls from k = n/2 to n says
  the search has not converged: more trials per point would find fewer steps.
- `censoring`: per batch size, the trials that ended at their step cap without reaching the
  target or diverging, and whether the best trial used more than half its cap (the cap may have
  cut off configurations that needed a little more).
- `scaled_caps`: step caps from perfect scaling of the smaller batch sizes' measured steps. (A
  floor on an epoch budget is the trial config's `min_steps`: the budget's one formula is
  `lbs_tune.config.total_steps`.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

# The share of its cap the best trial of a point may use before the point is flagged.
HALF = 0.5
QUANTILES = (0.1, 0.9)  # BudgetCurve's band


class BudgetCurve(NamedTuple):
    """The best steps of a search of k trials drawn from a study's n, for k = 1..n (arrays of n).

    `expected`: the mean best among the searches that reached the target (NaN where none can);
    `median`, `low`, `high`: the 50%, 10% and 90% points of the best (inf where that share of
    searches never reached it); `infeasible`: the probability that no trial of the k reached it.
    """

    k: np.ndarray
    expected: np.ndarray
    median: np.ndarray
    low: np.ndarray
    high: np.ndarray
    infeasible: np.ndarray


class Censoring(NamedTuple):
    """One batch size's trials against their step caps."""

    batch_size: float
    trials: int
    reached: int  # reached the target
    diverged: int  # diverged before reaching it
    capped: int  # ran to their cap without reaching the target or diverging
    best_steps: float | None  # the fewest steps to target (None: no trial reached it)
    best_cap: int | None  # the cap of that trial
    used: float | None  # best_steps / best_cap
    flagged: bool  # used > HALF, or no trial reached the target and some ended at the cap


def best_of_k(values: Sequence[float | None]) -> BudgetCurve:
    """The search-budget curve of one study: `values` are its trials' steps to target (None,
    NaN or inf for a trial that never reached it), taken as exchangeable draws (true of a
    quasi-random search; a model-based sampler's later trials learn from the earlier ones).

    Sorted ascending, x_(1) <= ... <= x_(n), the best of a random k-subset is x_(i) with
    probability C(n - i, k - 1) / C(n, k): x_(i) is in the subset and the other k - 1 are among
    the n - i after it. Ties and infeasible trials (last in the order) need no special case.
    """
    x = np.sort(np.array([math.inf if v is None else float(v) for v in values]))
    x[np.isnan(x)] = math.inf
    n = len(x)
    if n == 0:
        raise ValueError("a study with no trials has no budget curve")
    p = best_distribution(n)
    feasible = np.isfinite(x)
    # All k drawn among the m infeasible: C(m, k) / C(n, k), in exact integers.
    m = int((~feasible).sum())
    infeasible = np.array([math.comb(m, k) / math.comb(n, k) for k in range(1, n + 1)])
    reach = p[:, feasible].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = (p[:, feasible] @ x[feasible]) / reach
    cumulative = np.cumsum(p, axis=1)

    def quantile(q: float) -> np.ndarray:
        # The first order statistic whose cumulative probability reaches q (1e-12: rounding).
        return x[np.argmax(cumulative >= q - 1e-12, axis=1)]

    return BudgetCurve(
        np.arange(1, n + 1),
        np.where(reach > 0, expected, math.nan),
        quantile(0.5),
        quantile(QUANTILES[0]),
        quantile(QUANTILES[1]),
        infeasible,
    )


def best_distribution(n: int) -> np.ndarray:
    """(n, n) array: row k - 1, column i - 1 is the probability that the best of a random
    k-subset of n ranked trials is the i-th: C(n - i, k - 1) / C(n, k) (exact integers)."""
    return np.array(
        [
            [math.comb(n - i, k - 1) / math.comb(n, k) for i in range(1, n + 1)]
            for k in range(1, n + 1)
        ]
    )


def censoring(
    trials: Iterable[tuple[float, float | None, int, bool]], half: float = HALF
) -> list[Censoring]:
    """Per batch size (ascending), how its finished trials ended against their step caps.

    Each trial is (batch_size, steps, cap, diverged): `steps` the step at which it reached the
    target (None if never), `cap` its step budget (the `total_steps` it reported), `diverged`
    whether it diverged. A trial that neither reached nor diverged ran to its cap: censored.
    A point is flagged when its best trial used more than `half` of its cap, or when none
    reached the target and some ran to the cap (the cap, not the configuration, may have
    decided that).
    """
    by: dict[float, list[tuple[float | None, int, bool]]] = {}
    for batch_size, steps, cap, diverged in trials:
        reached = steps is not None and math.isfinite(steps)
        by.setdefault(float(batch_size), []).append((steps if reached else None, cap, diverged))
    out = []
    for batch_size in sorted(by):
        mine = by[batch_size]
        reached = [(s, c) for s, c, _ in mine if s is not None]
        diverged = sum(d for s, _, d in mine if s is None)
        capped = sum(not d for s, _, d in mine if s is None)
        best_steps, best_cap = (
            min(reached, key=lambda t: (t[0], -t[1])) if reached else (None, None)
        )
        used = best_steps / best_cap if reached else None
        flagged = used > half if reached else capped > 0
        out.append(
            Censoring(
                batch_size,
                len(mine),
                len(reached),
                diverged,
                capped,
                best_steps,
                best_cap,
                used,
                bool(flagged),
            )
        )
    return out


def scaled_caps(
    batch_sizes: Sequence[float], steps: Sequence[float | None], factor: float = 4.0
) -> list[int | None]:
    """Step caps of `factor` times what perfect scaling from the smaller batch sizes predicts:
    factor x max over B' < B that reached the target of steps(B') B' / B (the most examples a
    smaller batch size needed, spread over batches of B). None where no smaller batch size has
    steps (the first batch sizes need another budget).

    S(B) = S_min (1 + B_crit / B) falls at most in proportion to B, and S(B) B rises with B, so
    the steps at B are at most r times the prediction from a batch size r times smaller: with
    factor >= 2r (4 for a grid of doublings) the steps of the model use at most half the cap,
    so a point that `censoring` flags is one the model does not explain."""
    known = sorted(
        (float(b), float(s) * float(b))
        for b, s in zip(batch_sizes, steps, strict=True)
        if s is not None and math.isfinite(s)
    )
    caps: list[int | None] = []
    for b in batch_sizes:
        examples = [e for smaller, e in known if smaller < b]
        caps.append(math.ceil(factor * max(examples) / b) if examples else None)
    return caps
