"""The figures and the answer of a searched sweep (issues 9 and 18): their data extracted from
summaries made by hand and checked number by number; each render is drawn once to see that it
builds."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import B_NOISE, S_MIN, SIZES, formula_studies, steps_at, study, trial

from analysis.answer import number, tuned_answer, tuned_sentence
from analysis.budget import Censoring
from analysis.figures import (
    best_lr,
    parallel_coordinates,
    pareto,
    search_budget,
    study_objective,
    tuned_steps,
)
from analysis.html import answer_html
from analysis.page import Context
from analysis.scaling import REGIME_FACTOR
from analysis.summary import CONFIRMED, Steps, summarize
from analysis.tables import Results
from lbs_tune.studies import Objective


def fixed_rule_sweep(searched: bool = False) -> tuple[pa.Table, pa.Table]:
    """Rule linear at B=16 and 64 (two seeds each) and rule none at B=64, reports every 50
    steps; val/accuracy reaches 0.5 at steps (16: 500 and 600), (64 linear: 150, never),
    (64 none: 300, 300). With `searched`, a searched trial (search.study set) that reached it
    at step 50 rides along and must be left out."""
    reached = {("linear", 16): (500, 600), ("linear", 64): (150, None), ("none", 64): (300, 300)}
    trials, reports = [], []
    for (rule, batch), steps in reached.items():
        for seed, step in enumerate(steps):
            trial_id = f"{rule}{batch}-{seed}"
            trials.append(
                {"trial_id": trial_id, "state": "TERMINATED", "diverged": False}
                | {"lr.scaling": rule, "batch_size": batch, "seed": seed, "search.study": None}
            )
            for at in range(50, 701, 50):
                value = 0.6 if step is not None and at >= step else 0.2
                reports.append({"trial_id": trial_id, "step": at, "val/accuracy": value})
    if searched:
        trials.append(
            {"trial_id": "s", "state": "TERMINATED", "diverged": False, "lr.scaling": "none"}
            | {"batch_size": 16, "seed": 0, "search.study": "batch_size=16"}
        )
        reports.append({"trial_id": "s", "step": 50, "val/accuracy": 0.9})
    return pa.Table.from_pylist(trials), pa.Table.from_pylist(reports)


# ============================================================================ Steps to target


def test_tuned_steps_have_the_fit_b_crit_regimes_and_the_fixed_rule_series():
    summary = summarize(formula_studies(never=(2048,)), resamples=30)
    compared = fixed_rule_sweep()
    data = tuned_steps.extract(summary, [("this sweep", *fixed_rule_sweep(searched=True))])
    assert data.target == "val/accuracy ≥ 0.5"
    (tuned,) = data.tuned
    assert tuned.batch_sizes == SIZES
    assert tuned.median == [round(steps_at(b)) for b in SIZES[:-1]] + [None]
    assert data.not_reached[0].batch_sizes == [2048]
    (curve,) = data.fits
    assert (curve.batch_sizes[0], curve.batch_sizes[-1]) == pytest.approx((16, 2048))
    # The drawn curve is the formula within the fit's error (< 1%: whole steps).
    assert np.allclose(curve.steps, [steps_at(b) for b in curve.batch_sizes], rtol=0.01)
    (critical,) = data.critical
    assert critical.b_crit == pytest.approx(B_NOISE, rel=0.01) and critical.bracketed
    assert critical.low <= critical.b_crit <= critical.high
    assert data.regimes == pytest.approx(
        (critical.b_crit / REGIME_FACTOR, critical.b_crit * REGIME_FACTOR)
    )
    # The fixed rules, best per rule and batch size, median over seeds (never = worst).
    assert [(f.name, f.batch_sizes, f.median, f.low, f.high) for f in data.fixed] == [
        ("this sweep: linear", [16, 64], [550, None], [500, 150], [600, None]),
        ("this sweep: none", [64], [300], [300], [300]),
    ]
    # A compared sweep is drawn the same way, under its own name; a searched one adds none.
    other = tuned_steps.extract(summary, [("baseline", *compared), ("tuned", *fixed_rule_sweep())])
    assert [f.name for f in other.fixed] == [
        "baseline: linear",
        "baseline: none",
        "tuned: linear",
        "tuned: none",
    ]
    only_searched = fixed_rule_sweep(searched=True)[0].filter(
        pc.is_valid(fixed_rule_sweep(searched=True)[0]["search.study"])
    )
    assert tuned_steps.fixed_rule_lines("x", only_searched, compared[1], "val/accuracy", 0.5) == []
    figure = tuned_steps.render(data)
    assert isinstance(figure, go.Figure)
    names = {t.name for t in figure.data} | {s.name for s in figure.layout.shapes}
    assert {"perfect scaling", "diminishing returns", "maximal data parallelism"} <= names


def test_without_a_fit_nothing_is_marked_and_several_series_are_not_shaded():
    two = summarize([study({"batch_size": 16}, 0, [trial(0, 100.0)])], resamples=0)
    data = tuned_steps.extract(two)
    assert (data.fits, data.critical, data.regimes) == ([], [], None)
    tuned_steps.render(data)
    sgd = [s._replace(point={**s.point, "opt": "sgd"}) for s in formula_studies()]
    adam = [s._replace(point={**s.point, "opt": "adam"}) for s in formula_studies()]
    data = tuned_steps.extract(summarize(sgd + adam, resamples=0))
    assert [c.name for c in data.critical] == ["opt=sgd", "opt=adam"]
    assert data.regimes is None


# ============================================================================ Pareto frontier


def test_the_frontier_is_examples_against_steps_on_the_fitted_hyperbola():
    data = pareto.extract(summarize(formula_studies(never=(2048,)), resamples=0))
    (f,) = data.series
    assert f.batch_sizes == SIZES[:-1]
    assert f.steps == [round(steps_at(b)) for b in SIZES[:-1]]
    assert f.examples == [b * s for b, s in zip(f.batch_sizes, f.steps, strict=True)]
    assert (f.s_min, f.e_min) == pytest.approx((S_MIN, S_MIN * B_NOISE), rel=0.01)
    # Every point of the drawn curve satisfies (S / S_min - 1)(E / E_min - 1) = 1.
    s, e = np.array(f.curve_steps), np.array(f.curve_examples)
    assert np.allclose((s / f.s_min - 1) * (e / f.e_min - 1), 1)
    # It reaches near both asymptotes: B from B_crit / 100 to 100 B_crit.
    assert e.min() < 1.02 * f.e_min and s.min() < 1.02 * f.s_min
    assert isinstance(pareto.render(data), go.Figure)
    nothing = summarize([study({"batch_size": 16}, 0, [trial(0, None)])], resamples=0)
    assert pareto.extract(nothing).series == []


# ============================================================================ Best learning rate


def test_the_best_lr_slope_is_fitted_log_log_beside_the_two_rules():
    # formula_studies' best trial at batch B has lr 0.1 sqrt(B / 16): slope exactly 1/2.
    data = best_lr.extract(summarize(formula_studies(), resamples=0))
    (s,) = data.series
    assert s.batch_sizes == SIZES and s.lrs == pytest.approx(
        [0.1 * math.sqrt(b / 16) for b in SIZES]
    )
    assert s.slope.slope == pytest.approx(0.5) and s.slope.stderr == pytest.approx(0, abs=1e-9)
    assert s.references["linear rule (slope 1)"] == pytest.approx([0.1 * b / 16 for b in SIZES])
    assert s.references["square-root rule (slope 1/2)"] == pytest.approx(s.lrs)
    figure = best_lr.render(data)
    assert "0.50" in figure.layout.title.text


def test_a_hand_worked_slope_and_its_standard_error():
    # log2 B = 4, 5, 6 and log2 lr = 0, 1, 1: slope 1/2 per log2 on both axes; residuals
    # -1/6, 1/3, -1/6 (in log2), so stderr = sqrt((1/6) / 1 / 2) = 0.2887.
    slope = best_lr.fit_slope([16, 32, 64], [1.0, 2.0, 2.0])
    assert slope.slope == pytest.approx(0.5)
    assert slope.stderr == pytest.approx(math.sqrt(1 / 12))
    assert best_lr.fit_slope([16, 16], [1.0, 2.0]) is None
    assert best_lr.fit_slope([16, 32], [1.0, 2.0]).stderr is None


def test_seeds_anchor_the_references_at_their_geometric_mean_and_no_lr_no_series():
    studies = [
        study({"batch_size": 16, "seed": 0}, 0, [trial(0, 100.0, lr=0.1)]),
        study({"batch_size": 16, "seed": 1}, 1, [trial(0, 100.0, lr=0.4)]),
        study({"batch_size": 64, "seed": 0}, 2, [trial(0, 40.0, lr=0.8)]),
    ]
    (s,) = best_lr.extract(summarize(studies, resamples=0)).series
    assert s.sizes == [16, 64] and s.batch_sizes == [16, 16, 64]
    assert s.references["linear rule (slope 1)"] == pytest.approx([0.2, 0.8])
    momentum_only = [
        study({"batch_size": 16}, 0, [{**trial(0, 10.0), "params": {"optimizer.momentum": 0.9}}])
    ]
    assert best_lr.extract(summarize(momentum_only, resamples=0)).series == []


# ============================================================================ Every trial


def test_every_finished_trial_of_every_study_against_its_lr():
    s = study(
        {"batch_size": 64},
        0,
        [
            trial(0, 300.0, lr=0.01),
            trial(1, 120.0, lr=0.2),
            trial(2, None, lr=3.0, diverged=True),
            trial(3, None, lr=0.001),
            trial(4, None, lr=0.05, state="RUNNING"),
        ],
    )
    data = study_objective.extract(summarize([s], resamples=0))
    assert (data.param, data.objective, data.log_y) == (
        "lr.base",
        "steps to val/accuracy ≥ 0.5",
        True,
    )
    (found,) = data.studies
    assert found == study_objective.StudyTrials(
        "batch_size=64",
        64,
        [0, 1, 2, 3],
        [0.01, 0.2, 3.0, 0.001],
        [300.0, 120.0, None, None],
        [False, False, True, False],
        [None, None, "diverged", "not reached"],
        1,
    )
    figure = study_objective.render(data)
    crosses = [t for t in figure.data if t.name.endswith(("diverged", "not reached"))]
    # Infeasible trials along the top: 30% above the worst steps shown.
    assert all(y == pytest.approx(300 * study_objective.CEILING) for t in crosses for y in t.y)


def test_a_metric_study_draws_its_infeasible_trials_below_the_worst_accuracy():
    metric = Objective("metric", "val/accuracy", "max")
    s = study({"batch_size": 64}, 0, [trial(0, 0.8), trial(1, 0.6, lr=0.3), trial(2, None)], metric)
    data = study_objective.extract(summarize([s], resamples=0))
    assert (data.objective, data.log_y, data.higher_is_better) == ("val/accuracy", False, True)
    figure = study_objective.render(data)
    (cross,) = [t for t in figure.data if t.name.endswith("not reached")]
    assert cross.y[0] == pytest.approx(0.6 - 0.2 * (study_objective.CEILING - 1))


# ============================================================================ The answer


def test_the_tuned_answer_is_the_fit_and_each_batch_sizes_best_steps():
    summary = summarize(formula_studies(never=(2048,)), resamples=0)
    found = tuned_answer(summary)
    (series,) = found.series
    fit = summary.fits[0].fit
    assert series.fit is fit and (series.perfect_below, series.maximal_above) == pytest.approx(
        (fit.b_crit / REGIME_FACTOR, fit.b_crit * REGIME_FACTOR)
    )
    rows = [(p.batch_size, p.steps, p.examples, p.feasible, p.asked) for p in series.points]
    assert rows == [(b, round(steps_at(b)), b * round(steps_at(b)), 2, 3) for b in SIZES[:-1]] + [
        (2048, None, None, 0, 3)
    ]
    assert all(p.confirmed is None and p.cap_hits is None for p in series.points)
    sentence = tuned_sentence(found)
    low, high = fit.intervals["b_crit"]
    assert sentence == (
        f"The critical batch size is {number(fit.b_crit)} (95% interval {number(low)}–"
        f"{number(high)}): to reach val/accuracy ≥ 0.5 training needs at least S_min = "
        f"{number(fit.s_min)} steps and E_min = {number(fit.e_min)} examples; steps fall almost "
        f"in proportion to the batch size below {number(fit.b_crit / 4)} and barely fall above "
        f"{number(fit.b_crit * 4)}."
    )
    assert (number(200.4), number(19_960.0), number(0.0523), number(None)) == (
        "200",
        "20,000",
        "0.0523",
        "—",
    )


def test_no_fit_is_said_and_the_confirmed_steps_and_cap_hits_are_shown():
    one = summarize([study({"batch_size": 16}, 0, [trial(0, 100.0)])], resamples=0)
    assert tuned_sentence(tuned_answer(one)) == (
        "No critical batch size: 1 batch size(s) reached the target; the fit needs 2."
    )
    summary = summarize(formula_studies(), resamples=0)
    # Each point as if confirmed on 3 seeds, with 2 trials that ran to their step cap.
    confirmed = Steps(120.0, 110.0, 130.0, 3, CONFIRMED)
    points = [
        p._replace(
            steps=confirmed,
            censoring=Censoring(p.batch_size, 3, 1, 0, 2, 100.0, 400, 0.25, False),
        )
        for p in summary.points
    ]
    found = tuned_answer(summary._replace(points=points))
    assert {(p.confirmed, p.cap_hits) for p in found.series[0].points} == {(confirmed, 2)}
    html = answer_html(
        Context(Results(*fixed_rule_sweep()), summary=summary._replace(points=points)), None
    )
    assert "<th>confirmed on fresh seeds</th><th>trials at their step cap</th>" in html
    assert "<td>120 (110–130, 3 seeds)</td><td>2</td>" in html


# ============================================================================ Search budget


def test_the_search_budget_is_the_best_of_k_of_each_studys_finished_trials():
    summary = summarize(formula_studies(), resamples=0)
    data = search_budget.extract(summary)
    assert [c.panel for c in data.studies] == [f"batch_size={b}" for b in SIZES]
    for b, curve in zip(SIZES, data.studies, strict=True):
        best = round(steps_at(b))
        # Trials need 2 best, best and never: of one trial the median is 2 best; of two, the
        # best of three pairs (2 best + best, 2 best + never, best + never) is best twice.
        assert (curve.batch_size, curve.x, curve.median) == (b, [1, 2, 3], [2 * best, best, best])
        assert curve.high[0] is None  # a third of single draws never reach: no top
    figure = search_budget.render(data)
    assert figure.layout.yaxis.type == "log"


def test_a_metric_study_without_steps_to_target_draws_no_search_budget():
    # Its values are accuracies, not steps: a curve of them under "best steps to ..." would
    # show the worst accuracy as the best (best_of_k takes the least).
    metric = Objective("metric", "val/accuracy", "max")
    s = study({"batch_size": 64}, 0, [trial(0, 0.8), trial(1, 0.6, lr=0.3), trial(2, None)], metric)
    summary = summarize([s], resamples=0)
    assert summary.points[0].budget is None
    assert search_budget.extract(summary).studies == []


# ============================================================================ Parallel coordinates


def test_the_studies_parallel_coordinates_are_the_searched_keys_coloured_by_the_objective():
    summary = summarize(formula_studies(), resamples=0)
    space = {"lr.base": {"log_uniform": [0.001, 10.0]}, "optimizer.momentum": {"uniform": [0, 1]}}
    data = parallel_coordinates.extract_studies(summary, space)
    # The momentum is 0.9 in every trial: no axis. lr.base is log-uniform: a log axis.
    assert [d.label for d in data.dimensions] == ["batch_size (log)", "lr.base (log)"]
    lrs = [t["params"]["lr.base"] for p in summary.points for t in p.trials]
    assert data.dimensions[1].values == pytest.approx([math.log10(v) for v in lrs])
    # Per study: twice the best steps (a third of the way to 8x), the best, an infeasible.
    assert data.values == pytest.approx([1 / 3, 0.0, 1 / 0.9] * len(SIZES))
    assert data.ticks[1 / 0.9] == "not reached" and data.infeasible
    figure = parallel_coordinates.render(data)
    assert figure.data[0].line.cmax == pytest.approx(1 / 0.9)
