"""The summary of a searched sweep (analysis.summary): per grid point the best trial and its
study's spread, the critical-batch fit over batch sizes and seeds, summary.json, and the study
trials table of `lbs-tune export`.

The pure parts run on studies made by hand; the storage parts on a real optuna.db written by
the real searcher (driven as Ray Tune drives it, without a cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from conftest import (
    B_NOISE,
    QUICKSTART_TUNED,
    S_MIN,
    SIZES,
    STEPS,
    formula_studies,
    steps_at,
    study,
    trial,
)

from analysis.budget import best_of_k
from analysis.scaling import fit_scaling
from analysis.studies_table import study_trials_table
from analysis.summary import (
    base_batch_size,
    read_summary,
    summarize,
    summarize_point,
    trial_steps,
)
from analysis.summary_json import summary_json, summary_path, write_summary
from lbs_tune.space import SearchSpec
from lbs_tune.storage import Location, locate
from lbs_tune.studies import Objective, StudyRecord


def confirm_run(number: int, confirms: int, seed: int, steps: float | None) -> dict:
    """A confirmation run as `read_studies` gives it."""
    return {**trial(number, steps), "confirms": confirms, "seed": seed}


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
    assert p.counts == {
        "asked": 6,
        "feasible": 3,
        "infeasible": 2,
        "diverged": 1,
        "pruned": 0,
        "unfinished": 1,
    }
    # Without confirmation runs the point's steps are the search's best.
    assert p.steps == (120.0, 120.0, 120.0, 1, "search")
    assert (p.confirmations, p.confirmed) == ([], None)


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
    assert fit.b_crit == pytest.approx(B_NOISE, rel=0.01)
    assert fit.e_min == pytest.approx(S_MIN * B_NOISE, rel=0.01)
    assert fit.bracketed and series.sources == ["search"] * len(SIZES)
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
    assert summary.fits[1].fit.b_crit == pytest.approx(summary.fits[0].fit.b_crit, rel=0.01)


def test_no_studies_no_summary_and_no_batch_size_no_fit():
    assert summarize([]) is None
    only_seeds = summarize([study({"seed": 0}, 0, [trial(0, 10.0)])], resamples=0)
    assert only_seeds.points[0].batch_size is None and only_seeds.fits == []


# ============================================================================ summary.json


def test_summary_json_reads_back_with_points_and_the_fit(tmp_path):
    studies = formula_studies(never=(2048,))
    path = write_summary(summarize(studies), tmp_path / "summary.json")
    data = json.loads(path.read_text())
    assert data["format"] == 2
    assert data["objective"] == {
        "kind": "steps_to_target",
        "metric": "val/accuracy",
        "mode": "max",
        "target": 0.5,
    }
    first, last = data["points"][0], data["points"][-1]
    best = round(steps_at(16))
    assert first["batch_size"] == 16 and first["study"] == "batch_size=16"
    assert first["steps_to_target"] == {
        "median": best,
        "low": best,
        "high": best,
        "count": 1,
        "from": "search",
    }
    assert first["examples_to_target"] == 16 * best
    assert first["search"] == {
        "best_trial": 1,
        "best_config": {"lr.base": 0.1, "optimizer.momentum": 0.9},
        "best_value": best,
        "steps_to_target": best,
    }
    assert (first["confirmations"], first["confirm_seeds"]) == ([], [])
    trials = first["trials"]
    assert (trials["asked"], trials["feasible"], trials["infeasible"], trials["diverged"]) == (
        3,
        2,
        1,
        1,
    )
    assert trials["spread"] == {
        "of": "steps_to_target",
        "median": best * 1.5,
        "low": best,
        "high": best * 2,
        "count": 2,
    }
    assert [t["state"] for t in trials["all"]] == ["COMPLETE", "COMPLETE", "FAIL"]
    # The search budget: of 3 trials (2 best, 1 twice the steps, 1 never), one search of all 3.
    assert first["search_budget"]["k"] == [1, 2, 3]
    assert first["search_budget"]["median"][-1] == best
    assert first["search_budget"]["p_none"] == [pytest.approx(1 / 3), 0, 0]
    # No Ray trial ids (they differ between an interrupted and an unbroken run).
    assert "ray_trial_id" not in json.dumps(data)
    assert last["batch_size"] == 2048 and last["steps_to_target"]["median"] is None
    assert last["search"]["best_config"] is None
    fit = data["fit"]
    assert fit == data["fits"][0] and fit["group"] == {}
    # One name per number: B_crit (= E_min / S_min) once, no b_noise anywhere.
    assert "b_noise" not in json.dumps(data)
    assert fit["b_crit"] == pytest.approx(B_NOISE, rel=0.01)
    assert fit["e_min"] == pytest.approx(fit["s_min"] * fit["b_crit"])
    assert fit["batch_sizes"] == SIZES[:-1]
    assert set(fit["intervals"]) == {"s_min", "e_min", "b_crit"}
    for name in ("s_min", "e_min", "b_crit"):
        low, high = fit["intervals"][name]
        assert low <= fit[name] <= high
    assert (fit["level"], fit["method"], fit["reason"]) == (0.95, "profile likelihood", None)
    assert fit["series"]["from"] == ["search"] * len(SIZES)
    assert fit["series"]["median"][:3] == [round(steps_at(b)) for b in SIZES[:3]]


# ============================================================================ Confirmation


def confirmed_study(
    point: dict, index: int, search: list[float | None], runs: dict[int, list[float | None]]
) -> StudyRecord:
    """A study whose search trials need `search` steps (None: never reached) and whose
    confirmed trials (`runs`' keys, best first) needed `runs[trial]` steps on seeds 1, 2, 3."""
    trials = [trial(n, steps, lr=0.1 * (n + 1)) for n, steps in enumerate(search)]
    confirmations = [
        confirm_run(rank * 3 + k, number, seed, steps)
        for rank, (number, seeded) in enumerate(runs.items())
        for k, (seed, steps) in enumerate(zip((1, 2, 3), seeded, strict=True))
    ]
    return study(point, index, trials)._replace(
        confirmed=tuple(runs), seeds=(1, 2, 3), confirmations=tuple(confirmations)
    )


def test_a_points_steps_are_its_best_configuration_confirmed_on_fresh_seeds():
    runs = {0: [130.0, 110.0, None], 1: [105.0, 100.0, 115.0]}
    s = confirmed_study({"batch_size": 64}, 0, [100.0, 120.0, None], runs)
    p = summarize_point(s)
    assert p.steps_to_target == 100.0  # the search's best, on the seed that chose it
    # The search's best on fresh seeds: 110 and 130, once not reached (the worst): median 130.
    assert p.steps == (130.0, 110.0, None, 3, "confirmed")
    # The runner-up is beside it (faster here), but it does not replace the chosen one: picking
    # by these same runs would be the winner's curse again.
    assert p.confirmed == p.steps
    assert [(c.rank, c.trial, c.search_steps) for c in p.confirmations] == [
        (0, 0, 100.0),
        (1, 1, 120.0),
    ]
    assert p.confirmations[1].steps == (105.0, 100.0, 115.0, 3, "confirmed")
    assert [r["seed"] for r in p.confirmations[0].runs] == [1, 2, 3]
    point = summary_json(summarize([s]))["points"][0]
    assert point["steps_to_target"] == {
        "median": 130, "low": 110, "high": None, "count": 3, "from": "confirmed"}  # fmt: skip
    assert point["search"]["steps_to_target"] == 100 and point["confirm_seeds"] == [1, 2, 3]
    first = point["confirmations"][0]
    assert (first["rank"], first["trial"], first["search_steps"], first["median"]) == (
        0,
        0,
        100,
        130,
    )
    assert first["config"] == {"lr.base": 0.1, "optimizer.momentum": 0.9}
    assert [(r["seed"], r["steps_to_target"], r["state"]) for r in first["runs"]] == [
        (1, 130, "COMPLETE"), (2, 110, "COMPLETE"), (3, None, "FAIL")]  # fmt: skip
    # A confirmation that has not run yet leaves the point to its search.
    waiting = s._replace(confirmations=())
    assert summarize_point(waiting).steps == (100.0, 100.0, 100.0, 1, "search")


def test_a_metric_studys_confirmation_runs_count_their_steps_to_the_sweeps_target():
    """A study that maximises val/accuracy, under a target on it: its confirmation runs' steps
    to the target are the same numbers in the point, in summary.json and in what the fit takes."""
    metric = Objective("metric", "val/accuracy", "max")

    def run(number, seed, reached_at):
        values = {10: 0.3, reached_at: 0.6}
        return {**trial(number, 0.6, values=values), "confirms": 0, "seed": seed}

    searched = [trial(0, 0.6, values={10: 0.3, 40: 0.6})]
    s = study({"batch_size": 64}, 0, searched, objective=metric)._replace(
        confirmed=(0,), seeds=(1, 2, 3), confirmations=(run(0, 1, 40), run(1, 2, 50), run(2, 3, 60))
    )
    target = ("val/accuracy", 0.5)
    p = summarize_point(s, target=target)
    assert p.confirmations[0].run_steps == [40, 50, 60] and p.steps.median == 50
    runs = summary_json(summarize([s], target=target))["points"][0]["confirmations"][0]["runs"]
    assert [r["steps_to_target"] for r in runs] == [40, 50, 60]


def test_the_fit_takes_the_confirmed_steps_not_the_lucky_search_seed():
    # The search's best is 20% luckier than its configuration (the winner's curse); on fresh
    # seeds it needs the formula's steps x 1.1, 1.0 and 0.9: their median is the formula.
    studies = [
        confirmed_study(
            {"batch_size": b},
            i,
            [round(0.8 * steps_at(b)), round(1.5 * steps_at(b))],
            {0: [round(f * steps_at(b)) for f in (1.1, 1.0, 0.9)]},
        )
        for i, b in enumerate(SIZES)
    ]
    (series,) = summarize(studies).fits
    assert series.median == [round(steps_at(b)) for b in SIZES]
    assert series.low == [round(0.9 * steps_at(b)) for b in SIZES]
    assert series.high == [round(1.1 * steps_at(b)) for b in SIZES]
    assert series.seeds == [3] * len(SIZES) and series.sources == ["confirmed"] * len(SIZES)
    assert series.search == [round(0.8 * steps_at(b)) for b in SIZES]
    assert series.fit.s_min == pytest.approx(S_MIN, rel=0.01)
    assert series.fit.b_crit == pytest.approx(B_NOISE, rel=0.01)
    fit = summary_json(summarize(studies))["fit"]
    assert fit["series"]["search"] == series.search and fit["series"]["seeds"] == [3] * 8


def test_one_median_per_batch_size_covers_where_every_run_as_an_observation_does_not():
    """Seeds of one batch size share its configuration and that configuration's distance from
    the optimum (u, sd 0.1 in log steps, as the quickstart's residuals), beside the seeds' own
    noise (sd 0.1). 200 synthetic sweeps of 8 batch sizes x 3 seeds with S_min 100, B_crit 200:
    the fit of one median per batch size covers B_crit in 92-98% of them; the fit of every
    run as an observation (pseudo-replication) covers far less."""
    rng = np.random.default_rng(7)
    sizes = np.array(SIZES, dtype=float)
    truth = np.log(S_MIN * (1 + B_NOISE / sizes))
    medians = runs = 0
    for _ in range(200):
        log_steps = truth[:, None] + rng.normal(0, 0.1, (8, 1)) + rng.normal(0, 0.1, (8, 3))
        steps = np.exp(log_steps)
        low, high = fit_scaling(sizes, np.median(steps, axis=1)).intervals["b_crit"]
        medians += low <= B_NOISE <= high
        low, high = fit_scaling(np.repeat(sizes, 3), steps.ravel()).intervals["b_crit"]
        runs += low <= B_NOISE <= high
    assert 0.92 <= medians / 200 <= 0.98, medians
    assert runs / 200 < 0.9, runs


# ============================================================================ Caps and budget


def test_cap_hits_per_point_and_the_flag_of_a_best_near_its_cap():
    # The quickstart's batch 2048 under equal epochs: the best needed 27 of 35 steps, six ran
    # to the cap, one diverged; one pruned trial (stopped by the search, not by its cap).
    trials = [
        trial(0, 27.0, total_steps=35),
        *[trial(n, None, total_steps=35) for n in range(1, 7)],
        trial(7, None, diverged=True, total_steps=35),
        trial(8, None, state="PRUNED", total_steps=35, pruned_at=30),
    ]
    p = summarize_point(study({"batch_size": 2048}, 0, trials))
    assert p.censoring == (2048.0, 8, 1, 1, 6, 27.0, 35, pytest.approx(27 / 35), True)
    assert p.counts["pruned"] == 1
    assert summary_json(summarize([study({"batch_size": 2048}, 0, trials)]))["points"][0][
        "censoring"
    ] == {
        "trials": 8, "reached": 1, "diverged": 1, "capped": 6, "pruned": 1, "best_steps": 27,
        "best_cap": 35, "used": pytest.approx(27 / 35), "flagged": True,
    }  # fmt: skip
    # A floor of 100 steps: the same best uses 27% of its cap.
    floored = [{**t, "total_steps": 100} for t in trials]
    assert not summarize_point(study({"batch_size": 2048}, 0, floored)).censoring.flagged
    # Trials without a reported cap (an older sweep): no censoring to tell.
    assert summarize_point(study({"batch_size": 64}, 0, [trial(0, 10.0)])).censoring is None


def test_the_search_budget_curve_of_a_point_with_a_pruned_trial():
    trials = [
        trial(0, 20.0),
        trial(1, 10.0),
        trial(2, None),
        trial(3, None, state="PRUNED", pruned_at=25),
        trial(4, None, state="RUNNING"),  # not told: not in the curve
    ]
    budget = summarize_point(study({"batch_size": 64}, 0, trials)).budget
    # The pruned trial enters one step past where it stopped: a lower bound of its steps.
    expected = best_of_k([20.0, 10.0, None, 26.0])
    for field in ("median", "low", "high", "infeasible"):
        assert getattr(budget.curve, field).tolist() == getattr(expected, field).tolist()
    assert (budget.exact_up_to, budget.pruned) == (25.0, 1)
    # With one trial, the median is the second-best ranked of 4 (20): exact, below 25.
    assert budget.curve.median[0] == 20.0


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
        "confirm": {"top": 1, "seeds": 2},
    }
)


def searched_folder(folder: Path) -> Path:
    """A real optuna.db: the real searcher over batch sizes 32 and 128, driven as Ray Tune
    drives it; a trial reaches the target at step 100 (1 + 64 / B) rounded to tens, 10 steps
    more per seed, unless its lr is above 0.5 (it diverges at step 10); each study's best runs
    again on seeds 1 and 2."""
    from lbs_tune.searcher import StudySearcher

    points = [{"batch_size": 32}, {"batch_size": 128}]
    configs = [
        {"batch_size": p["batch_size"], "seed": 0, "steps": 1000, "lr": {"base": 0.1}}
        for p in points
    ]
    s = StudySearcher(SEARCH, points, configs, folder, STEPS._replace(target=0.9))
    for i in range(8):
        config = s.suggest(f"t{i}")
        lr, batch = config["lr"]["base"], config["batch_size"]
        if lr > 0.5:
            s.on_trial_complete(f"t{i}", {"step": 10, "val/accuracy": 0.1, "diverged": True})
            continue
        reached = 10 * round(10 * (1 + 64 / batch)) + 10 * config["seed"]
        s.on_trial_result(f"t{i}", {"step": 10, "val/accuracy": 0.3})
        s.on_trial_complete(
            f"t{i}",
            {"step": reached, "val/accuracy": 0.95, "diverged": False, "total_steps": 1000},
        )
    assert s.suggest("t8") == s.FINISHED
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

    # Each study's best again on seeds 1 and 2: 10 and 20 steps more than the search's seed 0.
    for p in feasible:
        assert p.seeds == [1, 2] and [c.trial for c in p.confirmations] == [p.best["number"]]
        assert p.steps == (p.steps_to_target + 15, p.steps_to_target + 10,
                           p.steps_to_target + 20, 2, "confirmed")  # fmt: skip
        assert p.censoring.capped == 0 and p.censoring.best_cap == 1000

    table = study_trials_table(folder)
    assert table.column_names[:3] == ["study", "point", "batch_size"]
    rows = table.to_pylist()
    assert [(r["study"], r["run"], r["number"], r["confirm_seed"]) for r in rows] == [
        ("batch_size=32", "search", 0, None),
        ("batch_size=32", "search", 1, None),
        ("batch_size=32", "confirm", 0, 1),
        ("batch_size=32", "confirm", 1, 2),
        ("batch_size=128", "search", 0, None),
        ("batch_size=128", "search", 1, None),
        ("batch_size=128", "confirm", 0, 1),
        ("batch_size=128", "confirm", 1, 2),
    ]
    runs = [t for p in summary.points for t in [*p.trials, *sorted(
        (r for c in p.confirmations for r in c.runs), key=lambda r: r["number"])]]  # fmt: skip
    for r, t in zip(rows, runs, strict=True):
        assert (r["state"], r["value"], r["lr.base"], r["ray_trial_id"]) == (
            t["state"],
            t["value"],
            t["params"]["lr.base"],
            t["ray_trial_id"],
        )
        assert dict(zip(r["report_steps"], r["report_values"], strict=True)) == t["values"]
        assert r["diverged"] == (t["params"]["lr.base"] > 0.5)

    assert study_trials_table(tmp_path) is None
    assert read_summary(locate(tmp_path)) is None


def test_studies_on_remote_storage_are_read_from_a_local_copy(tmp_path):
    folder = searched_folder(tmp_path / "sweep")
    # A filesystem that is not pyarrow's LocalFileSystem: what an s3:// experiment looks like.
    remote = Location(pafs.SubTreeFileSystem(str(folder), pafs.LocalFileSystem()), "", "x://s")
    assert not remote.is_local
    assert study_trials_table(remote).equals(study_trials_table(folder))


@pytest.mark.parametrize(
    "base, batch",
    [
        ({}, 128),  # the trial config's default
        ({"batch_schedule": [[0, 64], [2000, 256]]}, 64),  # the schedule's first batch
        ({"batch_size": 32}, 32),
    ],
)
def test_a_grid_without_batch_size_has_its_trials_batch_size(base, batch):
    """The studies of a grid over something else run at the base trial's batch size, as the
    runner resolves it: the record's base may not name it (it was None, and the point had no
    examples to target and no censoring)."""
    from lbs_tune.spec import load_spec

    spec = load_spec(QUICKSTART_TUNED).model_dump(mode="json")
    spec["grid"] = {"lr.scaling": ["none"]}
    spec["base"] = {k: v for k, v in spec["base"].items() if k != "batch_size"} | base
    assert base_batch_size({"spec": spec}) == batch
    assert base_batch_size({"spec": {"base": {"batch_size": 8}, "grid": "not a grid"}}) == 8
    assert base_batch_size(None) is None
