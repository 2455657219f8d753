"""The known answer of a sweep on the noisy quadratic model (analysis.known) and its figure
(analysis.figures.exact_steps): the exact best steps per batch size follow the sweep's own
search range, budget and evaluation steps; no exact answer for Adam; whether an interval holds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.figures import exact_steps
from analysis.known import compare, exact_answer, holds
from analysis.scaling import fit_scaling
from analysis.summary import summarize
from analysis.summary_json import summary_json
from lbs_tune import nqm
from lbs_tune.studies import Objective, StudyRecord
from lbs_tune.sweep import SweepSpec

PROBLEM = {"dim": 50, "power": 0.5, "scale": 1.0, "noise_scale": 1.0, "theta0": 1.0}


def spec(**changes) -> SweepSpec:
    """A tuned NQM sweep at batch sizes 4, 32 and 256: an epoch of 64 examples, evaluated every
    epoch (every 16 steps at batch 4, 2 at batch 32, 1 at batch 256), 400 steps."""
    body = {
        "name": "known",
        "base": {
            "dataset": "nqm",
            "data": {"samples": 64, "nqm": PROBLEM},
            "model": "nqm",
            "steps": 400,
            "eval_every": 1,
            "optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0},
            "lr": {"base": 0.5, "scaling": "none"},
        },
        "grid": {"batch_size": [4, 32, 256]},
        "search": {"space": {"lr.base": {"log_uniform": [0.1, 1.9]}}, "trials_per_point": 4},
        "metric": {"name": "val/loss"},
        "target": {"metric": "val/loss", "value": 0.5},
    }
    body.update(changes)
    return SweepSpec.model_validate(body)


def test_exact_steps_follow_the_sweeps_range_budget_and_evaluations():
    (exact,) = exact_answer(spec())
    assert exact.reason is None and exact.group == {} and exact.batch_sizes == (4, 32, 256)
    q = nqm.quadratic(**PROBLEM)
    for b, every, steps, rate in zip(
        exact.batch_sizes, (16, 2, 1), exact.steps, exact.rates, strict=True
    ):
        assert steps % every == 0 or steps == 400
        assert 0.1 <= rate <= 1.9
        # The best rate reaches the target at those steps; a rate 10% off does no better.
        assert nqm.steps_to_target(q, 0.5, rate, b, 400, every=every) == steps
        for other in (rate * 0.9, min(rate * 1.1, 1.9)):
            assert nqm.steps_to_target(q, 0.5, other, b, 400, every=every) >= steps
    assert exact.fit == fit_scaling(exact.batch_sizes, exact.steps)


def test_a_fixed_rate_is_the_trials_own():
    (exact,) = exact_answer(spec(search=None))
    q = nqm.quadratic(**PROBLEM)
    assert exact.rates == (0.5, 0.5, 0.5)
    assert exact.steps[0] == nqm.steps_to_target(q, 0.5, 0.5, 4, 400, every=16)


def test_no_exact_answer_says_why():
    adam = spec(base={**spec().base, "optimizer": {"name": "adamw"}})
    (exact,) = exact_answer(adam)
    assert "simulated only" in exact.reason and exact.steps == ()
    assert compare(exact, None) == {"reason": exact.reason}
    warm = spec(base={**spec().base, "lr": {"base": 0.5, "warmup_epochs": 1}})
    assert "without warmup" in exact_answer(warm)[0].reason
    wide = spec(search={"space": {"optimizer.weight_decay": {"uniform": [0, 0.1]}}})
    assert "not optimizer.weight_decay" in exact_answer(wide)[0].reason
    # Clipped, a batch that changes during the run, weights of another run: none is the NQM's
    # closed form, which the exact answer would be taken for.
    clipped = spec(base={**spec().base, "clip_grad_norm": 1e-3})
    assert "clipped gradient" in exact_answer(clipped)[0].reason
    switched = spec(base={**spec().base, "batch_size": 4, "batch_schedule": [[0, 4], [64, 32]]},
                    grid={}, search=None)  # fmt: skip
    assert "batch schedule" in exact_answer(switched)[0].reason
    started = spec(base={**spec().base, "start_from": "/runs/warm"})
    assert "start_from" in exact_answer(started)[0].reason
    other = spec(base={**spec().base, "dataset": "mnist1d", "model": "mlp", "data": {}})
    assert exact_answer(other) is None


def test_whether_an_interval_holds():
    assert holds((30.0, 50.0), 40.1) is True
    assert holds((30.0, 39.0), 40.1) is False
    assert holds(None, 40.1) is None and holds((1.0, 2.0), math.inf) is None


def record(index: int, batch: int, steps: list[float | None]) -> StudyRecord:
    objective = Objective("steps_to_target", "val/loss", "min", 0.5)
    trials = [
        {
            "number": n,
            "state": "COMPLETE" if s is not None else "FAIL",
            "value": s,
            "at_value": 0.4 if s is not None else None,
            "params": {"lr.base": 0.5},
            "ray_trial_id": None,
            "reason": None,
            "diverged": False,
            "ray_errors": 0,
            "values": {},
        }
        for n, s in enumerate(steps)
    ]
    return StudyRecord(f"batch_size={batch}", {"batch_size": batch}, index, objective, trials)


def test_the_figure_puts_the_measured_fit_against_the_exact_one():
    (exact,) = exact_answer(spec())
    # Measured: the exact steps, 10% slower at batch 256 (a search that missed the best rate).
    measured = [exact.steps[0], exact.steps[1], exact.steps[2] * 1.1]
    studies = [
        record(i, b, [s, None]) for i, (b, s) in enumerate(zip((4, 32, 256), measured, strict=True))
    ]
    summary = summarize(studies, resamples=10)
    data = exact_steps.extract(summary, [exact])
    assert data.measured[0].median == measured
    assert data.exact[0].median == list(exact.steps)
    (critical,) = data.exact_critical
    assert critical.b_crit == pytest.approx(exact.fit.b_crit)
    low, high = summary.fits[0].fit.intervals["b_crit"]
    assert critical.held == (low <= exact.fit.b_crit <= high)
    figure = exact_steps.render(data)
    assert len(figure.data) == 3 and np.isfinite(figure.data[2].y).all()
    # In the page's look, as every figure (analysis.figures._draw.finish): white, a panel's height.
    assert figure.layout.template.layout.plot_bgcolor == "white"
    assert figure.layout.height >= 300 and figure.layout.title.x == 0.02
    assert any("exact B_crit" in (shape.name or "") for shape in figure.layout.shapes)
    verdict = compare(exact, summary.fits[0].fit)
    assert verdict["b_crit"] == pytest.approx(exact.fit.b_crit)
    assert verdict["holds"]["b_crit"] == critical.held
    # summary.json: the exact values beside the measured fit, and whether its interval holds.
    fit = summary_json(summary, [exact])["fit"]
    assert fit["exact"]["holds"] == verdict["holds"] and fit["b_crit"] == summary.fits[0].fit.b_crit
    assert "exact" not in summary_json(summary)["fit"]
