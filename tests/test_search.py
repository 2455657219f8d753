"""The `search` section and the per-grid-point Optuna studies (lbs_tune.space, studies,
samplers and searcher).

The searcher is driven as Ray Tune drives it (suggest, on_trial_result, on_trial_complete, save,
pickling into tuner.pkl and restore), with reports from a closed-form stand-in for training;
a Ray test runs it in a real Tuner and checks that Ray ends a trial where the searcher stopped
it (test_tuned and test_restart kill the real driver).
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
from pathlib import Path

import optuna
import pytest
from pydantic import ValidationError

from lbs_tune.errors import UserError
from lbs_tune.samplers import make_sampler, sobol_point
from lbs_tune.searcher import StudySearcher
from lbs_tune.space import SearchSpec
from lbs_tune.spec import check_search
from lbs_tune.studies import (
    Objective,
    confirmation_seeds,
    objective_for,
    ranked,
    read_studies,
    study_storage,
)
from lbs_tune.sweep import Metric, SweepSpec, Target

SPACE = {
    "lr.base": {"log_uniform": [0.01, 10.0]},
    "optimizer.momentum": {"uniform": [0.0, 0.99]},
}
POINTS = [{"batch_size": 32}, {"batch_size": 256}]
NAMES = ["batch_size=32", "batch_size=256"]
TARGET = Objective("steps_to_target", "val/accuracy", "max", 0.9)


def spec(**changes) -> SearchSpec:
    return SearchSpec.model_validate({"space": SPACE, "trials_per_point": 3, **changes})


def configs(delay: float = 0.0) -> list[dict]:
    return [
        {
            "batch_size": p["batch_size"],
            "steps": 100,
            "lr": {"base": 0.1, "scaling": "none"},
            "optimizer": {"momentum": 0.9},
            "delay": delay,  # seconds per report, for the Ray test
        }
        for p in POINTS
    ]


def searcher(folder: Path, objective=TARGET, **changes) -> StudySearcher:
    return StudySearcher(spec(**changes), POINTS, configs(), folder, objective)


def reports(config: dict) -> list[dict]:
    """What a trial reports every 10 steps: val/accuracy grows linearly and reaches the target
    0.9 after 20 (1 + 64 / B) (1 + log10(lr / 0.3)^2) steps; lr > 5 diverges at step 30. Ends at
    the first report that reaches the target (as Ray's stop condition ends it), or at step 100."""
    lr, batch = config["lr"]["base"], config["batch_size"]
    needed = 20 * (1 + 64 / batch) * (1 + math.log10(lr / 0.3) ** 2)
    rows = []
    for step in range(10, 101, 10):
        diverged = lr > 5 and step >= 30
        accuracy = 0.1 if diverged else min(0.95, 0.9 * step / needed)
        rows.append({"step": step, "val/accuracy": accuracy, "diverged": diverged})
        if diverged or TARGET.stop("", rows[-1]):
            break
    return rows


def run(s: StudySearcher, trial_id: str, config: dict) -> None:
    """One trial as Ray runs it: every report but the last, then the last at completion."""
    rows = reports(config)
    for row in rows[:-1]:
        s.on_trial_result(trial_id, row)
    s.on_trial_complete(trial_id, rows[-1])


def ray_knows(folder: Path, trial_ids: list[str]) -> None:
    """Ray's experiment state as a resumed run finds it: the trials it saved, by id (each a
    trial's JSON and its runtime's JSON, as Ray writes them)."""
    trial = {"status": "PENDING", "relative_logdir": None}
    state = {
        "trial_data": [[json.dumps({**trial, "trial_id": t}), json.dumps({})] for t in trial_ids]
    }
    (folder / "experiment_state-2025-01-01_00-00-00.json").write_text(json.dumps(state))


def restored(pickled: bytes, folder: Path) -> StudySearcher:
    """The searcher as Tuner.restore rebuilds it: tuner.pkl's copy, then restore()."""
    s = pickle.loads(pickled)
    s.restore(str(folder / "searcher-state.pkl"))
    return s


def params_by_trial(folder: Path) -> dict[tuple[str, int], dict]:
    return {(r.name, t["number"]): t["params"] for r in read_studies(folder) for t in r.trials}


# ---------------------------------------------------------------------------- The spec


def test_a_search_section_parses_with_defaults():
    s = SearchSpec.model_validate({"space": {**SPACE, "seed": {"int": [0, 3]}}})
    assert (s.trials_per_point, s.sampler, s.seed, s.objective) == (16, "tpe", 0, "steps_to_target")
    assert s.space["seed"].bounds == (0, 3)
    assert SearchSpec.model_validate(s.dump()) == s
    d = s.distributions()
    assert d["lr.base"] == optuna.distributions.FloatDistribution(0.01, 10.0, log=True)
    assert d["seed"] == optuna.distributions.IntDistribution(0, 3)


@pytest.mark.parametrize(
    "section, loc, message",
    [
        ({"space": {"lr.base": {"log_uniform": [1.0, 0.5]}}}, "space.lr.base.log_uniform", "low <"),
        ({"space": {"lr.base": {"log_uniform": [0, 1]}}}, "space.lr.base.log_uniform", "> 0"),
        ({"space": {"lr.base": {"uniform": [0.5, 0.5]}}}, "space.lr.base.uniform", "low < high"),
        ({"space": {"seed": {"int": [3, 1]}}}, "space.seed.int", "low < high"),
        ({"space": {"seed": {"int": [1, "a"]}}}, "space.seed.int.int.1", "valid integer"),
        ({"space": {"x": {"uniform": [0, math.inf]}}}, "space.x.uniform.uniform.1", "finite"),
        ({"space": {"x": {"values": []}}}, "space.x.values.values", "at least 1"),
        ({"space": {"x": {"values": [1, 2, 1]}}}, "space.x.values.values", "1 listed twice"),
        ({"space": {"x": {"loguniform": [1, 2]}}}, "space.x", "did you mean 'log_uniform'"),
        ({"space": {"x": {"uniform": [0, 1], "int": [0, 1]}}}, "space.x", "not uniform and int"),
        ({"space": {"x": 0.1}}, "space.x", "give a distribution"),
        ({"space": {}}, "space", "at least 1"),
        ({"space": SPACE, "trials_per_point": 0}, "trials_per_point", "greater than or equal"),
        ({"space": SPACE, "sampler": "grid"}, "sampler", "'tpe', 'qmc' or 'random'"),
        ({"space": SPACE, "objective": "loss"}, "objective", "'steps_to_target' or 'metric'"),
        ({"space": SPACE, "trials": 3}, "trials", "Extra inputs"),
    ],
)
def test_bad_search_sections_are_refused_at_their_key(section, loc, message):
    with pytest.raises(ValidationError) as caught:
        SearchSpec.model_validate(section)
    error = caught.value.errors()[0]
    assert ".".join(str(p) for p in error["loc"]) == loc
    assert message in error["msg"]


def sweep(base_changes=None, grid=None) -> SweepSpec:
    base = {"steps": 10, "lr": {"base": 0.1, "scaling": "none"}, **(base_changes or {})}
    return SweepSpec(name="s", base=base, grid=grid or {"batch_size": [16, 64]})


@pytest.mark.parametrize(
    "space, sweep_spec, target, expected",
    [
        (SPACE, sweep(), Target(value=0.9), []),
        ({"batch_size": {"int": [8, 16]}}, sweep(), Target(value=0.9), [
            ("search.space.batch_size", "also a grid key")]),
        ({"lr.bas": {"uniform": [0, 1]}}, sweep(), Target(value=0.9), [
            ("search.space.lr.bas", "not a trial config key (did you mean 'lr.base'?)")]),
        ({"lr": {"uniform": [0, 1]}}, sweep(), Target(value=0.9), [
            ("search.space.lr", "not a trial config key")]),
        ({"steps": {"int": [10, 20]}}, sweep(), Target(value=0.9), [
            ("search.space.steps", "the budget is not searched")]),
        ({"optimizer.momentum": {"uniform": [0, 1]}}, sweep(), Target(value=0.9), [
            ("search.space.optimizer.momentum", "1.0 is not a valid optimizer.momentum")]),
        ({"ghost_batch_size": {"values": [8, 12]}}, sweep(), Target(value=0.9), [
            ("search.space.ghost_batch_size", "12 is not a valid ghost_batch_size")]),
        (SPACE, sweep({"lr": {"scaling": "linear"}}), Target(value=0.9), [
            ("base.lr.scaling", "must be 'none' when search.space has lr.base")]),
        (SPACE, sweep(grid={"batch_size": [16], "lr.scaling": ["none", "sqrt"]}),
         Target(value=0.9), [("grid.lr.scaling", "not 'sqrt'")]),
        (SPACE, sweep(), None, [("search.objective", "needs a `target`")]),
        # Every metric with a direction (names.direction) is a target a study can reach.
        (SPACE, sweep(), Target(metric="val/perplexity", value=120), []),
        (SPACE, sweep(), Target(metric="val/miou", value=0.5), []),
    ],
)  # fmt: skip
def test_cross_checks_name_the_key_in_the_sweep_file(space, sweep_spec, target, expected):
    search = SearchSpec.model_validate({"space": space})
    found = check_search(search, sweep_spec.grid, sweep_spec.trials, target)
    assert [key for key, _ in found] == [key for key, _ in expected]
    for (_, message), (_, fragment) in zip(found, expected, strict=True):
        assert fragment in message


def test_objective_outcomes_are_values_or_reasons():
    assert TARGET.outcome({10: 0.5, 20: 0.91, 30: 0.95}, diverged=False) == (20.0, None)
    assert TARGET.outcome({10: 0.95}, diverged=True) == (10.0, None)  # reached, then diverged
    assert TARGET.outcome({10: 0.5}, diverged=True) == (None, "diverged")
    assert TARGET.outcome({10: 0.5, 20: 0.7}, diverged=False) == (
        None,
        "target val/accuracy >= 0.9 not reached (best 0.7)",
    )
    assert TARGET.outcome({}, diverged=False) == (None, "no report of val/accuracy")
    loss = Objective("steps_to_target", "val/loss", "min", 0.3)
    assert loss.outcome({10: 0.5, 20: 0.3}, diverged=False) == (20.0, None)
    ppl = objective_for(
        SearchSpec.model_validate({"space": SPACE}),
        Metric(name="val/perplexity"),
        Target(metric="val/perplexity", value=120),
    )
    assert ppl == Objective("steps_to_target", "val/perplexity", "min", 120)
    assert ppl.outcome({10: 300.0, 20: 119.5, 30: 90.0}, diverged=False) == (20.0, None)
    assert ppl.outcome({10: 300.0}, diverged=False) == (
        None,
        "target val/perplexity <= 120 not reached (best 300)",
    )
    best = Objective("metric", "val/accuracy", "max")
    assert best.direction == "maximize" and TARGET.direction == "minimize"
    assert best.outcome({10: 0.5, 20: 0.8, 30: 0.7}, diverged=False) == (0.8, None)
    assert best.outcome({10: 0.5}, diverged=True) == (None, "diverged")
    assert TARGET.stop("t", {"val/accuracy": 0.9}) and not TARGET.stop("t", {"val/accuracy": None})
    assert not best.stop("t", {"val/accuracy": 1.0})


def test_storage_url_and_dashboard_command(tmp_path):
    storage = study_storage(tmp_path / "my sweep")
    assert storage.url == f"sqlite:///{tmp_path}/my sweep/optuna.db"
    assert storage.dashboard == f"optuna-dashboard 'sqlite:///{tmp_path}/my sweep/optuna.db'"


# ---------------------------------------------------------------------------- The searcher


def test_each_study_asks_its_trials_in_turn_then_finished(tmp_path):
    s = searcher(tmp_path, sampler="random")
    suggestions = [s.suggest(f"t{i}") for i in range(6)]
    assert [c["search"]["point"] for c in suggestions] == [0, 1, 0, 1, 0, 1]
    assert [c["search"]["number"] for c in suggestions] == [0, 0, 1, 1, 2, 2]
    assert [c["search"]["study"] for c in suggestions[:2]] == NAMES
    assert s.suggest("t6") == s.FINISHED
    for i, config in enumerate(suggestions):
        run(s, f"t{i}", config)
    studies = read_studies(tmp_path)
    assert [(r.name, r.point, r.finished) for r in studies] == [
        (NAMES[0], POINTS[0], 3),
        (NAMES[1], POINTS[1], 3),
    ]
    for r, point_configs in zip(studies, (suggestions[0::2], suggestions[1::2]), strict=True):
        for t, config in zip(r.trials, point_configs, strict=True):
            assert t["params"] == {
                "lr.base": config["lr"]["base"],
                "optimizer.momentum": config["optimizer"]["momentum"],
            }
            assert t["ray_trial_id"] == f"t{suggestions.index(config)}"
            rows = reports(config)
            assert t["values"] == {r["step"]: r["val/accuracy"] for r in rows}
            reached = [r["step"] for r in rows if r["val/accuracy"] >= 0.9]
            assert t["value"] == (reached[0] if reached else None)
    # Opened with Optuna's own API, as optuna-dashboard does.
    study = optuna.load_study(study_name=NAMES[1], storage=study_storage(tmp_path).url)
    assert len(study.trials) == 3


def test_a_study_that_finished_asking_leaves_the_machines_to_the_others(tmp_path):
    s = searcher(tmp_path, sampler="random")
    first = [s.suggest(f"t{i}") for i in range(4)]  # 0, 1, 0, 1
    run(s, "t0", first[0])
    run(s, "t2", first[2])
    assert s.suggest("t4")["search"]["point"] == 0  # a tie: the first point
    assert s.suggest("t5")["search"]["point"] == 1
    assert s.suggest("t6") == s.FINISHED


def test_infeasible_trials_fail_with_their_reason_and_errored_ones_wait(tmp_path):
    s = searcher(tmp_path, trials_per_point=5, sampler="random")
    for i in range(5):
        s.suggest(f"t{i}")  # point 0 gets t0, t2, t4
    s.on_trial_result("t0", {"step": 10, "val/accuracy": 0.5})
    s.on_trial_result("t0", {"step": 20, "val/accuracy": None})  # no value: not kept
    s.on_trial_complete("t0", {"step": 30, "val/accuracy": 0.92, "diverged": False})
    s.on_trial_result("t2", {"step": 10, "val/accuracy": 0.5})
    s.on_trial_complete("t2", {"step": 20, "val/accuracy": 0.1, "diverged": True})
    s.on_trial_complete("t4", {"step": 100, "val/accuracy": 0.6, "diverged": False})
    s.on_trial_complete("t1", error=True)  # Ray gave up on it
    s.on_trial_complete("t3")  # stopped before any report
    point0, point1 = read_studies(tmp_path)
    assert [(t["state"], t["value"], t["reason"], t["diverged"]) for t in point0.trials] == [
        ("COMPLETE", 30.0, None, False),
        ("FAIL", None, "diverged", True),
        ("FAIL", None, "target val/accuracy >= 0.9 not reached (best 0.6)", False),
    ]
    assert point0.trials[0]["values"] == {10: 0.5, 30: 0.92}
    assert [(t["state"], t["reason"], t["ray_errors"]) for t in point1.trials] == [
        ("RUNNING", None, 1),
        ("FAIL", "no report of val/accuracy", 0),
    ]
    assert point0.best()["number"] == 0 and point1.best() is None


def test_the_best_trial_breaks_a_tie_of_steps_by_the_value_at_that_step(tmp_path):
    s = searcher(tmp_path, sampler="random")
    for i in range(6):
        s.suggest(f"t{i}")
    for trial_id, accuracy in (("t0", 0.91), ("t2", 0.97), ("t4", 0.93)):
        s.on_trial_complete(trial_id, {"step": 40, "val/accuracy": accuracy})
    assert read_studies(tmp_path)[0].best()["ray_trial_id"] == "t2"


def test_a_suggestion_is_the_points_whole_config_with_the_drawn_values(tmp_path):
    s = searcher(tmp_path)
    assert s.set_search_properties("val/accuracy", "max", {})  # the Tuner's empty param space
    s.suggest("t0")
    suggestion = s.suggest("t1")
    drawn = {"lr.base": suggestion["lr"]["base"], "momentum": suggestion["optimizer"]["momentum"]}
    assert 0.01 <= drawn["lr.base"] <= 10.0 and 0.0 <= drawn["momentum"] <= 0.99
    expected = configs()[1]
    expected["lr"]["base"] = drawn["lr.base"]
    expected["optimizer"]["momentum"] = drawn["momentum"]
    assert suggestion == {**expected, "search": {"study": NAMES[1], "point": 1, "number": 0}}


def test_replayed_reports_and_a_second_completion_change_nothing(tmp_path):
    s = searcher(tmp_path)
    config = s.suggest("t0")
    rows = reports(config)
    for row in rows + rows[:2]:  # a resumed trial sends its reports up to its checkpoint again
        s.on_trial_result("t0", row)
    s.on_trial_complete("t0", rows[-1])
    # Ray ran it again after a restart that lost its end: told once, kept as told.
    s.on_trial_result("t0", {"step": 10, "val/accuracy": 0.99})
    s.on_trial_complete("t0", {"step": 10, "val/accuracy": 0.99})
    (trial,) = [t for t in read_studies(tmp_path)[0].trials]
    assert trial["values"] == {r["step"]: r["val/accuracy"] for r in rows}
    assert trial["state"] in ("COMPLETE", "FAIL")


@pytest.mark.parametrize("sampler", ["qmc", "random"])
def test_a_killed_driver_resumes_each_study_with_the_parameters_of_an_unbroken_run(
    tmp_path, sampler
):
    unbroken = searcher(tmp_path / "unbroken", sampler=sampler)
    suggestions = [unbroken.suggest(f"u{i}") for i in range(6)]
    for i in (5, 2, 0, 3, 1, 4):  # finishing order does not change what a study asks
        run(unbroken, f"u{i}", suggestions[i])
    assert unbroken.suggest("u6") == unbroken.FINISHED

    folder = tmp_path / "killed"
    first = searcher(folder, sampler=sampler)
    pickled = pickle.dumps(first)  # tuner.pkl: written when the Tuner is made
    asked = [first.suggest(f"k{i}") for i in range(5)]
    run(first, "k0", asked[0])
    run(first, "k3", asked[3])
    first.save(str(folder / "searcher-state.pkl"))
    # Ray saved its state when k0..k2 existed; k3 and k4 were asked after it (k3 even finished),
    # then the driver was killed.
    ray_knows(folder, ["k0", "k1", "k2"])
    del first

    second = restored(pickled, folder)
    # k4 is offered again, same trial, same parameters; k3 is done; nothing new is asked first.
    again = second.suggest("r0")
    assert again == asked[4]
    # Ray runs its own unfinished trials again under their ids; k0 was told already.
    run(second, "k0", asked[0])
    for trial_id in ("k1", "k2"):
        run(second, trial_id, asked[int(trial_id[1])])
    run(second, "r0", again)
    last = second.suggest("r1")
    assert last["search"] == {"study": NAMES[1], "point": 1, "number": 2}
    run(second, "r1", last)
    assert second.suggest("r2") == second.FINISHED

    studies = read_studies(folder)
    assert [r.finished for r in studies] == [3, 3]
    assert [t["ray_trial_id"] for t in studies[0].trials] == ["k0", "k2", "r0"]
    assert params_by_trial(folder) == params_by_trial(tmp_path / "unbroken")
    drawn = {json.dumps(p, sort_keys=True) for p in params_by_trial(folder).values()}
    assert len(drawn) == 6  # every trial draws its own values


def test_a_trial_asked_before_its_parameters_landed_is_completed_and_offered(tmp_path):
    s = searcher(tmp_path, sampler="qmc")
    pickled = pickle.dumps(s)
    s.suggest("t0")
    ray_knows(tmp_path, ["t0"])
    # The driver died after Optuna's ask and the first parameter, before the second.
    storage = optuna.storages.RDBStorage(study_storage(tmp_path).url)
    study = optuna.load_study(
        study_name=NAMES[1], storage=storage, sampler=make_sampler(spec(sampler="qmc"), 1, 0)
    )
    study.ask().suggest_float("lr.base", 0.01, 10.0, log=True)
    again = restored(pickled, tmp_path).suggest("t1")
    assert again["search"] == {"study": NAMES[1], "point": 1, "number": 0}
    # It draws what an unbroken run draws for that trial.
    unbroken = searcher(tmp_path / "unbroken", sampler="qmc")
    for i in range(4):
        unbroken.suggest(f"u{i}")
    drawn = params_by_trial(tmp_path)[NAMES[1], 0]
    assert drawn == params_by_trial(tmp_path / "unbroken")[NAMES[1], 0]


def test_qmc_points_are_balanced_over_every_distribution():
    """A scrambled Sobol sequence's first 2^k points put exactly one point in each of 2^k equal
    slices of every coordinate; through the quantile maps: one lr per slice of the log range,
    each integer and each value equally often."""
    space = {
        "lr.base": {"log_uniform": [1e-3, 10.0]},
        "optimizer.momentum": {"uniform": [0.0, 0.8]},
        "seed": {"int": [0, 3]},
        "optimizer.name": {"values": ["sgd", "adam"]},
    }
    search = SearchSpec.model_validate({"space": space, "sampler": "qmc", "seed": 7})
    points = [sobol_point(search, 1, n) for n in range(16)]
    lr_slices = sorted(math.floor((math.log10(p["lr.base"]) + 3) / 4 * 16) for p in points)
    momentum_slices = sorted(math.floor(p["optimizer.momentum"] / 0.8 * 16) for p in points)
    assert lr_slices == momentum_slices == list(range(16))
    assert sorted(p["seed"] for p in points) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert sorted(p["optimizer.name"] for p in points) == ["adam"] * 8 + ["sgd"] * 8
    assert points != [sobol_point(search, 0, n) for n in range(16)]  # each point its own scramble


def test_an_errored_trial_is_run_again_by_ray_on_resume_and_then_told(tmp_path):
    s = searcher(tmp_path, trials_per_point=1)
    pickled = pickle.dumps(s)
    config = s.suggest("t0")
    s.suggest("t1")
    s.on_trial_complete("t0", error=True)
    run(s, "t1", s.configs[1] | {"lr": {"base": 0.3}})
    assert s.suggest("t2") == s.FINISHED  # t0 is asked: no trial replaces it
    ray_knows(tmp_path, ["t0", "t1"])
    again = restored(pickled, tmp_path)
    assert again.suggest("t2") == again.FINISHED
    run(again, "t0", config)
    (trial,) = read_studies(tmp_path)[0].trials
    assert trial["state"] != "RUNNING" and trial["ray_errors"] == 1


def test_studies_of_another_search_or_a_lost_storage_are_refused(tmp_path):
    searcher(tmp_path, sampler="qmc").suggest("t0")
    with pytest.raises(UserError, match="made by another search"):
        searcher(tmp_path, sampler="random").suggest("t0")
    pickled = pickle.dumps(searcher(tmp_path / "lost"))
    with pytest.raises(UserError, match="studies of this sweep are missing"):
        restored(pickled, tmp_path / "lost").suggest("t0")


# ---------------------------------------------------------------------------- Confirmation


def confirmed(tmp_path: Path, **changes) -> StudySearcher:
    """The searcher of two points, 3 trials each, whose best 2 run again on 2 fresh seeds."""
    return searcher(tmp_path, confirm={"top": 2, "seeds": 2}, **changes)


def finish_search(s: StudySearcher, prefix: str = "t") -> list[dict]:
    """Ask every search trial and run each to its end; return their configs."""
    asked = [s.suggest(f"{prefix}{i}") for i in range(6)]
    for i, config in enumerate(asked):
        run(s, f"{prefix}{i}", config)
    return asked


def confirmations(folder: Path) -> dict[str, list[tuple]]:
    """{study: (number, confirmed trial, seed, params, state, value) of each confirmation run}."""
    return {
        r.name: [
            (c["number"], c["confirms"], c["seed"], c["params"], c["state"], c["value"])
            for c in r.confirmations
        ]
        for r in read_studies(folder)
    }


def test_the_best_trials_run_again_on_seeds_the_search_never_used(tmp_path):
    s = confirmed(tmp_path, sampler="qmc")
    search = finish_search(s)
    studies = read_studies(tmp_path)
    runs = [s.suggest(f"c{i}") for i in range(8)]
    assert s.suggest("c8") == s.FINISHED
    # Point by point in turn, the best trial on each seed, then the second best.
    assert [c["search"]["point"] for c in runs] == [0, 1] * 4
    assert [c["search"]["confirm"] for c in runs] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c["seed"] for c in runs] == [1, 1, 2, 2, 1, 1, 2, 2]  # the search used seed 0
    for point, study in enumerate(studies):
        best = ranked(study.trials, TARGET)[:2]
        mine = runs[point::2]
        assert [c["search"]["confirms"] for c in mine] == [best[0]["number"]] * 2 + [
            best[1]["number"]
        ] * 2
        for c in mine:
            config = next(
                x
                for x in search
                if x["search"]
                == {"study": NAMES[point], "point": point, "number": c["search"]["confirms"]}
            )
            assert c == {
                **config,
                "seed": c["seed"],
                "search": {"study": NAMES[point], "point": point,
                           "confirm": c["search"]["confirm"], "confirms": c["search"]["confirms"]},
            }  # fmt: skip
    for i, config in enumerate(runs):
        run(s, f"c{i}", config)
    found = read_studies(tmp_path)
    assert [r.seeds for r in found] == [(1, 2), (1, 2)]
    assert [r.confirmed for r in found] == [
        tuple(t["number"] for t in ranked(r.trials, TARGET)[:2]) for r in studies
    ]
    for r in found:
        assert [c["state"] for c in r.confirmations] == ["COMPLETE"] * 4
        assert r.finished == 3  # the search study keeps its own trials only


def test_a_point_is_confirmed_once_its_search_has_ended(tmp_path):
    s = confirmed(tmp_path, sampler="random")
    asked = [s.suggest(f"t{i}") for i in range(6)]
    for i in (0, 2, 4, 1, 3):  # all of point 0; point 1's last trial still runs
        run(s, f"t{i}", asked[i])
    first = s.suggest("c0")
    assert first["search"]["point"] == 0 and first["search"]["confirm"] == 0
    assert [s.suggest(f"c{i}")["search"]["point"] for i in (1, 2, 3)] == [0, 0, 0]
    assert s.suggest("c4") is None  # point 1 still searches: ask again later, not FINISHED
    run(s, "t5", asked[5])
    assert s.suggest("c5")["search"] == {
        "study": NAMES[1],
        "point": 1,
        "confirm": 0,
        "confirms": ranked(read_studies(tmp_path)[1].trials, TARGET)[0]["number"],
    }


def test_an_errored_trial_is_left_out_of_what_is_confirmed(tmp_path):
    s = confirmed(tmp_path, sampler="random")
    asked = [s.suggest(f"t{i}") for i in range(6)]
    for i, config in enumerate(asked):
        if i == 0:
            s.on_trial_complete("t0", error=True)  # Ray gave up on it: it stays RUNNING
        else:
            run(s, f"t{i}", config)
    runs = [s.suggest(f"c{i}") for i in range(8)]
    assert s.suggest("c8") == s.FINISHED
    assert 0 not in {c["search"]["confirms"] for c in runs if c["search"]["point"] == 0}


def test_a_killed_driver_resumes_the_confirmation_runs_of_an_unbroken_run(tmp_path):
    unbroken = confirmed(tmp_path / "unbroken", sampler="qmc")
    finish_search(unbroken)
    for i, config in enumerate([unbroken.suggest(f"u{i}") for i in range(8)]):
        run(unbroken, f"u{i}", config)

    folder = tmp_path / "killed"
    first = confirmed(folder, sampler="qmc")
    pickled = pickle.dumps(first)
    finish_search(first, "k")
    asked = [first.suggest(f"c{i}") for i in range(5)]
    run(first, "c0", asked[0])
    run(first, "c3", asked[3])
    # Ray saved its state when c0..c2 existed; c3 and c4 came after it; the driver is killed.
    ray_knows(folder, [f"k{i}" for i in range(6)] + ["c0", "c1", "c2"])
    del first

    second = restored(pickled, folder)
    again = second.suggest("r0")
    assert again == asked[4]  # the same run: configuration, seed and number
    for trial_id in ("c1", "c2"):
        run(second, trial_id, asked[int(trial_id[1])])
    run(second, "r0", again)
    rest = [second.suggest(f"r{i}") for i in range(1, 4)]
    assert second.suggest("r4") == second.FINISHED
    for i, config in enumerate(rest, 1):
        run(second, f"r{i}", config)
    assert confirmations(folder) == confirmations(tmp_path / "unbroken")
    assert [len(r.confirmations) for r in read_studies(folder)] == [4, 4]


def test_a_confirmation_study_killed_before_its_plan_is_made_again(tmp_path):
    s = confirmed(tmp_path, sampler="qmc")
    pickled = pickle.dumps(s)
    finish_search(s)
    ray_knows(tmp_path, [f"t{i}" for i in range(6)])
    # The driver died after making the confirmation study, before writing which trials it runs.
    optuna.create_study(
        storage=study_storage(tmp_path).url, study_name=f"confirm:{NAMES[0]}", direction="minimize"
    )
    again = restored(pickled, tmp_path)
    runs = [again.suggest(f"c{i}") for i in range(8)]
    assert again.suggest("c8") == again.FINISHED
    assert sorted(c["search"]["confirm"] for c in runs if c["search"]["point"] == 0) == [0, 1, 2, 3]


def test_confirmation_seeds_follow_every_seed_the_search_can_use():
    plain = spec(confirm={"top": 1, "seeds": 3})
    assert confirmation_seeds(plain, [0, 0]) == [1, 2, 3]
    assert confirmation_seeds(plain, [0, 7, 3]) == [8, 9, 10]  # grid seeds 0, 7 and 3
    searched = spec(confirm={"top": 1, "seeds": 2}, space={**SPACE, "seed": {"int": [0, 9]}})
    assert confirmation_seeds(searched, [0]) == [10, 11]
    listed = spec(confirm={"top": 1, "seeds": 1}, space={**SPACE, "seed": {"values": [4, 2]}})
    assert confirmation_seeds(listed, [0]) == [5]
    assert confirmation_seeds(spec(), [0]) == []


def test_the_trial_count_holds_the_confirmation_runs():
    search = {"space": SPACE, "trials_per_point": 8, "confirm": {"top": 3, "seeds": 2}}
    swept = SweepSpec(name="s", base={"steps": 10}, grid={"batch_size": [16, 64]}, search=search)
    assert (swept.trials_per_point, swept.trial_count) == (14, 28)
    plain = SweepSpec(name="s", base={"steps": 10}, grid={"batch_size": [16, 64]})
    assert plain.trial_count == 2
    with pytest.raises(ValidationError, match="top 9 is more than the 8 trials per point"):
        SearchSpec.model_validate({**search, "confirm": {"top": 9}})


def test_sweeps_made_before_confirm_and_prune_keep_their_digest():
    # The section as written before these keys existed: its dump, and so the sweep's digest
    # and the studies' attrs, are unchanged; a key that is set is written.
    assert spec().dump() == {
        "space": SPACE | {"lr.base": {"log_uniform": [0.01, 10.0]},
                          "optimizer.momentum": {"uniform": [0.0, 0.99]}},
        "trials_per_point": 3, "sampler": "tpe", "seed": 0, "objective": "steps_to_target",
    }  # fmt: skip
    assert spec(prune=False).dump()["prune"] is False
    assert spec(confirm={"top": 1}).dump()["confirm"] == {"top": 1, "seeds": 3}


# ---------------------------------------------------------------------------- Pruning


TOP_2 = {"top": 2, "seeds": 1}


def run_as_ray(s: StudySearcher, trial_id: str, config: dict, cap: int = 100) -> int:
    """One trial as Ray runs it with the searcher's stop condition: each report goes to `stop`
    first, then to on_trial_result unless it stops the trial; the stopping (or last) report
    goes to on_trial_complete. Returns the steps it ran."""
    rows = [{**row, "total_steps": cap} for row in reports(config)]
    for row in rows:
        if s.stop(trial_id, row) or row is rows[-1]:
            s.on_trial_complete(trial_id, row)
            return row["step"]
        s.on_trial_result(trial_id, row)
    raise AssertionError("unreachable")


def test_a_trial_past_the_best_steps_without_the_target_is_pruned(tmp_path):
    s = searcher(tmp_path, trials_per_point=4, sampler="random")
    for i in range(4):
        s.suggest(f"t{i}")  # point 0: t0 and t2
    s.on_trial_complete("t0", {"step": 40, "val/accuracy": 0.92, "total_steps": 100})
    assert not s.stop("t2", {"step": 30, "val/accuracy": 0.5, "total_steps": 100})
    s.on_trial_result("t2", {"step": 30, "val/accuracy": 0.5, "total_steps": 100})
    # At the best's 40 steps without the target: its steps to target are more than 40.
    assert s.stop("t2", {"step": 40, "val/accuracy": 0.6, "total_steps": 100})
    s.on_trial_complete("t2", {"step": 40, "val/accuracy": 0.6, "total_steps": 100})
    # Point 1 has no best yet: nothing is pruned there.
    assert not s.stop("t1", {"step": 90, "val/accuracy": 0.2, "total_steps": 100})
    point0 = read_studies(tmp_path)[0]
    pruned = point0.trials[1]
    assert (pruned["state"], pruned["pruned_at"], pruned["value"]) == ("PRUNED", 40, None)
    assert pruned["values"] == {30: 0.5, 40: 0.6} and pruned["total_steps"] == 100
    assert point0.best()["number"] == 0 and point0.finished == 2


@pytest.mark.parametrize(
    "report",
    [
        {"step": 50, "val/accuracy": 0.95},  # it reached the target: done, not pruned
        {"step": 50, "val/accuracy": None},  # no evaluation at this step
        {"step": 50, "val/accuracy": 0.1, "diverged": True},  # it ends as diverged
        {"step": 100, "val/accuracy": 0.6},  # its last step: it ran to its cap
    ],
    ids=["reached", "no-evaluation", "diverged", "at-its-cap"],
)
def test_what_is_not_pruned(tmp_path, report):
    s = searcher(tmp_path, trials_per_point=2, sampler="random")
    for i in range(4):
        s.suggest(f"t{i}")
    s.on_trial_complete("t0", {"step": 40, "val/accuracy": 0.92, "total_steps": 100})
    report = {**report, "total_steps": 100}
    assert s.stop("t2", report) == (report["val/accuracy"] == 0.95)
    s.on_trial_complete("t2", report)
    assert read_studies(tmp_path)[0].trials[1]["state"] != "PRUNED"


def test_with_confirm_only_what_passes_the_kth_best_is_pruned_and_never_a_confirmation(tmp_path):
    s = searcher(tmp_path, trials_per_point=4, sampler="random", confirm={"top": 2, "seeds": 1})
    for i in range(8):
        s.suggest(f"t{i}")  # point 0: t0, t2, t4, t6
    s.on_trial_complete("t0", {"step": 40, "val/accuracy": 0.92, "total_steps": 100})
    assert not s.stop("t2", {"step": 60, "val/accuracy": 0.6, "total_steps": 100})  # 1 of 2
    s.on_trial_complete("t2", {"step": 70, "val/accuracy": 0.93, "total_steps": 100})
    assert not s.stop("t4", {"step": 60, "val/accuracy": 0.6, "total_steps": 100})
    assert s.stop("t4", {"step": 70, "val/accuracy": 0.6, "total_steps": 100})  # the 2nd best
    s.on_trial_complete("t4", {"step": 70, "val/accuracy": 0.6, "total_steps": 100})
    s.on_trial_complete("t6", {"step": 100, "val/accuracy": 0.6, "total_steps": 100})
    for i in (1, 3, 5, 7):
        s.on_trial_complete(f"t{i}", {"step": 100, "val/accuracy": 0.1, "total_steps": 100})
    c = s.suggest("c0")
    assert c["search"]["confirms"] == 0
    assert not s.stop("c0", {"step": 80, "val/accuracy": 0.5, "total_steps": 100})


def test_prune_false_keeps_every_trial_whole(tmp_path):
    s = searcher(tmp_path, trials_per_point=2, sampler="random", prune=False)
    for i in range(4):
        s.suggest(f"t{i}")
    s.on_trial_complete("t0", {"step": 40, "val/accuracy": 0.92, "total_steps": 100})
    assert not s.stop("t2", {"step": 90, "val/accuracy": 0.5, "total_steps": 100})
    assert s.stop("t2", {"step": 90, "val/accuracy": 0.95, "total_steps": 100})  # the target


def test_pruning_changes_no_best_and_no_confirmation_and_saves_steps(tmp_path):
    """qmc, 8 trials per point, run one after another as Ray would: with and without pruning
    the same parameters, the same best trial, the same confirmed trials; fewer steps."""
    steps, found, pruned = {}, {}, {}
    for prune in (True, False):
        folder = tmp_path / str(prune)
        s = searcher(folder, trials_per_point=8, sampler="qmc", prune=prune, confirm=TOP_2)
        total, i = 0, 0
        while isinstance(config := s.suggest(f"t{i}"), dict):
            total += run_as_ray(s, f"t{i}", config)
            i += 1
        steps[prune] = total
        studies = read_studies(folder)
        found[prune] = [
            ([t["params"] for t in r.trials], r.best()["number"], r.confirmed, [
                (c["confirms"], c["value"]) for c in r.confirmations])
            for r in studies
        ]  # fmt: skip
        pruned[prune] = sum(t["state"] == "PRUNED" for r in studies for t in r.trials)
    assert pruned[False] == 0 < pruned[True]
    assert found[True] == found[False]
    assert steps[True] < steps[False], steps


@pytest.mark.parametrize("last, pruned", [(0.9, False), (0.2, True)])
def test_median_pruning_stops_a_metric_trial_below_the_median(tmp_path, last, pruned):
    best = Objective("metric", "val/accuracy", "max")
    search = spec(objective="metric", trials_per_point=6, sampler="random", prune="median")
    s = StudySearcher(search, POINTS, configs(), tmp_path, best)
    for i in range(12):
        s.suggest(f"t{i}")  # point 0: t0, t2, ..., t10
    for i in (0, 2, 4, 6, 8):  # MedianPruner waits for 5 finished trials
        s.on_trial_result(f"t{i}", {"step": 10, "val/accuracy": 0.5 + i / 100})
        s.on_trial_complete(f"t{i}", {"step": 20, "val/accuracy": 0.8, "total_steps": 20})
    report = {"step": 10, "val/accuracy": last, "total_steps": 20}
    assert s.stop("t10", report) == pruned
    s.on_trial_complete("t10", report)
    trial = read_studies(tmp_path)[0].trials[-1]
    assert (trial["state"], trial["pruned_at"]) == (
        ("PRUNED", 10) if pruned else ("COMPLETE", None)
    )


def test_hyperband_pruning_stops_metric_trials_early(tmp_path):
    best = Objective("metric", "val/accuracy", "max")
    search = spec(objective="metric", trials_per_point=8, sampler="random", prune="hyperband")
    s = StudySearcher(search, POINTS[:1], configs()[:1], tmp_path, best)
    for i in range(8):
        s.suggest(f"t{i}")
        quality = (i * 5 % 8 + 1) / 8  # each trial's accuracy grows at its own rate
        for step in range(1, 31):
            report = {"step": step, "val/accuracy": quality * step / 30, "total_steps": 30}
            if s.stop(f"t{i}", report) or step == 30:
                s.on_trial_complete(f"t{i}", report)
                break
            s.on_trial_result(f"t{i}", report)
    trials = read_studies(tmp_path)[0].trials
    stopped = [t["pruned_at"] for t in trials if t["state"] == "PRUNED"]
    assert stopped and all(step < 30 for step in stopped)


def test_a_median_or_hyperband_pruner_is_for_a_metric_study():
    with pytest.raises(ValidationError, match="median pruning is for objective: metric"):
        spec(prune="median")
    assert spec(prune="hyperband", objective="metric").prune == "hyperband"
    with pytest.raises(ValidationError, match="true, false, median or hyperband"):
        spec(prune="asha")


# ---------------------------------------------------------------------------- Ray Tune


def closed_form_trial(config: dict) -> None:
    """A Ray Tune function trainable that reports `reports(config)`, `delay` s apart, with its
    step budget of 100 (as `run_as_ray`)."""
    from ray import tune

    for row in reports(config):
        time.sleep(config["delay"])
        tune.report({**row, "total_steps": 100})


def tune_sweep(address: str, storage: str, name: str, delay: str, concurrent: str = "0") -> None:
    """Run the 2 x 3 qmc sweep in a Ray Tune experiment, with the searcher's stop condition as
    the runner gives it (`concurrent`: at most that many trials at once, 0: no limit)."""
    import ray
    from ray import tune

    from lbs_tune.cluster import start_ray

    start_ray(address=address)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # for Ray's workers
    base = configs(float(delay))
    search = StudySearcher(spec(sampler="qmc"), POINTS, base, Path(storage, name), TARGET)
    tuner = tune.Tuner(
        closed_form_trial,
        param_space=base[0],
        tune_config=tune.TuneConfig(
            search_alg=search,
            num_samples=6,
            reuse_actors=True,
            max_concurrent_trials=int(concurrent) or None,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, stop=search.stop),
    )
    results = tuner.fit()
    assert not results.errors


@pytest.mark.ray
def test_ray_ends_a_pruned_trial_where_the_searcher_stopped_it(ray_cluster, tmp_path):
    # One trial at a time, the searcher decides as it does when driven by hand (run_as_ray).
    simulated = searcher(tmp_path / "simulated", sampler="qmc")
    i = 0
    while isinstance(config := simulated.suggest(f"s{i}"), dict):
        run_as_ray(simulated, f"s{i}", config)
        i += 1
    tune_sweep(ray_cluster.address, str(tmp_path), "real", "0", concurrent="1")

    def outcomes(folder: Path) -> list[list[tuple]]:
        return [
            [(t["params"], t["state"], t["value"], t["pruned_at"]) for t in r.trials]
            for r in read_studies(folder)
        ]

    assert outcomes(tmp_path / "real") == outcomes(tmp_path / "simulated")
    pruned = [t for r in read_studies(tmp_path / "real") for t in r.trials if t["pruned_at"]]
    assert pruned
    for t in pruned:  # Ray ended the trial at the report that the searcher stopped it at
        (folder,) = (tmp_path / "real").glob(f"*{t['ray_trial_id']}*")
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        assert rows[-1]["step"] == t["pruned_at"] and rows[-1]["val/accuracy"] < 0.9
