"""The known answer of a sweep on the noisy quadratic model (dataset `nqm`): what its measured
steps per batch size and its fit should come out as, computed from the sweep record alone.

For each series of the sweep (the grid keys other than batch size and seed) and each batch size,
the exact best steps to the sweep's target (`lbs_tune.nqm.exact_steps`: the expected loss of the
trial's own SGD, at the learning rates of the sweep's own search space, within the trial's own
step budget, counted at the trial's own evaluation steps), and the fit of S(B) = S_min (1 + B_crit
/ B) to them on the same batch sizes (`analysis.scaling.fit_scaling`): the exact S_min, E_min
and B_crit that the sweep's measured fit estimates. An optimizer or schedule without a closed
form (Adam, LARS, LAMB, warmup, decay) has none: its reason says so ("simulated only").

`compare` says, per parameter, whether a measured interval holds the exact value: the
pipeline's own coverage (benchmarks/nqm_coverage.py counts it over many seeds).
Pure numbers and the record's reader: no torch, no Ray, no pandas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from analysis.metrics import BATCH, SEED
from analysis.scaling import PARAMETERS, ScalingFit, fit_scaling
from lbs_tune import nqm
from lbs_tune.config import TrialConfig, epoch_steps, every_steps, total_steps
from lbs_tune.record import read_record
from lbs_tune.rules import peak_lr
from lbs_tune.space import LogUniform, Uniform, Values
from lbs_tune.storage import Location, locate
from lbs_tune.sweep import SweepSpec

# The searched keys whose every value the exact answer searches too.
SEARCHED = ("lr.base", "optimizer.momentum")
COMPARED = PARAMETERS  # the fit's parameters, each compared with its exact value


class Exact(NamedTuple):
    """The exact answer of one series (`group`: its grid keys other than batch size and seed):
    per batch size the best steps (inf: no rate reaches the target), the best learning rate and
    momentum, and the fit of the steps; or only `reason` (and empty tuples) where there is no
    exact answer."""

    group: dict[str, Any]
    batch_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    rates: tuple[float, ...]
    momenta: tuple[float, ...]
    fit: ScalingFit | None
    reason: str | None


def known_answer(where: Location | str | Path) -> list[Exact] | None:
    """The exact answer of the sweep in experiment folder `where`, one `Exact` per series; None
    unless the sweep trains on the noisy quadratic model. A damaged sweep record is a
    UserError (`lbs_tune.record.read_record`)."""
    record = read_record(where if isinstance(where, Location) else locate(where))
    return exact_answer(SweepSpec.model_validate(record["spec"]))


def exact_answer(spec: SweepSpec) -> list[Exact] | None:
    """`known_answer` of a sweep spec; None unless its trials are on dataset `nqm`."""
    trials = spec.trials
    if not trials or any(t.dataset != "nqm" for t in trials):
        return None
    series: dict[str, list[tuple[dict[str, Any], TrialConfig]]] = {}
    for point, config in zip(spec.points(), trials, strict=True):
        group = {k: v for k, v in point.items() if k not in (BATCH, SEED)}
        series.setdefault(repr(sorted(group.items())), []).append((group, config))
    return [_series(spec, members) for members in series.values()]


def _series(spec: SweepSpec, members: list[tuple[dict[str, Any], TrialConfig]]) -> Exact:
    group = members[0][0]
    # One configuration per batch size: seeds repeat a batch size with the same answer.
    configs = {config.batch_size: config for _, config in members}
    sizes = tuple(sorted(configs))
    first = configs[sizes[0]]
    reason = nqm.exact_problem(
        first.optimizer.name,
        first.lr.decay,
        first.lr.warmup_epochs,
        first.clip_grad_norm,
        first.batch_schedule is not None,
        first.start_from is not None,
    ) or _search_problem(spec)
    if reason is None and spec.target is None:
        reason = "the sweep has no target: the exact answer is steps to a target"
    elif reason is None and spec.target.metric != "val/loss":
        reason = "the exact answer is for a target on val/loss, the loss itself"
    if reason is not None:
        return Exact(group, sizes, (), (), (), None, reason)
    q = nqm.quadratic(**first.data.nqm.arguments())
    best = [_best(spec, configs[b], q) for b in sizes]
    steps = tuple(b.steps for b in best)
    return Exact(
        group,
        sizes,
        steps,
        tuple(b.lr for b in best),
        tuple(b.momentum for b in best),
        fit_scaling(sizes, steps),
        None,
    )


def _search_problem(spec: SweepSpec) -> str | None:
    """Why the search space has no exact counterpart, or None."""
    if spec.search is None:
        return None
    space = spec.search.space
    other = sorted(set(space) - set(SEARCHED))
    if other:
        return f"the exact answer searches {' and '.join(SEARCHED)} only, not {', '.join(other)}"
    if "lr.base" in space and not isinstance(space["lr.base"], LogUniform):
        return "the exact answer searches lr.base over a log_uniform range"
    if isinstance(space.get("optimizer.momentum"), LogUniform):
        return "the exact answer searches optimizer.momentum over a uniform range or values"
    return None


def _best(spec: SweepSpec, config: TrialConfig, q: nqm.Quadratic) -> nqm.Best:
    """The exact best of one batch size: its trial's budget and evaluation steps (an NQM epoch
    is data.samples examples, as lbs_tune.quadratic has it), the searched rates and momenta."""
    space = spec.search.space if spec.search else {}
    per_epoch = epoch_steps(config.data.samples, config.batch_size)
    if "lr.base" in space:
        lr_range, grid, refine = space["lr.base"].log_uniform, nqm.GRID, nqm.REFINE_ROUNDS
    else:  # one rate: the trial's own
        rate = peak_lr(config.lr, config.batch_size)
        lr_range, grid, refine = (rate, rate), 1, 0
    momentum: float | list | nqm.Uniform = config.optimizer.momentum
    searched = space.get("optimizer.momentum")
    if isinstance(searched, Uniform):
        momentum = nqm.Uniform(*searched.uniform)
    elif isinstance(searched, Values):
        momentum = [float(v) for v in searched.values]
    nesterov = config.optimizer.nesterov
    return nqm.best_rate(
        q,
        spec.target.value,
        config.batch_size,
        lr_range,
        total_steps(config, config.data.samples),
        momentum,
        nesterov,
        config.optimizer.weight_decay,
        every_steps(config.eval_every, per_epoch),
        grid,
        refine,
    )


def holds(interval: Sequence[float] | None, value: float | None) -> bool | None:
    """Whether `interval` [low, high] holds `value`; None when either is missing."""
    if interval is None or value is None or not math.isfinite(value):
        return None
    low, high = interval
    return bool(low <= value <= high)


def compare(exact: Exact, fit: ScalingFit | None) -> dict[str, Any]:
    """For summary.json, beside a series' measured fit: the exact answer (`reason` where there
    is none), the exact best steps, rates and momenta per batch size, the exact S_min, E_min and
    B_crit, and per parameter whether the measured interval holds the exact value (null where
    either is missing)."""
    if exact.reason is not None:
        return {"reason": exact.reason}
    exact_fit = exact.fit
    values = {name: getattr(exact_fit, name) for name in COMPARED}
    intervals = fit.intervals if fit is not None else {}
    return {
        "reason": None,
        "batch_sizes": list(exact.batch_sizes),
        "steps": [s if math.isfinite(s) else None for s in exact.steps],
        "rates": [r if math.isfinite(r) else None for r in exact.rates],
        "momenta": [m if math.isfinite(m) else None for m in exact.momenta],
        **values,
        "holds": {name: holds(intervals.get(name), values[name]) for name in COMPARED},
    }
