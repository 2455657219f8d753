"""analysis.report and analysis.figures on the committed real sweeps (tests/experiments: the
tiny quickstart sweep, 12 trials of which the largest linearly scaled LR diverges, and the sweep
with an errored trial), without Ray; and each figure's extractor on small tables made by hand.

The report's HTML is parsed and the figure JSON embedded in it is checked against numbers worked
out here from the trial folders with plain json (`raw_trials`): medians over the two seeds,
steps to the target, the peak learning rates.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HOSTILE, Page, raw_trials, tmpfs, trace

from analysis import load
from analysis import page as page_module
from analysis.answer import (
    FixedAnswer,
    RuleSteps,
    fixed_answer,
    fixed_sentence,
    number,
    scaling_limit,
)
from analysis.figures import (
    evaluation_curves,
    learning_curves,
    learning_rates,
    metric_vs_batch_size,
    parallel_coordinates,
    steps_to_target,
    throughput,
)
from analysis.figures._draw import SERIES_COLOURS, batch_colour, contrast, log_ticks
from analysis.figures.tuned_steps import REGIME_NAMES
from analysis.html import script_json, trial_counts
from analysis.report import STATIC_FORMATS, parse_target, write_report
from analysis.scaling import fit_scaling
from lbs_tune.errors import UserError

FIGURES = [
    "steps-to-target",
    "metric-vs-batch-size",
    "learning-curves",
    "loss-curves",
    "learning-rate",
    "throughput",
    "parallel-coordinates",
]
BATCH_SIZES = [16, 64, 256]
RULES = ["linear", "none"]
TARGET = 0.3


def spread(values: list[float | None], mode: str) -> tuple:
    """(median, low, high) as the report computes them over seeds: a missing value is the
    worst one, and a statistic that lands on it is None."""
    worst = -math.inf if mode == "max" else math.inf
    filled = [worst if v is None else v for v in values]
    stats = (statistics.median(filled), min(filled), max(filled))
    return tuple(None if math.isinf(v) else v for v in stats)


def by_config(experiment: Path, value) -> dict[tuple[str, int], list]:
    """`value(trial)` of every trial, grouped by (LR rule, batch size) in seed order."""
    grouped: dict[tuple[str, int], list] = {}
    for t in sorted(raw_trials(experiment), key=lambda t: t.key):
        grouped.setdefault((t.key[1], t.key[0]), []).append(value(t))
    return grouped


def first_step(trial, metric: str, target: float) -> int | None:
    """The first step whose `metric` reaches `target` (from below for accuracies)."""
    sign = 1 if metric.endswith("accuracy") else -1
    values = [(r["step"], r[metric]) for r in trial.reports]
    return next((s for s, v in values if v is not None and sign * (v - target) >= 0), None)


def expected_steps_to_target(experiment: Path, metric: str, target: float) -> dict[str, list]:
    """Per rule, (median, low, high) per batch size of the first step that reaches the target."""
    steps = by_config(experiment, lambda t: first_step(t, metric, target))
    return {rule: [spread(steps[(rule, b)], "min") for b in BATCH_SIZES] for rule in RULES}


def table_rows(text: str) -> list[dict[str, str]]:
    """The report's trial table: per row, the sort value (data-v) of each cell by header."""
    body = text[text.index('<table class="sortable">') :]
    header = re.findall(r"<th>(.*?)</th>", body)
    rows = re.findall(r"<tr>(<td.*?)</tr>", body)
    return [dict(zip(header, re.findall(r'data-v="(.*?)"', row), strict=True)) for row in rows]


def diverged_trials(experiment: Path) -> list:
    """The trials that diverged, in trial-id order; the tiny quickstart sweep has some."""
    found = [t for t in raw_trials(experiment) if t.reports[-1]["diverged"]]
    assert found, "the committed quickstart sweep should have a diverged trial"
    return found


def counts_line(experiment: Path) -> str:
    """The report's outcome counts of a sweep whose trials have all ended, from plain json."""
    raw = raw_trials(experiment)
    errored = sum(t.state == "ERROR" for t in raw)
    diverged = sum(t.state != "ERROR" and t.reports[-1]["diverged"] for t in raw if t.reports)
    finished = len(raw) - errored - diverged
    return (
        f"{len(raw)} trials: {finished} finished, {diverged} diverged, {errored} errored, "
        "0 running or pending"
    )


@pytest.fixture(scope="module")
def page(tiny_quickstart, tmp_path_factory) -> tuple[Path, Page]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    path = write_report(tiny_quickstart, out=out)
    return path, Page(path.read_text())


@pytest.fixture(scope="module")
def broken_page(tiny_broken, tmp_path_factory) -> tuple[Path, Page]:
    out = tmp_path_factory.mktemp("broken-report") / "report.html"
    path = write_report(tiny_broken, out=out)
    return path, Page(path.read_text())


# ============================================================================ The page


def test_the_page_is_self_contained_with_plotly_inlined_once(page, tiny_quickstart):
    path, parsed = page
    text = path.read_text()
    assert text.count("plotly.js v") == 1
    assert not any("src" in a for a, _ in parsed.scripts)  # nothing to fetch: works offline
    embedded = [a["id"] for a, _ in parsed.scripts if a.get("type") == "application/json"]
    assert embedded == [f"fig-{name}" for name in FIGURES]
    for name in FIGURES:
        assert f'<div class="plot" id="plot-{name}"></div>' in text
    header = " ".join(parsed.text)
    assert counts_line(tiny_quickstart) in header
    record = json.loads((tiny_quickstart / "lbs_sweep.json").read_text())
    assert record["git_commit"] in header and record["started"] in header
    assert f"val/accuracy ≥ {TARGET}" in header


def test_config_values_cannot_inject_markup(page):
    path, parsed = page
    text = path.read_text()
    # plotly.js, the loader, one JSON block per figure: nothing else is a script.
    assert len(parsed.scripts) == 2 + len(FIGURES)
    assert all(a == {} or a.get("type") == "application/json" for a, _ in parsed.scripts)
    shown = "".join(parsed.text)
    assert f"quickstart, tiny {HOSTILE}" in shown  # the description, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)" not in text


def test_an_error_message_cannot_inject_markup(broken_page, tiny_broken):
    path, parsed = broken_page
    text = path.read_text()
    assert "<script>alert(1)" not in text
    assert all(a == {} or a.get("type") == "application/json" for a, _ in parsed.scripts)
    (failed,) = [t for t in raw_trials(tiny_broken) if t.state == "ERROR"]
    message = (failed.folder / "error.txt").read_text().strip().splitlines()[-1]
    assert HOSTILE in message and message in parsed.text  # the error cell, as text
    assert (
        counts_line(tiny_broken)
        == "2 trials: 1 finished, 0 diverged, 1 errored, 0 running or pending"
    )
    assert counts_line(tiny_broken) in parsed.text


def test_embedded_json_cannot_close_its_script_element():
    hostile = {"name": "</script><script>alert(1)</script>", "b": "a & b > c"}
    text = script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


def test_the_trial_table_lists_every_trial_with_its_steps_to_target(page, tiny_quickstart):
    path, _ = page
    text = path.read_text()
    assert '<table class="sortable">' in text and "function sortBy" in text
    # Several batch sizes: the x axis, and the table's steps to target, default to examples.
    column = f"examples to reach val/accuracy ≥ {TARGET}"
    rows = {row["trial_id"]: row for row in table_rows(text)}
    raw = raw_trials(tiny_quickstart)
    assert sorted(rows) == [t.trial_id for t in raw]
    for t in raw:
        step = first_step(t, "val/accuracy", TARGET)
        assert rows[t.trial_id][column] == ("" if step is None else str(step * t.key[0]))
        assert rows[t.trial_id]["reports"] == str(len(t.reports))
    diverged = {t.trial_id for t in diverged_trials(tiny_quickstart)}
    assert {i for i, row in rows.items() if row["diverged"] == "1"} == diverged


# ============================================================================ Figure data


def test_steps_to_target_per_batch_size_and_the_perfect_scaling_line(page, tiny_quickstart):
    figure = page[1].figure("steps-to-target")
    expected = expected_steps_to_target(tiny_quickstart, "val/accuracy", TARGET)
    reached = [m for stats in expected.values() for m, _, _ in stats if m is not None]
    assert len(reached) >= 3, "the tiny sweep should reach its target at several batch sizes"
    fewest = {}
    for rule in RULES:
        line = trace(figure, rule)
        medians = [m for m, _, _ in expected[rule]]
        assert line["x"] == BATCH_SIZES and line["y"] == medians
        above = [None if None in (m, h) else h - m for m, _, h in expected[rule]]
        below = [None if None in (m, lo) else m - lo for m, lo, _ in expected[rule]]
        assert line["error_y"]["array"] == above and line["error_y"]["arrayminus"] == below
        for b, m in zip(BATCH_SIZES, medians, strict=True):
            if m is not None:
                fewest[b] = min(m, fewest.get(b, m))
    anchor = min(fewest)
    reference = trace(figure, "perfect scaling (steps ∝ 1/B)")
    assert reference["y"] == pytest.approx([fewest[anchor] * anchor / b for b in BATCH_SIZES])
    assert figure["layout"]["xaxis"]["type"] == "log" and figure["layout"]["yaxis"]["type"] == "log"
    assert figure["layout"]["yaxis"]["title"]["text"] == "steps"


def test_final_and_best_metric_against_batch_size(page, tiny_quickstart):
    figure = page[1].figure("metric-vs-batch-size")
    for kind, axis, value in (
        ("final", "x", lambda t: t.reports[-1]["val/accuracy"]),
        ("best", "x2", lambda t: max(r["val/accuracy"] for r in t.reports)),
    ):
        values = by_config(tiny_quickstart, value)
        for rule in RULES:
            medians = [spread(values[(rule, b)], "max")[0] for b in BATCH_SIZES]
            assert trace(figure, rule, axis)["y"] == pytest.approx(medians), (kind, rule)
        hit = diverged_trials(tiny_quickstart)
        diverged = trace(figure, "diverged", axis)
        assert diverged["x"] == [t.key[0] for t in hit]
        assert diverged["y"] == [value(t) for t in hit]
    assert figure["layout"]["yaxis"]["title"]["text"] == "val/accuracy"
    assert figure["layout"]["xaxis"]["tickvals"] == BATCH_SIZES


def test_learning_curves_are_medians_over_seeds_per_batch_size_and_rule(page, tiny_quickstart):
    figure = page[1].figure("learning-curves")
    reports = by_config(tiny_quickstart, lambda t: {r["step"]: r for r in t.reports})
    # Panels in rule order: linear (x), none (x2); examples across (batch sizes differ).
    for rule, axis in zip(RULES, ["x", "x2"], strict=True):
        for b in BATCH_SIZES:
            seeds = reports[(rule, b)]
            steps = sorted(set().union(*seeds))
            stats = [
                spread([s[step]["val/accuracy"] for s in seeds if step in s], "max")
                for step in steps
            ]
            median = trace(figure, f"B={b}", axis)
            assert median["x"] == [step * b for step in steps]
            assert median["y"] == pytest.approx([m for m, _, _ in stats])
            band = trace(figure, f"B={b} min–max", axis)
            highs, lows = [h for _, _, h in stats], [lo for _, lo, _ in stats]
            assert band["y"] == pytest.approx(highs + lows[::-1])
            assert band["mode"] == "lines"  # a band, not the corners of one as markers
    layout = figure["layout"]
    assert layout["xaxis"]["title"]["text"] == "examples"
    assert layout["yaxis"]["title"]["text"] == "val/accuracy"
    assert "(median and min–max over 2 seeds)" in layout["title"]["text"]
    assert [a["text"] for a in layout["annotations"]] == [
        "lr.scaling = linear",
        "lr.scaling = none",
    ]
    loss = page[1].figure("loss-curves")
    assert loss["layout"]["yaxis"]["title"]["text"] == "train/loss"


def test_learning_rate_throughput_and_parallel_coordinates(page, tiny_quickstart):
    raw = raw_trials(tiny_quickstart)
    rates = page[1].figure("learning-rate")
    for rule in RULES:
        # The peak LR from the config is the LR the trials reported: 0.1 x B/16 when linear.
        reported = sorted(
            (t.key[0], max(r["lr"] for r in t.reports)) for t in raw if t.key[1] == rule
        )
        points = sorted(zip(trace(rates, rule)["x"], trace(rates, rule)["y"], strict=True))
        assert [b for b, _ in points] == [b for b, _ in reported]
        assert [lr for _, lr in points] == pytest.approx([lr for _, lr in reported])
    assert trace(rates, "linear")["y"].count(pytest.approx(1.6)) == 2
    hit = diverged_trials(tiny_quickstart)
    assert trace(rates, "diverged")["y"] == [pytest.approx(t.reports[-1]["peak_lr"]) for t in hit]

    speed = page[1].figure("throughput")
    for rule in RULES:
        wall = sorted(t.reports[-1]["time_s"] for t in raw if t.key[1] == rule)
        assert sorted(trace(speed, rule)["y"]) == wall

    parallel = page[1].figure("parallel-coordinates")["data"][0]
    labels = [d["label"] for d in parallel["dimensions"]]
    assert labels == ["lr.scaling", "batch_size (log)"]  # the seed is no axis
    assert parallel["dimensions"][1]["ticktext"] == ["16", "64", "256"]
    finals = sorted(t.reports[-1]["val/accuracy"] for t in raw)
    assert sorted(parallel["line"]["color"]) == finals
    assert parallel["line"]["colorbar"]["title"]["text"] == "final val/accuracy"


# ============================================================================ Options


def test_a_target_and_x_axis_given_on_the_command_line_win(tiny_quickstart, tmp_path):
    path = write_report(
        tiny_quickstart,
        out=tmp_path / "r.html",
        target=parse_target("val/loss=1.8"),
        x="step",  # over the default of examples (the batch sizes differ)
    )
    parsed = Page(path.read_text())
    figure = parsed.figure("steps-to-target")
    expected = expected_steps_to_target(tiny_quickstart, "val/loss", 1.8)
    assert any(m is not None for m, _, _ in expected["none"])
    assert trace(figure, "none")["y"] == [m for m, _, _ in expected["none"]]
    assert "val/loss ≤ 1.8" in figure["layout"]["title"]["text"]
    curves = parsed.figure("learning-curves")["layout"]["xaxis"]
    # Steps differ by the ratio of the batch sizes: a log axis.
    assert (curves["title"]["text"], curves["type"]) == ("steps", "log")
    assert "<th>step to reach val/loss ≤ 1.8</th>" in path.read_text()


@pytest.fixture
def copy(tiny_quickstart, tmp_path) -> Path:
    target = tmp_path / "quickstart"
    shutil.copytree(tiny_quickstart, target, ignore=shutil.ignore_patterns(".lbs*"))
    return target


def test_a_running_sweep_gets_a_report_of_what_is_there(copy):
    record = json.loads((copy / "lbs_sweep.json").read_text())
    record["ended"] = None
    del record["spec"]["target"]
    (copy / "lbs_sweep.json").write_text(json.dumps(record))
    path = raw_trials(copy)[0].folder / "result.json"
    with path.open("ab") as f:
        f.write(b'{"step": 400, "val/acc')
    with pytest.warns(UserWarning, match="incomplete"):
        written = write_report(copy)
    assert written == copy / "report.html"
    parsed = Page(written.read_text())
    assert "running (not ended)" in parsed.text
    ids = [a.get("id") for a, _ in parsed.scripts]
    assert "fig-steps-to-target" not in ids and "fig-learning-curves" in ids


# kaleido (and the Chrome it drives) is no dependency of lbs-tune: absent from its environment.
KALEIDO = importlib.util.find_spec("kaleido") is not None


@pytest.mark.skipif(KALEIDO, reason="kaleido is installed: the next test checks its files")
def test_static_figures_without_kaleido_is_one_line_naming_what_to_install(
    cli, tiny_quickstart, tmp_path
):
    html, static = tmp_path / "r.html", tmp_path / "static"
    code, out, err = cli("report", tiny_quickstart, "-o", html, "--static", static)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and f"--static {static}: " in err
    assert "pip install kaleido" in err and "plotly_get_chrome" in err
    assert not html.exists() and not static.exists()  # refused before anything is written


@pytest.mark.skipif(not KALEIDO, reason="kaleido is not installed (no dependency of lbs-tune)")
def test_static_figures_with_kaleido_are_written_or_chrome_is_named(cli, tiny_quickstart, tmp_path):
    html, static = tmp_path / "r.html", tmp_path / "static"
    code, _, err = cli("report", tiny_quickstart, "-o", html, "--static", static)
    written = sorted(p.name for p in static.glob("*")) if static.exists() else []
    assert html.exists()
    if code:  # kaleido without a Chrome to drive: one line says what to install
        assert code == 2 and err.count("\n") == 1 and "plotly_get_chrome" in err
        assert written == []
    else:
        assert written == sorted(f"{n}.{f}" for n in FIGURES for f in STATIC_FORMATS)
        assert all((static / name).stat().st_size > 0 for name in written)


def test_trial_counts_and_target_parsing(tiny_quickstart, tiny_broken):
    trials, _ = load(tiny_quickstart)
    diverged = len(diverged_trials(tiny_quickstart))
    assert trial_counts(trials) == {
        "finished": 12 - diverged,
        "diverged": diverged,
        "errored": 0,
        "running or pending": 0,
    }
    trials, _ = load(tiny_broken)
    assert trial_counts(trials) == {
        "finished": 1,
        "diverged": 0,
        "errored": 1,
        "running or pending": 0,
    }
    assert parse_target("val/accuracy=0.7") == ("val/accuracy", 0.7)
    for bad in ("val/accuracy", "val/accuracy=high", "val/acuracy=0.7"):
        with pytest.raises(UserError, match="--target"):
            parse_target(bad)


def test_a_copy_without_the_sweep_record_still_reports(tiny_quickstart, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(
        tiny_quickstart, folder, ignore=shutil.ignore_patterns("lbs_sweep.json", ".lbs*")
    )
    parsed = Page(write_report(folder, target=("val/accuracy", TARGET)).read_text())
    expected = expected_steps_to_target(tiny_quickstart, "val/accuracy", TARGET)
    line = trace(parsed.figure("steps-to-target"), "linear")
    assert line["y"] == [m for m, _, _ in expected["linear"]]


# ============================================================================ A searched sweep


def searched_sweep():
    """Batch size 32 and 64 x lr.base 0.1 and 0.2 x 2 seeds, two reports each, made by hand.

    Final val/accuracy by (B, lr.base): (32, 0.1) 0.80/0.82, (32, 0.2) 0.85/0.87 (best at 32),
    (64, 0.1) 0.78/0.80 (best at 64), (64, 0.2) 0.30/0.40; the first report is 0.3 lower.
    """
    finals = {(32, 0.1): (0.80, 0.82), (32, 0.2): (0.85, 0.87), (64, 0.1): (0.78, 0.80)}
    finals[(64, 0.2)] = (0.30, 0.40)
    trials, reports = [], []
    for (batch, base), values in finals.items():
        for seed, final in enumerate(values):
            trial_id = f"t{batch}-{base}-{seed}"
            trials.append(
                {
                    "trial_id": trial_id,
                    "state": "TERMINATED",
                    "diverged": False,
                    "batch_size": batch,
                    "lr.base": base,
                    "seed": seed,
                    "final/val/accuracy": final,
                }
            )
            for step, value in ((320 // batch, final - 0.3), (640 // batch, final)):
                reports.append({"trial_id": trial_id, "step": step, "val/accuracy": value})
    return pa.Table.from_pylist(trials), pa.Table.from_pylist(reports)


def test_a_searched_sweep_shows_the_best_lr_per_batch_size():
    trials, history = searched_sweep()
    final = metric_vs_batch_size.extract(trials, "val/accuracy")
    (line,) = final.lines
    # No lr.scaling key: the TrialConfig default rule, "none".
    assert (line.panel, line.name, line.batch_sizes) == ("final", "none", [32, 64])
    assert line.median == pytest.approx([0.86, 0.79])
    assert (line.low, line.high) == ([0.85, 0.78], [0.87, 0.80])

    curves = learning_curves.extract(trials, history, "val/accuracy")
    assert [(c.batch_size, c.x) for c in curves.curves] == [(32, [10, 20]), (64, [5, 10])]
    assert curves.curves[0].median == pytest.approx([0.56, 0.86])  # lr.base 0.2 at B=32
    assert curves.curves[1].median == pytest.approx([0.49, 0.79])  # lr.base 0.1 at B=64

    # To 0.5: both configs at B=32 at step 10; at B=64 lr.base 0.1 at steps 10 and 5.
    steps = steps_to_target.extract(trials, history, "val/accuracy", 0.5)
    (line,) = steps.lines
    assert (line.median, line.low, line.high) == ([10, 7.5], [10, 5], [10, 10])
    assert steps.reference.median == [10, 5]

    parallel = parallel_coordinates.extract(trials, "val/accuracy")
    # One rule (no axis of one value), no seed axis.
    assert [d.label for d in parallel.dimensions] == ["batch_size", "lr.base"]  # < 10x: linear
    assert parallel.dimensions[1].values == [0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.2, 0.2]


def two_rules() -> tuple[pa.Table, pa.Table]:
    """Made by hand: rule none at B=32 (seeds 0 and 1), rule linear at B=64 (seed 0 diverged
    at its only report, seed 1 crashed before reporting)."""
    trials = pa.Table.from_pylist(
        [
            {"trial_id": "n0", "state": "TERMINATED", "diverged": False, "lr.scaling": "none"}
            | {"batch_size": 32, "seed": 0, "final/peak_lr": 0.1, "final/time_s": 10.0},
            {"trial_id": "n1", "state": "TERMINATED", "diverged": False, "lr.scaling": "none"}
            | {"batch_size": 32, "seed": 1, "final/peak_lr": 0.1, "final/time_s": 12.0},
            {"trial_id": "l0", "state": "TERMINATED", "diverged": True, "lr.scaling": "linear"}
            | {"batch_size": 64, "seed": 0, "final/peak_lr": 0.2, "final/time_s": 3.0},
            {"trial_id": "l1", "state": "ERROR", "diverged": False, "lr.scaling": "linear"}
            | {"batch_size": 64, "seed": 1, "final/peak_lr": None, "final/time_s": None},
        ]
    )
    history = pa.Table.from_pylist(
        [
            # Warm-up: the first report's LR is below the peak.
            {"trial_id": "n0", "step": 5, "lr": 0.05, "images_per_s": 100.0},
            {"trial_id": "n0", "step": 10, "lr": 0.1, "images_per_s": 300.0},
            {"trial_id": "n1", "step": 5, "lr": 0.05, "images_per_s": 200.0},
            {"trial_id": "n1", "step": 10, "lr": 0.1, "images_per_s": None},
            {"trial_id": "l0", "step": 3, "lr": 0.2, "images_per_s": 400.0},
        ]
    )
    return trials, history


def test_learning_rates_are_the_reported_peaks_and_the_diverged_are_marked():
    trials, history = two_rules()
    data = learning_rates.extract(trials, history)
    # The errored trial (a crash is no result) is left out; rules in name order.
    assert data.points == [
        learning_rates.Points("", "linear", [64], [0.2], ["l0"]),
        learning_rates.Points("", "none", [32, 32], [0.1, 0.1], ["n0", "n1"]),
    ]
    assert data.diverged == learning_rates.Points("", "diverged", [64], [0.2], ["l0"])
    # An experiment from before `peak_lr` was reported: the largest LR each trial reported.
    older = learning_rates.extract(trials.drop_columns(["final/peak_lr"]), history)
    assert [p.y for p in older.points] == [[0.2], [0.1, 0.1]]


def test_throughput_is_the_wall_time_and_the_mean_speed_per_trial():
    trials, history = two_rules()
    data = throughput.extract(trials, history)
    found = {(p.panel, p.name): (p.x, p.y) for p in data.points}
    assert found == {
        ("time_s", "linear"): ([64], [3.0]),
        ("time_s", "none"): ([32, 32], [10.0, 12.0]),
        ("images_per_s", "linear"): ([64], [400.0]),
        # n0: (100 + 300) / 2; n1's second report has no speed, its first is 200.
        ("images_per_s", "none"): ([32, 32], [200.0, 200.0]),
    }


def test_evaluation_curves_turn_the_rows_per_split_into_curves():
    trials, _ = two_rules()
    rows = [
        ("n0", 10, "val", 1.2, 0.4),
        ("n1", 10, "val", 1.0, 0.6),
        ("n0", 10, "train", 0.9, 0.7),
        ("n1", 10, "train", 0.7, 0.9),
        ("n0", 20, "train", 0.5, 0.8),
        ("l0", 3, "val", None, 0.1),  # a diverged checkpoint: its loss is not finite
    ]
    names = ["trial_id", "step", "split", "loss", "accuracy"]
    evaluation = pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows])
    data = evaluation_curves.extract(trials, evaluation)
    assert data.splits == ["train", "val"]  # train, val, test order, whatever the rows' order
    assert [c.metric for c in data.curves] == [
        "train/loss",
        "val/loss",
        "train/accuracy",
        "val/accuracy",
    ]
    train_loss = {(c.panel, c.batch_size): c for c in data.curves[0].curves}
    # B=32 at step 10: median of 0.9 and 0.7; at step 20 only n0 has a checkpoint.
    assert train_loss[("none", 32)].x == [10, 20]
    assert train_loss[("none", 32)].median == pytest.approx([0.8, 0.5])
    assert train_loss[("none", 32)].low == pytest.approx([0.7, 0.5])
    (diverged,) = [c for c in data.curves[1].curves if c.panel == "linear"]
    assert (diverged.x, diverged.median) == ([3], [None])  # a loss that is no number: worst
    val_accuracy = {(c.panel, c.batch_size): c for c in data.curves[3].curves}
    assert val_accuracy[("linear", 64)].median == [0.1]
    # n0's step 20 was evaluated on train only: on val it has no value there.
    assert val_accuracy[("none", 32)].x == [10, 20]
    assert val_accuracy[("none", 32)].median == [pytest.approx(0.5), None]


def test_the_diverged_are_marked_against_batch_size_and_crashes_left_out():
    trials, _ = two_rules()
    trials = trials.append_column("final/val/loss", pa.array([0.5, 0.7, None, None]))
    data = metric_vs_batch_size.extract(trials, "val/loss")
    # No best/ column in this table: the final panel only. A diverged loss has no value: its
    # median is the worst there is, shown as none.
    assert data.lines == [
        metric_vs_batch_size.Line("final", "linear", [64], [None], [None], [None]),
        metric_vs_batch_size.Line("final", "none", [32], [0.6], [0.5], [0.7]),
    ]
    assert data.diverged == [metric_vs_batch_size.Points("final", "diverged", [64], [None], ["l0"])]


def test_parallel_coordinates_put_wide_ranges_on_a_log_axis_and_text_in_categories():
    wide = parallel_coordinates.dimension("lr.base", [0.01, 0.1, 0.1])
    assert wide.values == pytest.approx([-2, -1, -1])
    assert (wide.tickvals, wide.ticktext) == (pytest.approx([-2, -1]), ["0.01", "0.1"])
    assert wide.label == "lr.base (log)"
    # A log-uniform key is drawn on a log axis whatever its range; a uniform one on a linear.
    assert parallel_coordinates.dimension("lr.base", [0.2, 0.3], log=True).label.endswith("(log)")
    assert parallel_coordinates.dimension("m", [1, 100], log=False).tickvals is None
    narrow = parallel_coordinates.dimension("batch_size", [32, 64])
    assert narrow == parallel_coordinates.Dimension("batch_size", [32.0, 64.0], None, None)
    rules = parallel_coordinates.dimension("lr.scaling", ["none", "linear", "none"])
    assert rules == parallel_coordinates.Dimension(
        "lr.scaling", [1.0, 0.0, 1.0], [0, 1], ["linear", "none"]
    )


# ============================================================================ A tuned sweep


# A tuned quickstart made by hand (sweeps/quickstart_tuned.yaml at 4 batch sizes, 4 trials per
# point): the real searcher writes the studies; trial folders as Ray writes them. A trial at
# batch B with rate lr reaches val/accuracy 0.5 after S(B) (1 + ln(lr / lr*(B))^2 / 2) steps,
# S(B) = 20 (1 + 200 / B) and lr*(B) = 0.02 sqrt(B / 16), unless lr > 6 lr*(B) (it diverges at
# its 5th report) or its budget of 10 epochs of 7200 examples ends first.
TUNED_SIZES = [16, 64, 256, 1024]
TRAIN_EXAMPLES = 7200
TUNED_SPEC = {
    "name": "quickstart_tuned",
    "description": f"MNIST-1D MLP, tuned {HOSTILE} \u202eevil",
    "base": {
        "dataset": "mnist1d",
        "data": {"samples": 10000},
        "model": "mlp",
        "batch_size": 16,
        "seed": 0,
        "epochs": 10,
        "eval_every": 0.05,
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True},
        "lr": {"base": 0.01, "base_batch_size": 16, "scaling": "none"},
        "device": "cpu",
    },
    "grid": {"batch_size": TUNED_SIZES},
    "search": {
        "space": {
            "lr.base": {"log_uniform": [0.003, 1.0]},
            "optimizer.momentum": {"uniform": [0.8, 0.95]},
        },
        "trials_per_point": 4,
        "sampler": "qmc",
        "seed": 0,
        "objective": "steps_to_target",
    },
    "metric": {"name": "val/accuracy", "mode": "max"},
    "target": {"metric": "val/accuracy", "value": 0.5},
}


def toy_steps(batch: int, lr: float) -> float | None:
    """The steps the toy trial needs to reach the target (None: it diverges)."""
    best = 0.02 * math.sqrt(batch / 16)
    if lr > 6 * best:
        return None
    return 20 * (1 + 200 / batch) * (1 + math.log(lr / best) ** 2 / 2)


def toy_reports(config: dict) -> list[dict]:
    """The reports of one toy trial, to the first that reaches the target (the study's stop)."""
    batch, lr = config["batch_size"], config["lr"]["base"]
    cap = round(10 * TRAIN_EXAMPLES / batch)
    every = max(1, round(0.05 * TRAIN_EXAMPLES / batch))
    needed = toy_steps(batch, lr)
    reports = []
    for step in range(every, cap + 1, every):
        diverged = needed is None and len(reports) == 4
        share = 0.0 if needed is None else min(step / needed, 2.0)
        accuracy = 0.1 + 0.4 * share**0.7
        speed = 4000.0 * math.sqrt(batch / 16)
        reports.append(
            {
                "step": step,
                "epoch": step * batch / TRAIN_EXAMPLES,
                "examples": step * batch,
                "total_steps": cap,
                "lr": lr,
                "peak_lr": lr,
                "train/loss": None if diverged else 2.3 - 1.5 * (accuracy - 0.1),
                "val/accuracy": 0.1 if diverged else accuracy,
                "images_per_s": speed,
                "time_s": step * batch / speed,
                "diverged": diverged,
            }
        )
        if diverged or accuracy >= 0.5:
            break
    return reports


def tuned_experiment(folder: Path) -> Path:
    """Write the tuned toy experiment (see TUNED_SPEC, `toy_reports`) into `folder`: the
    studies through the real searcher (driven as Ray Tune drives it, no cluster), each trial's
    params.json and result.json, Ray's experiment state and the sweep record."""
    from lbs_tune.searcher import StudySearcher
    from lbs_tune.studies import objective_for
    from lbs_tune.sweep import SweepSpec

    spec = SweepSpec.model_validate(TUNED_SPEC)
    folder.mkdir(parents=True)
    configs = [t.model_dump(mode="json") for t in spec.trials]
    objective = objective_for(spec.search, spec.metric, spec.target)
    searcher = StudySearcher(spec.search, spec.points(), configs, folder, objective)
    states = []
    for index in range(spec.trial_count):
        trial_id = f"toy_{index:05d}"
        config = searcher.suggest(trial_id)
        reports = toy_reports(config)
        logdir = f"train_trial_{trial_id}_{index}"
        (folder / logdir).mkdir()
        (folder / logdir / "params.json").write_text(json.dumps(config))
        lines = []
        for i, report in enumerate(reports, start=1):
            row = {**report, "trial_id": trial_id, "training_iteration": i}
            lines.append(json.dumps(row | {"timestamp": 1_800_000_000 + i, "device": "cpu"}))
        # The last report decides the outcome (the first at the target, or the budget's end with
        # accuracy rising all along): the searcher is told it alone, one database write.
        searcher.on_trial_complete(trial_id, reports[-1])
        (folder / logdir / "result.json").write_text("\n".join(lines) + "\n")
        trial = {"trial_id": trial_id, "status": "TERMINATED", "config": config}
        times = {"start_time": 1.8e9, "last_result_time": 1.8e9 + 1, "num_failures": 0}
        states.append([json.dumps(trial | {"relative_logdir": logdir}), json.dumps(times)])
    state = {"trial_data": states, "runner_data": {}, "stats": {}}
    (folder / "experiment_state-2026-12-02_00-00-00.json").write_text(json.dumps(state))
    record = {
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "digest": spec.digest(),
        "command": ["lbs-tune", "run", "sweeps/quickstart_tuned.yaml"],
        "started": "2026-12-02T00:00:00+00:00",
        "ended": "2026-12-02T00:05:00+00:00",
    }
    (folder / "lbs_sweep.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, Page]:
    """The tuned toy experiment's folder and its report (written with the default options)."""
    folder = tuned_experiment(tmp_path_factory.mktemp("tuned") / "quickstart_tuned")
    return folder, Page(write_report(folder).read_text())


def test_a_trial_that_reached_the_target_as_it_diverged_counts_as_its_study_counts_it(
    tuned, tmp_path
):
    """Every trial's last report also says diverged (its loss crossed the bound as it reached
    the target): the final line and the finished sweep's line count those that their studies
    recorded COMPLETE as finished, as their trial lines say 'reached', and the rest diverged."""
    from types import SimpleNamespace

    from lbs_tune.record import finished_sweep
    from lbs_tune.runner import _summary
    from lbs_tune.storage import locate
    from lbs_tune.studies import read_studies, told_by_ray_id
    from lbs_tune.sweep import SweepSpec

    folder = shutil.copytree(tuned[0], tmp_path / "quickstart_tuned")
    (state,) = folder.glob("experiment_state-*.json")
    content = json.loads(state.read_text())
    for pair in content["trial_data"]:
        pair[1] = json.dumps(json.loads(pair[1]) | {"last_result": {"diverged": True}})
    state.write_text(json.dumps(content))
    told = told_by_ray_id(read_studies(folder))
    complete = sum(t["state"] == "COMPLETE" for t in told.values())
    assert 0 < complete < len(told) == len(content["trial_data"])
    expected = f"{complete} finished, {len(told) - complete} diverged, 0 errored"

    record = json.loads((folder / "lbs_sweep.json").read_text())
    done = finished_sweep(locate(folder), record["digest"], len(told))
    assert f"is finished ({expected})" in done
    spec = SweepSpec.model_validate(record["spec"])
    results = [
        SimpleNamespace(path=str(folder / json.loads(t)["relative_logdir"]), error=None,
                        metrics={"diverged": True})
        for t, _ in content["trial_data"]
    ]  # fmt: skip
    line, code = _summary(spec, locate(folder), results, started=0)
    assert f"{len(told)} of {len(told)} trials: {expected}" in line and code == 0


def toy_trials(folder: Path) -> list[tuple[dict, list[dict], int | None]]:
    """Each trial's config, reports and first step at the target (None: never), read from the
    trial folders with plain json, in the studies' order (grid point, then trial number)."""
    found = []
    for params in folder.glob("*/params.json"):
        rows = [
            json.loads(line) for line in (params.parent / "result.json").read_text().splitlines()
        ]
        hit = next((r["step"] for r in rows if r["val/accuracy"] >= 0.5), None)
        found.append((json.loads(params.read_text()), rows, hit))
    return sorted(found, key=lambda t: (t[0]["search"]["point"], t[0]["search"]["number"]))


def toy_best(folder: Path) -> dict[int, tuple[int, list[dict]]]:
    """Per batch size, the fewest steps to the target of its trials and that trial's reports."""
    best: dict[int, tuple[int, list[dict]]] = {}
    for config, rows, hit in toy_trials(folder):
        batch = config["batch_size"]
        if hit is not None and (batch not in best or hit < best[batch][0]):
            best[batch] = (hit, rows)
    return best


def answer_text(text: str) -> str:
    """The text of the page's answer section."""
    section = text[text.index('<section id="answer">') : text.index("</section>")]
    return " ".join(" ".join(Page(section).text).split())


def test_a_tuned_sweeps_export_adds_every_study_trial(tuned, tmp_path):
    from analysis import export
    from analysis.studies_table import study_trials_table

    folder, _ = tuned
    written = export(folder, tmp_path / "export")
    assert [Path(p).name for p in written][-1] == "studies.parquet"
    assert pq.read_table(written[-1]).equals(study_trials_table(folder))


def test_a_tuned_page_opens_with_the_answer_in_numbers(tuned):
    folder, page = tuned
    text = (folder / "report.html").read_text()
    best = toy_best(folder)
    assert sorted(best) == TUNED_SIZES  # every batch size reached the target in some trial
    fit = fit_scaling(TUNED_SIZES, [best[b][0] for b in TUNED_SIZES])
    answer = answer_text(text)
    assert answer.startswith("Answer The critical batch size is")
    for value in (fit.b_crit, *fit.intervals["b_crit"], fit.s_min, fit.e_min):
        assert number(value) in answer
    for b in TUNED_SIZES:
        assert f" {b} {number(best[b][0])} {number(best[b][0] * b)} " in answer
    # The answer's figure sits in the answer, before every other figure.
    assert text.index('id="fig-tuned-steps"') < text.index("<h2>Figures</h2>")
    ids = [a["id"][4:] for a, _ in page.scripts if a.get("type") == "application/json"]
    assert ids == [
        "tuned-steps",
        "pareto",
        "best-lr",
        "search-budget",
        "study-objective",
        "learning-curves",
        "loss-curves",
        "throughput",
        "parallel-coordinates",
    ]  # no fixed-budget accuracy against batch size, no LR of every trial


def test_a_tuned_pages_curves_are_each_studys_best_trial_against_examples(tuned):
    folder, page = tuned
    figure = page.figure("learning-curves")
    for b, (steps, rows) in toy_best(folder).items():
        (line,) = [t for t in figure["data"] if t["name"] == f"B={b}"]
        assert line["x"] == [r["examples"] for r in rows]
        assert line["x"][-1] == steps * b  # the best trial stopped at the target
    layout = figure["layout"]
    assert layout["xaxis"]["title"]["text"] == "examples"
    # One seed: nothing aggregated, and one rule: no panel titled by it.
    assert layout["title"]["text"] == "val/accuracy during training, best trial of each study"
    assert "annotations" not in layout


def test_a_tuned_pages_parallel_coordinates_are_the_searched_keys(tuned):
    folder, page = tuned
    parallel = page.figure("parallel-coordinates")["data"][0]
    labels = [d["label"] for d in parallel["dimensions"]]
    assert labels == ["batch_size (log)", "lr.base (log)", "optimizer.momentum"]
    trials = toy_trials(folder)
    lr = parallel["dimensions"][1]
    assert lr["values"] == pytest.approx([math.log10(c["lr"]["base"]) for c, _, _ in trials])
    # Ticks at 1, 2 and 5 times powers of ten within the rates drawn, labelled in real units.
    rates = [c["lr"]["base"] for c, _, _ in trials]
    steps = [m * 10.0**d for d in range(-4, 2) for m in (1, 2, 5)]
    assert lr["ticktext"] == [f"{t:g}" for t in steps if min(rates) <= t <= max(rates)]
    assert lr["tickvals"] == pytest.approx([math.log10(float(t)) for t in lr["ticktext"]])
    # Coloured by steps relative to the study's best (0), up to 8 times it (1); the infeasible
    # above the scale's feasible part, grey.
    best = {b: steps for b, (steps, _) in toy_best(folder).items()}
    expected = [
        1 / 0.9 if hit is None else min(math.log(hit / best[c["batch_size"]]) / math.log(8), 1)
        for c, _, hit in trials
    ]
    assert parallel["line"]["color"] == pytest.approx(expected)
    assert parallel["line"]["colorscale"][-1] == [1.0, "rgb(150, 150, 150)"]


# ============================================================================ Figures for a paper


def figures_of(page: Page) -> dict[str, dict]:
    return {
        a["id"][4:]: json.loads(body)
        for a, body in page.scripts
        if a.get("type") == "application/json"
    }


def axes(figure: dict) -> dict[str, dict]:
    return {k: v for k, v in figure["layout"].items() if re.fullmatch(r"[xy]axis\d*", k)}


def test_every_figure_has_units_readable_log_ticks_and_room(page, tuned, tiny_branch, tmp_path):
    branched = Page(write_report(tiny_branch, out=tmp_path / "branched.html").read_text())
    assert "local-cbs" in figures_of(branched)
    for parsed in (page[1], tuned[1], branched):
        for name, figure in figures_of(parsed).items():
            layout = figure["layout"]
            assert layout["template"]["layout"]["plot_bgcolor"] == "white", name
            rows = 1 + sum(1 for k in axes(figure) if k.startswith("yaxis")) // 4
            assert layout["height"] >= 300 * rows, name
            for key, axis in axes(figure).items():
                if axis.get("title"):  # shared axes are titled once, on their first panel
                    assert axis["title"]["text"], (name, key)
                if axis.get("type") != "log":
                    continue
                ticks = [t for t in axis["tickvals"]]
                batch = axis.get("title", {}).get("text") == "batch size (examples)"
                if batch:
                    assert all(math.log2(t).is_integer() for t in ticks), (name, key)
                else:  # whole mantissas from one of the sets 1; 1-2-5; 1-2-3-5; 1-9
                    mantissas = {float(f"{t:e}"[:4]) for t in ticks}
                    assert mantissas in ({1}, {1, 2, 5}, {1, 2, 3, 5}, set(range(1, 10))), name
            if "xaxis" in layout and name not in ("study-objective", "search-budget"):
                assert axes(figure)["xaxis"]["title"]["text"] in (
                    "batch size (examples)",
                    "examples",
                    "examples seen by the reference run",  # a branched sweep's probes
                    "steps S (steps)",
                ), name


def test_one_rule_and_one_seed_leave_no_label_of_either(tuned):
    text = json.dumps(figures_of(tuned[1]))
    assert "lr.scaling" not in text and "over seeds" not in text and "over 1 seeds" not in text


def test_every_batch_size_and_series_colour_reads_on_white():
    sizes = [2**k for k in range(4, 12)]
    colours = [batch_colour(b, sizes) for b in sizes] + list(SERIES_COLOURS)
    assert min(contrast(c) for c in colours) >= 3  # WCAG's ratio for graphics
    assert len(set(colours[: len(sizes)])) == len(sizes)
    assert contrast("rgb(253, 231, 37)") < 1.5  # Viridis' yellow end, which did not read


def test_log_ticks_are_powers_of_ten_or_one_two_five_in_plain_units():
    ticks, text = log_ticks([25, 330])
    assert [s for t, s in zip(ticks, text, strict=True) if 25 <= t <= 330] == ["50", "100", "200"]
    ticks, text = log_ticks([10, 20_000])
    assert [t for t, _ in zip(ticks, text, strict=True) if 10 <= t <= 20_000] == [
        10,
        100,
        1000,
        10_000,
    ]
    assert text[ticks.index(10_000)] == "10k"
    narrow = [t for t in log_ticks([0.2, 0.45])[0] if 0.2 <= t <= 0.45]
    assert narrow == pytest.approx([0.2, 0.3, 0.4])
    assert log_ticks([None, 0, -1]) == ([], [])


def test_the_trial_table_scrolls_inside_its_box(page):
    text = page[0].read_text()
    assert '<div class="table-wrap"><table class="sortable">' in text
    assert re.search(r"\.table-wrap \{[^}]*overflow: auto", text)


def test_the_tuned_regimes_and_the_b_crit_interval_are_told_apart(tuned):
    figure = tuned[1].figure("tuned-steps")
    regimes = [s for s in figure["layout"]["shapes"] if s.get("name") in REGIME_NAMES]
    assert [s["name"] for s in regimes] == list(REGIME_NAMES)
    assert len({s["fillcolor"] for s in regimes}) == 3
    (critical,) = [t for t in figure["data"] if t["name"].startswith("tuned: B_crit")]
    # The interval is an error bar in black on B_crit's point, no band like the regimes.
    assert critical["error_x"]["color"] == "black" and critical["marker"]["symbol"] == "diamond"
    assert critical["y"] == [pytest.approx(2 * read_fit(tuned[0]).s_min)]


def read_fit(folder: Path):
    best = toy_best(folder)
    return fit_scaling(TUNED_SIZES, [best[b][0] for b in TUNED_SIZES])


# ============================================================================ The fixed answer


def test_where_a_rule_stops_scaling_in_closed_form():
    # S(B) = S_min (1 + B_crit / B) is within 2x of perfect scaling from B0 while
    # B <= B_crit + 2 B0: with B0 = 16, up to 232 for B_crit = 200, 1032 for B_crit = 1000.
    sizes = [2**k for k in range(4, 12)]
    for b_crit, last in ((200, 128), (1000, 1024), (10, 32)):
        steps = [100 * (1 + b_crit / b) for b in sizes]
        stops = sizes[sizes.index(last) + 1]
        assert scaling_limit(sizes, steps) == (last, stops)
    assert scaling_limit([16, 32], [100, 50]) == (32, None)  # perfect scaling throughout
    assert scaling_limit([16, 32, 64], [None, 100, None]) == (32, 64)  # from the first reached
    assert scaling_limit([16, 32], [None, None]) == (None, None)


def test_the_fixed_answer_is_steps_per_rule_and_batch_size_and_where_each_stops(
    page, tiny_quickstart
):
    trials, history = load(tiny_quickstart)
    found = fixed_answer(trials, history, "val/accuracy", TARGET)
    expected = expected_steps_to_target(tiny_quickstart, "val/accuracy", TARGET)
    for r in found.rules:
        assert r.batch_sizes == BATCH_SIZES
        assert list(zip(r.median, r.low, r.high, strict=True)) == expected[r.rule]
        assert (r.scales_to, r.stops_at) == scaling_limit(BATCH_SIZES, r.median)
    sentence = fixed_sentence(found)
    assert sentence.startswith(f"To reach val/accuracy ≥ {TARGET}, lr.scaling linear scales")
    assert sentence in answer_text(page[0].read_text())
    made = FixedAnswer(
        "val/loss ≤ 1",
        2.0,
        [
            RuleSteps(
                "none", [16, 64], [400.0, 300.0], [400.0, 300.0], [400.0, 300.0], [1, 1], 16, 64
            )
        ],
    )
    assert fixed_sentence(made) == (
        "To reach val/loss ≤ 1, the sweep's rule scales up to batch size 16 (at 64 it needs "
        "300 steps)."
    )


# ============================================================================ Writing


def test_adding_a_figure_is_one_entry_in_the_pages_sections(tiny_quickstart, tmp_path, monkeypatch):
    extra = page_module.Section(
        "made-here", lambda c: True, lambda c: go.Figure(go.Scatter(x=[1], y=[2]))
    )
    monkeypatch.setattr(page_module, "SECTIONS", (*page_module.SECTIONS, extra))
    parsed = Page(write_report(tiny_quickstart, out=tmp_path / "r.html").read_text())
    assert parsed.figure("made-here")["data"][0]["y"] == [2]


def test_a_description_with_bidirectional_controls_reaches_the_page_as_plain_text(tuned):
    folder, parsed = tuned
    text = (folder / "report.html").read_text()
    # All but plotly.js (whose own code names these characters): text, tables, figures.
    shown = "".join(parsed.text) + "".join(
        body for a, body in parsed.scripts if a.get("type") == "application/json"
    )
    assert "MNIST-1D MLP, tuned" in shown and "\u202e" not in shown
    assert not re.search(r"\\u202e", shown, re.IGNORECASE)  # nor as a JSON escape
    assert "MNIST-1D MLP, tuned &lt;script&gt;alert(1)&lt;/script&gt; evil" in text


def test_a_full_disk_keeps_the_earlier_report_whole_and_is_one_line(cli, tiny_quickstart, tmp_path):

    with tmpfs(tmp_path / "disk", size="1m", full=False) as disk:
        earlier = disk / "report.html"
        earlier.write_text("an earlier, good report")
        code, out, err = cli("report", tiny_quickstart, "-o", earlier)
        assert (code, out) == (2, "")
        assert (
            err.count("\n") == 1
            and f"-o {earlier}: cannot write there (No space left on device; it needs" in err
        )
        assert earlier.read_text() == "an earlier, good report"
        assert sorted(os.listdir(disk)) == ["report.html"]  # no temporary file left


# ============================================================================ In a browser


CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
WINDOW = (1400, 1000)


def chromium(page: Path, profile: Path, *args: str) -> subprocess.Popen:
    """Headless Chromium on `page`, offline and quiet, with a throw-away profile."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",  # the page's script draws every figure meanwhile
        "--enable-logging=stderr",
    ]
    return subprocess.Popen(
        [CHROMIUM, *flags, *args, page.as_uri()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def drawn_sizes(dom: str) -> dict[str, tuple[int, int]]:
    """Per figure div, the size of the first SVG plotly drew into it."""
    sizes = {}
    for match in re.finditer(r'<div class="plot[^"]*" id="plot-([a-z-]+)"', dom):
        svg = re.search(r'<svg class="main-svg"[^>]*>', dom[match.end() :])
        width = re.search(r'width="(\d+)"', svg.group(0))
        height = re.search(r'height="(\d+)"', svg.group(0))
        sizes[match.group(1)] = (int(width.group(1)), int(height.group(1)))
    return sizes


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_both_reports_draw_every_figure_in_headless_chromium(page, tuned, tmp_path):
    from PIL import Image

    pages = {"fixed": page[0], "tuned": tuned[0] / "report.html"}
    shot = tmp_path / "tuned.png"
    runs = {name: chromium(path, tmp_path / name, "--dump-dom") for name, path in pages.items()}
    runs["shot"] = chromium(pages["tuned"], tmp_path / "shot", f"--screenshot={shot}")
    done = {name: run.communicate(timeout=240) for name, run in runs.items()}
    for name, path in pages.items():
        dom, log = done[name]
        assert "Uncaught" not in log, log  # no script error
        expected = [a["id"][4:] for a, _ in Page(path.read_text()).scripts if a.get("id")]
        sizes = drawn_sizes(dom)
        assert sorted(sizes) == sorted(expected)
        for figure, (width, height) in sizes.items():
            assert 600 <= width <= WINDOW[0] and height >= 300, (name, figure, width, height)
    # The top of the tuned page (its answer) is drawn, not blank: dark text and lines.
    image = Image.open(shot).convert("L")
    dark = sum(image.histogram()[:128]) / (image.width * image.height)
    assert image.size == WINDOW and dark > 0.005, dark
