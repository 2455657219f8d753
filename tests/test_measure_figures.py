"""The figures of the in-trial measurements (issues 10 and 17): the gradient noise scale over
training and against the fitted critical batch size, sharpness with the optimizer's stability
limit; and which of the report's extra figures apply. Tables made by hand, numbers checked
without drawing."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pyarrow as pa
import pytest
from conftest import formula_studies, steps_at

from analysis.figures import metric_vs_batch_size, noise_scale, sharpness
from analysis.figures._common import Curve
from analysis.metrics import prepared, shown_trials
from analysis.page import Context, best_trial_ids, build_figures
from analysis.summary import summarize
from analysis.tables import Results
from lbs_tune.rules import stability_limit

MEASURED = ("tuned-steps", "pareto", "best-lr", "study-objective", "noise-scale")
MEASURED += ("noise-scale-hessian", "sharpness")


def extra_figures(results: Results, summary, metric: str) -> dict[str, go.Figure]:
    """The page's figures of a searched sweep and of the measurements (analysis.page)."""
    drawn = build_figures(Context(results, metric, summary=summary))
    return {k: f for k, f in drawn.items() if k in (*MEASURED, "noise-vs-critical")}


NOISE, SHARP = noise_scale.COLUMN, sharpness.COLUMN


def measured_sweep() -> tuple[pa.Table, pa.Table]:
    """Rule none: B=16 seeds 0 and 1 (SGD with Nesterov momentum 0.9), B=64 seed 0 and an
    errored B=64 seed 1 (AdamW). Reports at epochs 0.5, 1 and 1.5: B_simple at 0.5 and 1.5
    (B=16: 10 x (seed + 1) x epoch; B=64: 40 x epoch), sharpness at 1 and 1.5 (B=16: 2 + seed;
    B=64: 5 x epoch, preconditioned 30 x epoch), lr 0.1 at B=16 and 0.4 at B=64 but 0.2 at
    epoch 1.5 (a decay)."""
    trials, reports = [], []
    for trial_id, batch, seed, state in (
        ("a", 16, 0, "TERMINATED"),
        ("b", 16, 1, "TERMINATED"),
        ("c", 64, 0, "TERMINATED"),
        ("e", 64, 1, "ERROR"),
    ):
        optimizer = (
            {"optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.nesterov": True}
            if batch == 16
            else {"optimizer.name": "adamw", "optimizer.momentum": 0.9, "optimizer.nesterov": True}
        )
        trials.append(
            {"trial_id": trial_id, "state": state, "diverged": False, "lr.scaling": "none"}
            | {"batch_size": batch, "seed": seed, "final/val/accuracy": 0.5}
            | optimizer
            | {"optimizer.betas": [0.9, 0.999]}
        )
        for epoch in (0.5, 1.0, 1.5):
            noise = 10 * (seed + 1) * epoch if batch == 16 else 40 * epoch
            sharp = 2.0 + seed if batch == 16 else 5 * epoch
            lr = 0.1 if batch == 16 else (0.2 if epoch == 1.5 else 0.4)
            reports.append(
                {
                    "trial_id": trial_id,
                    "step": int(epoch * 1024 / batch),
                    "epoch": epoch,
                    "lr": lr,
                    NOISE: noise if epoch != 1.0 else None,
                    SHARP: sharp if epoch != 0.5 else None,
                    sharpness.PRECONDITIONED: 30 * epoch if batch == 64 and epoch != 0.5 else None,
                }
            )
    return pa.Table.from_pylist(trials), pa.Table.from_pylist(reports)


def test_b_simple_over_training_per_batch_size_over_seeds_without_crashes():
    trials, history = measured_sweep()
    data = noise_scale.extract(trials, history, "epoch")
    assert (data.column, data.x, data.panels) == (NOISE, "epoch", ["none"])
    assert data.curves == [
        Curve("none", 16, [0.5, 1.5], [7.5, 22.5], [5.0, 15.0], [10.0, 30.0]),
        # The errored seed is no result: only seed 0.
        Curve("none", 64, [0.5, 1.5], [20.0, 60.0], [20.0, 60.0], [20.0, 60.0]),
    ]
    only_a = noise_scale.extract(trials, history, "step", keep={"a"})
    assert only_a.curves == [Curve("none", 16, [32, 96], [5.0, 15.0], [5.0, 15.0], [5.0, 15.0])]
    assert isinstance(noise_scale.render(data), go.Figure)


def test_sharpness_beside_the_optimizers_own_limit_at_the_same_reports():
    # Issue 17: the line was 2 / lr whatever the optimizer, 47% too high for Nesterov's SGD.
    trials, history = measured_sweep()
    data = sharpness.extract(trials, history, "epoch")
    assert data.sharpness.curves == [
        Curve("none", 16, [1.0, 1.5], [2.5, 2.5], [2.0, 2.0], [3.0, 3.0]),
        # AdamW: the preconditioned sharpness, which its limit bounds.
        Curve("none", 64, [1.0, 1.5], [30.0, 45.0], [30.0, 45.0], [30.0, 45.0]),
    ]
    # Nesterov at β = 0.9: lr·λ < 2(1.9)/(2.8) = 1.357; AdamW at β₁ = 0.9: lr·λ < 38.
    assert [(c.batch_size, c.x, c.median) for c in data.threshold] == [
        (16, [1.0, 1.5], pytest.approx([13.571, 13.571], abs=1e-3)),
        (64, [1.0, 1.5], pytest.approx([95.0, 190.0])),
    ]
    figure = sharpness.render(data)
    assert [t.name for t in figure.data if t.name.startswith("limit")] == [
        "limit, B=16",
        "limit, B=64",
    ]


def test_adams_limit_is_that_of_the_beta1_each_report_trained_with():
    """The SDE rule moves beta1 with the batch (the loop reports it): at k = 4 from 0.9 it is
    1 - 4 x 0.1 = 0.6, and the limit 2 (1 + 0.6) / ((1 - 0.6) lr) = 8 / lr, not the config's
    38 / lr. A report without the column keeps the config's."""
    trials, history = measured_sweep()
    rows = zip(history["trial_id"].to_pylist(), history["epoch"].to_pylist(), strict=True)
    moved = [0.6 if t in ("c", "e") and epoch != 1.5 else None for t, epoch in rows]
    history = history.append_column(sharpness.MOVED_BETA1, pa.array(moved, pa.float64()))
    (_, adam) = sharpness.extract(trials, history, "epoch").threshold
    # lr 0.4 at epoch 1 (moved beta1: 8 / 0.4), 0.2 at epoch 1.5 (no column value: 38 / 0.2).
    assert (adam.batch_size, adam.x, adam.median) == (64, [1.0, 1.5], pytest.approx([20.0, 190.0]))


def test_each_trials_limit_from_its_optimizer_settings_or_the_defaults():
    trials, _ = measured_sweep()
    rows = trials.to_pylist()
    rows[0] |= {"optimizer.momentum": 0.0}  # plain gradient descent: 2 / lr
    rows[1] |= {"optimizer.nesterov": False}  # heavy ball: 3.8 / lr
    rows[2] |= {"optimizer.betas": [0.5, 0.999]}
    rows[3] |= {"optimizer.name": "lars", "state": "TERMINATED"}  # no line
    table = pa.Table.from_pylist(rows)
    # The figures' prepared tables hold list-valued keys as text: the same limits.
    for found in (sharpness.limits(table), sharpness.limits(prepared(table))):
        assert found["a"] == (pytest.approx(2.0), False)
        assert found["b"] == (pytest.approx(3.8), False)
        assert found["c"] == (pytest.approx(6.0), True)
        assert math.isnan(found["e"][0])
    # Without the columns, the trial config's defaults: SGD with Nesterov momentum 0.9.
    bare = trials.drop_columns([k for k in sharpness.OPTIMIZER_KEYS])
    assert sharpness.limits(bare)["a"] == (
        pytest.approx(stability_limit("sgd", 1, 0.9, True)),
        False,
    )


def test_a_grid_over_lr_shows_the_best_configuration_by_the_metric():
    trials, _ = measured_sweep()
    # Seed 1 at B=16 gets another lr.base and a worse final metric: B=16 shows seed 0 only.
    trials = trials.append_column("lr.base", pa.array([0.1, 0.3, 0.1, 0.1]))
    trials = trials.set_column(
        trials.schema.get_field_index("final/val/accuracy"),
        "final/val/accuracy",
        pa.array([0.6, 0.4, 0.5, 0.5]),
    )
    shown = shown_trials(trials, "val/accuracy", None)
    assert shown["trial_id"].to_pylist() == ["a", "c"]


def test_a_metric_without_a_direction_is_ranked_in_the_sweeps_mode():
    """A sweep of `noise/b_simple` with `metric.mode: min` (a metric with no direction of its
    own): at B=16 the configuration with the smaller final value is the best, on the figure
    against batch size and among the trials drawn over training."""
    trials, history = measured_sweep()
    trials = trials.append_column("lr.base", pa.array([0.1, 0.3, 0.1, 0.1]))
    trials = trials.append_column("final/noise/b_simple", pa.array([7.0, 3.0, 5.0, 5.0]))
    assert shown_trials(trials, NOISE, None, "min")["trial_id"].to_pylist() == ["b", "c"]
    assert shown_trials(trials, NOISE, None)["trial_id"].to_pylist() == ["a", "c"]  # max
    drawn = metric_vs_batch_size.extract(trials, NOISE, "min")
    assert [(line.batch_sizes, line.median) for line in drawn.lines] == [([16, 64], [3.0, 5.0])]
    page = build_figures(Context(Results(trials, history), NOISE, mode="min"))
    final = page["metric-vs-batch-size"].data[0]
    assert (final.name, list(final.y)) == (NOISE, [3.0, 5.0])


def versus_history(summary) -> pa.Table:
    """B_simple of each best trial at half its steps to target (10), at them (20) and after
    (30); for B=64, only after."""
    rows = []
    for p in summary.points:
        steps = int(p.steps_to_target)
        for step, value in ((steps // 2, 10.0), (steps, 20.0), (steps + 10, 30.0)):
            if p.batch_size == 64 and step <= steps:
                continue
            rows.append({"trial_id": p.best["ray_trial_id"], "step": step, NOISE: value})
            rows.append({"trial_id": "other", "step": step, NOISE: 99.0})
    return pa.Table.from_pylist(rows)


def test_b_simple_at_the_target_against_the_fitted_b_crit():
    studies = [s for s in formula_studies() if s.point["batch_size"] in (16, 64, 256, 1024)]
    summary = summarize(studies, resamples=20)
    fit = summary.fits[0].fit
    data = noise_scale.extract_versus(summary, versus_history(summary))
    assert data.batch_sizes == [16, 256, 1024]  # B=64 measured only after its target
    assert data.b_simple == [20.0, 20.0, 20.0]
    assert data.step == [round(steps_at(b)) for b in (16, 256, 1024)]
    assert data.b_crit == [fit.b_crit] * 3
    low, high = fit.intervals["b_crit"]
    assert (data.b_crit_low, data.b_crit_high) == ([low] * 3, [high] * 3)
    figure = noise_scale.render_versus(data)
    (line,) = [t for t in figure.data if t.name == "y = x"]
    assert list(line.x) == list(line.y)
    assert line.x[0] <= 20.0 and line.x[-1] >= fit.b_crit


def test_the_extra_figures_that_apply():
    trials, history = measured_sweep()
    assert list(extra_figures(Results(trials, history), None, "val/accuracy")) == [
        "noise-scale",
        "sharpness",
    ]
    summary = summarize(formula_studies(), resamples=0)
    # A searched sweep whose history has the measurement columns, all null: no such figures.
    empty = history.set_column(
        history.schema.get_field_index(NOISE), NOISE, pa.nulls(history.num_rows, pa.float64())
    ).drop_columns([SHARP])
    drawn = extra_figures(Results(trials, empty), summary, "val/accuracy")
    assert list(drawn) == ["tuned-steps", "pareto", "best-lr", "study-objective"]
    assert all(isinstance(f, go.Figure) for f in drawn.values())
    with_noise = extra_figures(Results(trials, versus_history(summary)), summary, "val/accuracy")
    assert "noise-vs-critical" in with_noise
    # The Hessian-weighted B_noise, where the trials measured it, beside B_simple.
    hessian = history.append_column(noise_scale.HESSIAN_COLUMN, history[NOISE])
    drawn = extra_figures(Results(trials, hessian), None, "val/accuracy")
    assert list(drawn) == ["noise-scale", "noise-scale-hessian", "sharpness"]
    data = noise_scale.measured_curves(
        trials, hessian, noise_scale.HESSIAN_COLUMN, "epoch", "val/accuracy"
    )
    assert [c.median for c in data.curves] == [[7.5, 22.5], [20.0, 60.0]]
    assert "B_noise = tr(HΣ) / GᵀHG" in drawn["noise-scale-hessian"].layout.title.text
    assert best_trial_ids(summary) == {
        f"r1-{0.1 * math.sqrt(b / 16)}" for b in [16, 32, 64, 128, 256, 512, 1024, 2048]
    }
