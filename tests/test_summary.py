"""The summary of a searched sweep (analysis.summary): per grid point the best trial and its
study's spread, the critical-batch fit over batch sizes and seeds, summary.json, and the study
trials table of `lbs-tune export`.

The pure parts run on studies made by hand; the storage parts on a real optuna.db written by
the real searcher (driven as Ray Tune drives it, without a cluster)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from analysis.scaling import fit_scaling
from analysis.summary import (
    read_summary,
    study_trials_table,
    summarize,
    summarize_point,
    summary_path,
    trial_steps,
    write_study_trials,
    write_summary,
)
from lbs_tune.space import SearchSpec
from lbs_tune.storage import Location, locate
from lbs_tune.studies import Objective, StudyRecord

STEPS = Objective("steps_to_target", "val/accuracy", "max", 0.5)
# McCandlish et al.'s form with S_min = 100, B_noise = 200: S(B) = 100 (1 + 200 / B).
S_MIN, B_NOISE = 100.0, 200.0
SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048]


def steps_at(batch: int) -> float:
    return S_MIN * (1 + B_NOISE / batch)


def trial(
    number: int,
    value: float | None,
    lr: float = 0.1,
    state: str | None = None,
    diverged: bool = False,
    at_value: float | None = None,
    values: dict[int, float] | None = None,
) -> dict:
    """A trial as `read_studies` gives it: COMPLETE with a value, else FAIL (or `state`)."""
    state = state or ("COMPLETE" if value is not None else "FAIL")
    return {
        "number": number,
        "state": state,
        "value": value,
        "at_value": at_value if at_value is not None else (0.5 if value is not None else None),
        "params": {"lr.base": lr, "optimizer.momentum": 0.9},
        "ray_trial_id": f"r{number}-{lr}",
        "reason": None if state != "FAIL" else ("diverged" if diverged else "not reached"),
        "diverged": diverged,
        "ray_errors": 0,
        "values": values or ({int(value): 0.5} if value is not None else {}),
    }


def study(point: dict, index: int, trials: list[dict], objective=STEPS) -> StudyRecord:
    name = ",".join(f"{k}={v}" for k, v in point.items())
    return StudyRecord(name, point, index, objective, trials)


def formula_studies(seeds=(0,), scale=(1.0,), never=()) -> list[StudyRecord]:
    """One study per batch size (x seed) whose best trial needs steps_at(B) x scale[seed] steps
    (rounded), with a worse and an infeasible trial beside it; batch sizes in `never` reach the
    target in no trial."""
    found = []
    for batch in SIZES:
        for seed, factor in zip(seeds, scale, strict=True):
            best = None if batch in never else round(steps_at(batch) * factor)
            point = {"batch_size": batch, "seed": seed} if len(seeds) > 1 else {"batch_size": batch}
            found.append(
                study(
                    point,
                    len(found),
                    [
                        trial(0, None if best is None else best * 2, lr=0.01),
                        trial(1, best, lr=0.1 * math.sqrt(batch / 16)),
                        trial(2, None, lr=5.0, diverged=True),
                    ],
                )
            )
    return found


# ============================================================================ Per grid point


def test_a_point_has_its_best_trial_and_the_spread_of_its_feasible_trials():
    s = study(
        {"batch_size": 64},
        0,
        [
            trial(0, 300.0, lr=0.01),
            trial(1, 120.0, lr=0.2),
            trial(2, None, lr=3.0, diverged=True),
            trial(3, 200.0, lr=0.05),
            trial(4, None, lr=0.001),
            trial(5, None, state="RUNNING"),
        ],
    )
    p = summarize_point(s)
    assert (p.batch_size, p.steps_to_target, p.best["number"]) == (64, 120.0, 1)
    assert p.best["params"] == {"lr.base": 0.2, "optimizer.momentum": 0.9}
    assert p.spread == ("steps_to_target", 200.0, 120.0, 300.0, 3)
    assert p.counts == {"asked": 6, "feasible": 3, "infeasible": 2, "diverged": 1, "unfinished": 1}


def test_equal_steps_go_to_the_better_metric_at_that_step_and_none_reached_is_null():
    tied = study(
        {"batch_size": 32},
        0,
        [trial(0, 80.0, at_value=0.52), trial(1, 80.0, lr=0.3, at_value=0.58)],
    )
    assert summarize_point(tied).best["number"] == 1
    nothing = summarize_point(study({"batch_size": 32}, 0, [trial(0, None), trial(1, None)]))
    assert (nothing.steps_to_target, nothing.best) == (None, None)
    assert nothing.spread == ("steps_to_target", None, None, None, 0)


def test_a_grid_without_batch_size_takes_the_sweeps_and_a_metric_study_its_target_steps():
    metric = Objective("metric", "val/accuracy", "max")
    s = study(
        {"seed": 1},
        0,
        [
            trial(0, 0.81, values={10: 0.4, 20: 0.62, 30: 0.81}),
            trial(1, 0.7, values={10: 0.55, 20: 0.7}),
        ],
        objective=metric,
    )
    p = summarize_point(s, batch_size=128, target=("val/accuracy", 0.6))
    # The best trial is the metric's best; its steps, the first step at which it reached 0.6.
    assert (p.batch_size, p.best["number"], p.steps_to_target) == (128, 0, 20.0)
    assert p.spread == ("val/accuracy", pytest.approx(0.755), 0.7, 0.81, 2)
    # A target on another metric: the study's reports hold no such values.
    assert trial_steps(s.trials[0], metric, ("val/loss", 0.3)) is None
    assert summarize_point(s, batch_size=128).steps_to_target is None


# ============================================================================ The fit


def test_the_fit_of_the_best_steps_recovers_the_formulas_parameters():
    summary = summarize(formula_studies(), resamples=50)
    (series,) = summary.fits
    assert series.group == {} and series.batch_sizes == SIZES
    assert series.median == [round(steps_at(b)) for b in SIZES]
    fit = series.fit
    # Steps are whole numbers: the rounding alone moves the parameters by well under 1%.
    assert fit.s_min == pytest.approx(S_MIN, rel=0.01)
    assert fit.b_noise == pytest.approx(B_NOISE, rel=0.01)
    assert fit.e_min == pytest.approx(S_MIN * B_NOISE, rel=0.01)
    assert fit.b_crit == fit.b_noise and fit.bracketed
    low, high = fit.intervals["b_crit"]
    assert low <= fit.b_crit <= high


def test_seeds_combine_as_the_median_and_a_seed_that_never_reached_counts_worst():
    # Seeds 1 and 2 need 10% more and 10% fewer steps than the formula: the median is it.
    studies = formula_studies(seeds=(0, 1, 2), scale=(1.0, 1.1, 0.9))
    # At B=2048 two of the three seeds never reach the target: the median never does.
    studies = [
        s._replace(trials=[trial(0, None)])
        if s.point in ({"batch_size": 2048, "seed": 1}, {"batch_size": 2048, "seed": 2})
        else s
        for s in studies
    ]
    # At B=1024 one seed never does: the median is the slower of the other two.
    studies = [
        s._replace(trials=[trial(0, None)]) if s.point == {"batch_size": 1024, "seed": 2} else s
        for s in studies
    ]
    (series,) = summarize(studies, resamples=0).fits
    assert series.seeds == [3] * len(SIZES)
    assert series.median[:6] == [round(steps_at(b)) for b in SIZES[:6]]
    assert series.median[6] == round(steps_at(1024) * 1.1)
    assert series.median[7] is None
    assert (series.low[7], series.high[7]) == (round(steps_at(2048)), None)
    # The fit is of the medians, B=2048 left out.
    assert series.fit.batch_sizes == tuple(SIZES[:7])
    assert series.fit == fit_scaling(SIZES, series.median, resamples=0)


def test_other_grid_keys_make_one_fit_each():
    sgd = formula_studies()
    # A second optimizer that needs twice the steps at every batch size: S_min doubles.
    lars = [
        s._replace(
            point={**s.point, "optimizer.name": "lars"},
            trials=[trial(0, None if t["value"] is None else 2 * t["value"]) for t in s.trials],
        )
        for s in sgd
    ]
    sgd = [s._replace(point={**s.point, "optimizer.name": "sgd"}) for s in sgd]
    summary = summarize(sgd + lars, resamples=0)
    assert [(f.name, f.group) for f in summary.fits] == [
        ("optimizer.name=sgd", {"optimizer.name": "sgd"}),
        ("optimizer.name=lars", {"optimizer.name": "lars"}),
    ]
    assert summary.fits[1].fit.s_min == pytest.approx(2 * summary.fits[0].fit.s_min, rel=0.01)
    assert summary.fits[1].fit.b_noise == pytest.approx(summary.fits[0].fit.b_noise, rel=0.01)


def test_no_studies_no_summary_and_no_batch_size_no_fit():
    assert summarize([]) is None
    only_seeds = summarize([study({"seed": 0}, 0, [trial(0, 10.0)])], resamples=0)
    assert only_seeds.points[0].batch_size is None and only_seeds.fits == []


# ============================================================================ summary.json


def test_summary_json_reads_back_with_points_and_the_fit(tmp_path):
    studies = formula_studies(never=(2048,))
    path = write_summary(summarize(studies, resamples=20), tmp_path / "summary.json")
    data = json.loads(path.read_text())
    assert data["objective"] == {
        "kind": "steps_to_target",
        "metric": "val/accuracy",
        "mode": "max",
        "target": 0.5,
    }
    first, last = data["points"][0], data["points"][-1]
    assert first["batch_size"] == 16 and first["study"] == "batch_size=16"
    assert first["steps_to_target"] == round(steps_at(16))
    assert first["examples_to_target"] == 16 * round(steps_at(16))
    assert first["best_config"] == {"lr.base": 0.1, "optimizer.momentum": 0.9}
    trials = first["trials"]
    assert (trials["asked"], trials["feasible"], trials["infeasible"], trials["diverged"]) == (
        3,
        2,
        1,
        1,
    )
    assert trials["spread"] == {
        "of": "steps_to_target",
        "median": round(steps_at(16)) * 1.5,
        "low": round(steps_at(16)),
        "high": round(steps_at(16)) * 2,
        "count": 2,
    }
    assert [t["state"] for t in trials["all"]] == ["COMPLETE", "COMPLETE", "FAIL"]
    # No Ray trial ids (they differ between an interrupted and an unbroken run).
    assert "ray_trial_id" not in json.dumps(data)
    assert (last["batch_size"], last["steps_to_target"], last["best_config"]) == (2048, None, None)
    fit = data["fit"]
    assert fit == data["fits"][0] and fit["group"] == {}
    assert fit["b_crit"] == pytest.approx(B_NOISE, rel=0.01)
    assert fit["e_min"] == pytest.approx(fit["s_min"] * fit["b_noise"])
    assert fit["batch_sizes"] == SIZES[:-1]
    for name in ("s_min", "e_min", "b_noise", "b_crit"):
        low, high = fit["intervals"][name]
        assert low <= fit[name] <= high
    # Profile-likelihood intervals (analysis.scaling): no bootstrap resamples behind them.
    assert (fit["level"], fit["resamples"], fit["reason"]) == (0.95, 0, None)


def test_summary_json_beside_the_report():
    assert summary_path(Path("/x/report.html")) == Path("/x/summary.json")
    assert summary_path(Path("sweep-report.html")) == Path("sweep-summary.json")
    assert summary_path(Path("out/mine.html")) == Path("out/mine.summary.json")


# ============================================================================ Real storage


SEARCH = SearchSpec.model_validate(
    {
        "space": {"lr.base": {"log_uniform": [0.01, 1.0]}},
        "trials_per_point": 2,
        "sampler": "qmc",
    }
)


def searched_folder(folder: Path) -> Path:
    """A real optuna.db: the real searcher over batch sizes 32 and 128, driven as Ray Tune
    drives it; a trial reaches the target at step 100 (1 + 64 / B) rounded to tens, unless its
    lr is above 0.5 (it diverges at step 10)."""
    from lbs_tune.searcher import StudySearcher

    points = [{"batch_size": 32}, {"batch_size": 128}]
    configs = [{"batch_size": p["batch_size"], "steps": 1000, "lr": {"base": 0.1}} for p in points]
    s = StudySearcher(SEARCH, points, configs, folder, STEPS._replace(target=0.9))
    for i in range(4):
        config = s.suggest(f"t{i}")
        lr, batch = config["lr"]["base"], config["batch_size"]
        if lr > 0.5:
            s.on_trial_complete(f"t{i}", {"step": 10, "val/accuracy": 0.1, "diverged": True})
            continue
        reached = 10 * round(10 * (1 + 64 / batch))
        s.on_trial_result(f"t{i}", {"step": 10, "val/accuracy": 0.3})
        s.on_trial_complete(f"t{i}", {"step": reached, "val/accuracy": 0.95, "diverged": False})
    return folder


def test_the_studies_of_a_real_storage_summarise_and_export(tmp_path):
    folder = searched_folder(tmp_path / "sweep")
    summary = read_summary(locate(folder), resamples=0)
    assert [(p.study, p.batch_size) for p in summary.points] == [
        ("batch_size=32", 32),
        ("batch_size=128", 128),
    ]
    assert [p.counts["asked"] for p in summary.points] == [2, 2]
    feasible = [p for p in summary.points if p.best is not None]
    assert [p.steps_to_target for p in feasible] == [
        10 * round(10 * (1 + 64 / p.batch_size)) for p in feasible
    ]

    table = study_trials_table(folder)
    assert table.column_names[:3] == ["study", "point", "batch_size"]
    rows = table.to_pylist()
    assert [(r["study"], r["number"]) for r in rows] == [
        ("batch_size=32", 0),
        ("batch_size=32", 1),
        ("batch_size=128", 0),
        ("batch_size=128", 1),
    ]
    for r, t in zip(rows, [t for p in summary.points for t in p.trials], strict=True):
        assert (r["state"], r["value"], r["lr.base"], r["ray_trial_id"]) == (
            t["state"],
            t["value"],
            t["params"]["lr.base"],
            t["ray_trial_id"],
        )
        assert dict(zip(r["report_steps"], r["report_values"], strict=True)) == t["values"]
        assert r["diverged"] == (t["params"]["lr.base"] > 0.5)

    written = write_study_trials(folder, tmp_path / "export")
    assert written == str(tmp_path / "export" / "studies.parquet")
    assert pq.read_table(written).equals(table)
    assert study_trials_table(tmp_path) is None
    assert write_study_trials(tmp_path, tmp_path / "export2") is None
    assert read_summary(locate(tmp_path)) is None


def test_studies_on_remote_storage_are_read_from_a_local_copy(tmp_path):
    folder = searched_folder(tmp_path / "sweep")
    # A filesystem that is not pyarrow's LocalFileSystem: what an s3:// experiment looks like.
    remote = Location(pafs.SubTreeFileSystem(str(folder), pafs.LocalFileSystem()), "", "x://s")
    assert not remote.is_local
    assert study_trials_table(remote).equals(study_trials_table(folder))
