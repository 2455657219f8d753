"""analysis.metrics: every number below is worked out by hand from the small tables in the test."""

from __future__ import annotations

import pyarrow as pa
import pytest

from analysis.metrics import (
    best_configs,
    best_per_batch_size,
    final_and_best,
    perfect_scaling,
    reached_at,
    seed_spread,
    to_target,
)


def history(*trials: tuple[str, list[int], dict[str, list]]) -> pa.Table:
    """Reports of several trials: (trial_id, steps, {column: values})."""
    rows = []
    for trial_id, steps, columns in trials:
        for i, step in enumerate(steps):
            rows.append(
                {"trial_id": trial_id, "step": step} | {k: v[i] for k, v in columns.items()}
            )
    return pa.Table.from_pylist(rows)


def test_to_target_is_the_first_report_that_reaches_it():
    table = history(
        ("a", [10, 20, 30, 40], {"val/accuracy": [0.1, 0.5, 0.4, 0.7], "examples": [1, 2, 3, 4]}),
        ("b", [10, 20, 30], {"val/accuracy": [0.1, None, 0.3], "examples": [5, 6, 7]}),
        ("c", [5, 10], {"val/accuracy": [0.55, 0.2], "examples": [8, 9]}),
    )
    # a reaches 0.5 exactly at step 20 (>= counts), b never, c at its first report.
    assert to_target(table, "val/accuracy", 0.5).to_pylist() == [
        {"trial_id": "a", "step": 20},
        {"trial_id": "b", "step": None},
        {"trial_id": "c", "step": 5},
    ]
    assert to_target(table, "val/accuracy", 0.6, x="examples")["examples"].to_pylist() == [
        4,
        None,
        None,
    ]


def test_to_target_of_a_loss_counts_down():
    table = history(("a", [1, 2, 3, 4], {"val/loss": [1.0, 0.6, None, 0.4]}))
    assert to_target(table, "val/loss", 0.6)["step"].to_pylist() == [2]
    assert to_target(table, "val/loss", 0.5)["step"].to_pylist() == [4]
    assert to_target(table, "val/loss", 0.3)["step"].to_pylist() == [None]
    # A metric without a direction needs one.
    assert to_target(table, "val/loss", 0.9, mode="max")["step"].to_pylist() == [1]
    with pytest.raises(ValueError, match="no natural direction"):
        to_target(history(("a", [1], {"lr": [0.1]})), "lr", 0.1)


def test_final_is_the_last_report_and_best_follows_the_direction():
    table = history(
        (
            "b",
            [1, 2, 3],
            {
                "val/loss": [0.9, 0.5, None],
                "val/accuracy": [0.2, 0.6, 0.4],
                "host": ["x", "x", "y"],
            },
        ),
        ("a", [1], {"val/loss": [0.7], "val/accuracy": [0.3], "host": ["z"]}),
    )
    out = final_and_best(table, ["step", "val/loss", "val/accuracy", "host"])
    assert out.column_names == [
        "trial_id",
        "reports",
        "final/step",
        "final/val/loss",
        "final/val/accuracy",
        "final/host",
        "best/val/loss",
        "best/val/accuracy",
    ]
    b, a = out.to_pylist()
    # b diverged at its last report: its final loss is no value, its best the 0.5 before.
    assert b == {
        "trial_id": "b",
        "reports": 3,
        "final/step": 3,
        "final/val/loss": None,
        "final/val/accuracy": 0.4,
        "final/host": "y",
        "best/val/loss": 0.5,
        "best/val/accuracy": 0.6,
    }
    assert (a["reports"], a["final/val/loss"], a["best/val/accuracy"]) == (1, 0.7, 0.3)


def test_seed_spread_is_median_and_range_with_null_as_worst():
    table = pa.table(
        {
            "batch_size": [32, 32, 32, 64, 64, 128, 128],
            "seed": [0, 1, 2, 0, 1, 0, 1],
            "acc": [0.5, 0.7, None, 0.2, 0.4, None, None],
        }
    )
    spread = seed_spread(table, "acc", ["batch_size"], "max").to_pylist()
    # 32: median of (0.5, 0.7, worst) is 0.5; its low is the worst: no value.
    assert spread[0] == {"batch_size": 32, "median": 0.5, "low": None, "high": 0.7, "seeds": 3}
    assert spread[1] == {
        "batch_size": 64,
        "median": pytest.approx(0.3),
        "low": 0.2,
        "high": 0.4,
        "seeds": 2,
    }
    assert spread[2] == {"batch_size": 128, "median": None, "low": None, "high": None, "seeds": 2}

    steps = pa.table({"rule": ["a", "a", "b", "b"], "steps": [100, None, 40, 60]})
    out = seed_spread(steps, "steps", ["rule"], "min").to_pylist()
    # Never reaching counts as infinitely many steps: (100, never) has no median.
    assert out[0] == {"rule": "a", "median": None, "low": 100.0, "high": None, "seeds": 2}
    assert out[1] == {"rule": "b", "median": 50.0, "low": 40.0, "high": 60.0, "seeds": 2}


def test_a_search_trial_and_its_confirmation_runs_are_one_configuration_over_seeds():
    """Search trial 0 (lr 0.1) scored 0.90 on seed 0; run again on seeds 1 and 2 it scored
    0.50 and 0.52: the configuration's median is 0.52, below trial 1 (lr 0.05, 0.80 on its one
    seed), which is the best. The search's bookkeeping (study, number, confirm) tells runs
    apart, not configurations."""
    trials = pa.table(
        {
            "trial_id": ["s0", "s1", "c1", "c2"],
            "lr.scaling": ["none"] * 4,
            "batch_size": [64] * 4,
            "seed": [0, 0, 1, 2],
            "lr.base": [0.1, 0.05, 0.1, 0.1],
            "search.study": ["batch_size=64"] * 4,
            "search.number": [0, 1, None, None],
            "search.confirm": [None, None, 0, 0],
            "final/val/accuracy": [0.90, 0.80, 0.50, 0.52],
        }
    )
    (best,) = best_configs(trials, "final/val/accuracy", "max").to_pylist()
    assert (best["lr.base"], best["median"], best["seeds"]) == (0.05, 0.80, 1)
    configurations = seed_spread(trials, "final/val/accuracy", ["lr.base"], "max").to_pylist()
    assert sorted((r["lr.base"], r["median"], r["seeds"]) for r in configurations) == [
        (0.05, 0.80, 1),
        (0.1, 0.52, 3),
    ]


def test_best_per_batch_size_picks_the_best_median_of_each_group():
    spread = pa.table(
        {
            "lr.scaling": ["none"] * 6,
            "batch_size": [32, 32, 64, 64, 128, 128],
            "lr.base": [0.1, 0.2, 0.1, 0.2, 0.1, 0.2],
            "median": [0.8, 0.9, 0.7, None, None, None],
        }
    )
    best = best_per_batch_size(spread, "max", ["lr.scaling", "batch_size"]).to_pylist()
    assert [(r["batch_size"], r["lr.base"], r["median"]) for r in best] == [
        (32, 0.2, 0.9),
        (64, 0.1, 0.7),
        (128, 0.1, None),  # no value anywhere: the first row stands for the group
    ]
    fewest = best_per_batch_size(spread, "min", ["batch_size"]).to_pylist()
    assert [(r["batch_size"], r["lr.base"]) for r in fewest] == [(32, 0.1), (64, 0.1), (128, 0.1)]


def test_perfect_scaling_halves_the_steps_per_doubling_from_the_smallest_that_reached():
    assert perfect_scaling([32, 64, 128, 256], [None, 400, 250, None]) == [800, 400, 200, 100]
    assert perfect_scaling([16, 32], [None, None]) == [None, None]
    assert perfect_scaling([], []) == []


def test_reached_at_is_the_steps_to_target_column_of_a_trials_table():
    table = history(
        ("a", [10, 20], {"val/accuracy": [0.4, 0.6]}),
        ("b", [5, 10], {"val/accuracy": [0.7, 0.8]}),
        ("c", [10], {"val/accuracy": [0.1]}),
    )
    # Trials in another order, one without any report.
    trials = pa.table({"trial_id": ["c", "never", "b", "a"]})
    assert reached_at(trials, table, "val/accuracy", 0.5).to_pylist() == [None, None, 5, 20]


def test_final_and_best_of_no_reports_is_an_empty_table():
    empty = pa.table(
        {"trial_id": pa.array([], pa.string()), "val/loss": pa.array([], pa.float64())}
    )
    out = final_and_best(empty, ["val/loss"])
    assert out.column_names == ["trial_id", "reports", "final/val/loss", "best/val/loss"]
    assert out.num_rows == 0


def test_seed_spread_groups_by_several_keys_with_missing_ones_last():
    table = pa.table(
        {
            "rule": ["b", "a", None, "a", "b", None],
            "batch_size": [64, 32, 32, 32, 64, 32],
            "acc": [0.5, 0.1, 0.9, 0.3, 0.7, 0.8],
        }
    )
    spread = seed_spread(table, "acc", ["rule", "batch_size"], "max").to_pylist()
    assert [(r["rule"], r["batch_size"], r["seeds"]) for r in spread] == [
        ("a", 32, 2),
        ("b", 64, 2),
        (None, 32, 2),  # a trial without the key is its own group, sorted last
    ]
    assert [r["median"] for r in spread] == pytest.approx([0.2, 0.6, 0.85])
    assert [(r["low"], r["high"]) for r in spread] == [(0.1, 0.3), (0.5, 0.7), (0.8, 0.9)]
