"""The readers of a branched sweep (`analysis.branches`, `analysis.figures.local_cbs`) on the
committed tiny one (tests/experiments/quickstart_branch, written by tests/test_branch_sweep.py):
they find in the trials' result files the very branch values, local critical batch sizes and
plan that the sweep's searcher recorded while it ran, and the comparison by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_EXPERIMENTS

from analysis.branches import (
    BRANCH_SCHEMA,
    branch_rows,
    branch_spec,
    branches_json,
    comparison,
    local_sizes,
    steps_saved,
    write_branch_table,
)
from analysis.figures import local_cbs
from analysis.load import export, load
from lbs_tune.branching import batch_at, smoothed
from lbs_tune.experiment import BRANCH_STATE_FILE
from lbs_tune.probes import slots

FOLDER = TINY_EXPERIMENTS / "quickstart_branch"


@pytest.fixture(scope="module")
def results():
    return load(FOLDER, cache=False)  # the committed folder stays as it is: no cache


@pytest.fixture(scope="module")
def state() -> dict:
    return json.loads((FOLDER / BRANCH_STATE_FILE).read_text())


def test_each_branch_is_a_row_with_the_searchers_own_values(results, state):
    rows = branch_rows(results)
    spec = branch_spec(results)
    assert len(rows) == 12 and list(rows[0]) == BRANCH_SCHEMA.names
    assert [(r["point"], r["k"], r["seed"]) for r in rows] == [
        (p, k, s) for p in (0, 1) for k in (1, 2, 4) for s in (0, 1)
    ]
    by_slot = {(s.point, s.k, s.seed): s.index for s in slots(spec) if s.phase == "branch"}
    for r in rows:
        # The values the searcher heard from Ray, smoothed by hand, are the table's.
        heard = state["values"][str(by_slot[(r["point"], r["k"], r["seed"])])]
        values = [heard[step] for step in sorted(heard, key=int)]
        assert len(values) == 4 and r["smoothed_loss"] == smoothed(values, 0.5)
        assert r["final_loss"] == values[-1]
        assert r["batch_size"] == 32 * r["k"] and r["examples"] == 1024
        assert r["steps"] == 1024 // r["batch_size"] and r["lr"] == pytest.approx(0.02 * r["k"])
        assert [r["point_step"], r["point_examples"]] == state["points"][r["point"]][1:]


def test_the_local_critical_batch_sizes_are_the_plans(results, state):
    found = local_sizes(results)
    planned = state["plan"]["local_cbs"]
    assert [p.point for p in found] == [0, 1]
    for p in found:
        mine = planned[str(p.point)]
        assert (p.batch, p.upper, p.per_seed) == (mine["batch"], mine["upper"], mine["per_seed"])
        assert p.low == min(p.per_seed) and p.high == max(p.per_seed)


def test_a_reference_branch_that_errored_half_way_certifies_no_larger_batch(results):
    """Point 0's k = 1 branches (both seeds) cut after 2 of their 4 reports and left in ERROR
    (Ray gave up on them): what they reported is no loss after Δ. Scored on those early
    (higher) losses they let k = 2 pass, and the local CBS doubled from 32 to 64."""
    import pyarrow as pa

    from analysis.tables import Results

    rows = branch_rows(results)
    failed = {r["trial_id"] for r in rows if r["point"] == 0 and r["k"] == 1}
    history = results.history
    ids, steps = history["trial_id"].to_pylist(), history["step"].to_pylist()
    first_two = {t: sorted(s for i, s in zip(ids, steps, strict=True) if i == t)[1] for t in failed}
    keep = [t not in failed or s <= first_two[t] for t, s in zip(ids, steps, strict=True)]
    trials = results.trials
    states = [
        "ERROR" if t in failed else s
        for t, s in zip(trials["trial_id"].to_pylist(), trials["state"].to_pylist(), strict=True)
    ]
    column = trials.schema.get_field_index("state")
    cut = Results(
        trials.set_column(column, "state", pa.array(states)), history.filter(pa.array(keep))
    )
    found = {(r["point"], r["k"], r["seed"]): r["smoothed_loss"] for r in branch_rows(cut)}
    assert [found[(0, 1, seed)] for seed in (0, 1)] == [None, None]
    before = {p.point: (p.batch, p.per_seed) for p in local_sizes(results)}
    after = {p.point: (p.batch, p.per_seed) for p in local_sizes(cut)}
    assert before[0] == (32, [32, 32]) and after[0] == (32, [32, 32])
    assert after[1] == before[1]


def test_the_comparison_by_hand(results, state):
    runs = {r.arm: r for r in comparison(results)}
    assert sorted(runs) == ["large", "schedule", "small"]
    history = results.history.to_pylist()
    trials = {t["branch.arm"]: t["trial_id"] for t in results.trials.to_pylist() if t["branch.arm"]}
    reports = {arm: [h for h in history if h["trial_id"] == i] for arm, i in trials.items()}
    target = reports["small"][-1]["val/loss"]
    for arm, run in runs.items():
        first = next((h["step"] for h in reports[arm] if h["val/loss"] <= target), None)
        assert (run.target, run.steps_to_target) == (target, first)
        assert run.steps == reports[arm][-1]["step"]
    assert runs["small"].batch_sizes == [32]
    schedule = state["plan"]["schedule"]
    assert runs["schedule"].batch_sizes == [b for _, b in schedule]
    assert runs["large"].batch_sizes == [schedule[-1][1]]
    # The schedule arm trained on the plan: each report names the batch of the step just made.
    rows = reports["schedule"]
    for before, row in zip([{"examples": 0}, *rows], rows, strict=False):
        assert row["batch"] == batch_at(tuple(map(tuple, schedule)), row["examples"] - row["batch"])
        assert row["examples"] > before["examples"]
    small = runs["small"].steps_to_target
    saved = steps_saved(list(runs.values()))
    expected = (
        None
        if runs["schedule"].steps_to_target is None
        else 1 - runs["schedule"].steps_to_target / small
    )
    assert saved == [expected]


def test_summary_json_has_the_points_schedule_and_comparison(results, state):
    summary = branches_json(results)
    json.dumps(summary)  # plain JSON
    assert summary["metric"] == "val/loss" and summary["tolerance"] == 0.01
    assert [p["examples"] for p in summary["points"]] == [p[2] for p in state["points"]]
    assert summary["schedule"] == state["plan"]["schedule"]
    assert set(summary["comparison"]["steps_saved"]) == {"schedule", "large"}


def test_export_writes_the_branches_beside_the_tables(results, tmp_path):
    copy = tmp_path / "quickstart_branch"
    shutil.copytree(FOLDER, copy)  # loading writes a cache
    written = export(copy, tmp_path / "out")
    assert [Path(p).name for p in written] == [
        "trials.parquet",
        "history.parquet",
        "branches.parquet",
    ]
    table = pq.read_table(written[-1])
    assert table.schema == BRANCH_SCHEMA
    assert table.to_pylist() == branch_rows(results)
    assert write_branch_table(load(TINY_EXPERIMENTS / "quickstart", cache=False), tmp_path) is None


def test_the_figure_draws_the_probes_the_noise_scale_and_the_schedule(results, state):
    data = local_cbs.extract(results)
    assert data.examples == [p[2] for p in state["points"]]
    assert data.batch == [state["plan"]["local_cbs"][str(i)]["batch"] for i in (0, 1)]
    assert [s.name for s in data.measured] == ["noise/b_simple"]
    assert all(v > 0 for v in data.measured[0].values)
    assert data.schedule == state["plan"]["schedule"]
    assert data.b_crit is None and data.budget == 2880
    names = [trace.name for trace in local_cbs.render(data).data]
    assert names == [
        "local critical batch size (branches; min–max over seeds)",
        "noise/b_simple of the reference run",
        "planned batch schedule",
    ]


def test_the_report_opens_a_branched_sweep_with_its_local_critical_batch_sizes(
    results, state, tmp_path
):
    from analysis.answer import branch_sentence
    from analysis.report import write_report

    branches = branches_json(results)
    sentence = branch_sentence(branches)
    first, last = branches["points"][0], branches["points"][-1]
    assert sentence.startswith(
        f"The local critical batch size is {first['local_cbs']['batch']} at "
        f"{first['examples']:,} examples and {last['local_cbs']['batch']} at"
    )
    for name in ("quickstart_branch", "quickstart"):  # copies: the report caches its tables
        shutil.copytree(TINY_EXPERIMENTS / name, tmp_path / name)
    page = write_report(tmp_path / "quickstart_branch", tmp_path / "b.html").read_text()
    answer = page[page.index('<section id="answer">') : page.index("</section>")]
    assert sentence.replace("'", "&#x27;") in answer and 'id="fig-local-cbs"' in answer
    written = json.loads((tmp_path / "b.summary.json").read_text())
    assert written == json.loads(json.dumps({"format": written["format"], "branches": branches}))
    other = write_report(tmp_path / "quickstart", tmp_path / "q.html").read_text()
    assert not (tmp_path / "q.summary.json").exists()  # a fixed-rule sweep has none
    assert "fig-local-cbs" not in other
    assert branches_json(load(TINY_EXPERIMENTS / "quickstart", cache=False)) is None
