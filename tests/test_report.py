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
import re
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import HOSTILE, raw_trials

from analysis import load
from analysis.figures import (
    evaluation_curves,
    learning_curves,
    learning_rates,
    metric_vs_batch_size,
    parallel_coordinates,
    steps_to_target,
    throughput,
)
from analysis.report import (
    STATIC_FORMATS,
    parse_target,
    script_json,
    trial_counts,
    write_report,
)
from lbs_tune.errors import UserError

FIGURES = [
    "learning-curves",
    "loss-curves",
    "metric-vs-batch-size",
    "steps-to-target",
    "learning-rate",
    "throughput",
    "parallel-coordinates",
]
BATCH_SIZES = [16, 64, 256]
RULES = ["linear", "none"]
TARGET = 0.3


class Page(HTMLParser):
    """Every script element (attributes and text) and all text outside scripts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict, str]] = []
        self.text: list[str] = []
        self._script: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        else:
            self.text.append(data)

    def figure(self, name: str) -> dict:
        (body,) = [b for a, b in self.scripts if a.get("id") == f"fig-{name}"]
        return json.loads(body)


def trace(figure: dict, name: str, axis: str = "x") -> dict:
    (found,) = [t for t in figure["data"] if t.get("name") == name and t.get("xaxis", "x") == axis]
    return found


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
    column = f"step to reach val/accuracy ≥ {TARGET}"
    rows = {row["trial_id"]: row for row in table_rows(text)}
    raw = raw_trials(tiny_quickstart)
    assert sorted(rows) == [t.trial_id for t in raw]
    for t in raw:
        step = first_step(t, "val/accuracy", TARGET)
        assert rows[t.trial_id][column] == ("" if step is None else str(step))
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
    # Panels in rule order: linear (x), none (x2).
    for rule, axis in zip(RULES, ["x", "x2"], strict=True):
        for b in BATCH_SIZES:
            seeds = reports[(rule, b)]
            steps = sorted(set().union(*seeds))
            stats = [
                spread([s[step]["val/accuracy"] for s in seeds if step in s], "max")
                for step in steps
            ]
            median = trace(figure, f"B={b}", axis)
            assert median["x"] == steps
            assert median["y"] == pytest.approx([m for m, _, _ in stats])
            band = trace(figure, f"B={b} min–max", axis)
            highs, lows = [h for _, _, h in stats], [lo for _, lo, _ in stats]
            assert band["y"] == pytest.approx(highs + lows[::-1])
    assert figure["layout"]["xaxis"]["title"]["text"] == "step"
    assert figure["layout"]["yaxis"]["title"]["text"] == "val/accuracy"
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
    assert labels == ["lr.scaling", "batch_size", "final val/accuracy"]
    assert parallel["dimensions"][1]["ticktext"] == ["16", "64", "256"]
    finals = sorted(t.reports[-1]["val/accuracy"] for t in raw)
    assert sorted(parallel["dimensions"][2]["values"]) == finals


# ============================================================================ Options


def test_a_target_and_x_axis_given_on_the_command_line_win(tiny_quickstart, tmp_path):
    path = write_report(
        tiny_quickstart,
        out=tmp_path / "r.html",
        target=parse_target("val/loss=1.8"),
        x="examples",
    )
    parsed = Page(path.read_text())
    figure = parsed.figure("steps-to-target")
    expected = expected_steps_to_target(tiny_quickstart, "val/loss", 1.8)
    assert any(m is not None for m, _, _ in expected["none"])
    assert trace(figure, "none")["y"] == [m for m, _, _ in expected["none"]]
    assert "val/loss ≤ 1.8" in figure["layout"]["title"]["text"]
    assert parsed.figure("learning-curves")["layout"]["xaxis"]["title"]["text"] == "examples"
    assert "<th>examples to reach val/loss ≤ 1.8</th>" in path.read_text()


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
def test_static_figures_without_kaleido_say_so_in_one_line(cli, tiny_quickstart, tmp_path):
    html, static = tmp_path / "r.html", tmp_path / "static"
    code, out, err = cli("report", tiny_quickstart, "-o", html, "--static", static)
    assert (code, out) == (0, f"report written to {html}\n")
    assert err == (
        "lbs-tune: static figures skipped: kaleido is not installed "
        "(pip install kaleido; it also needs Chrome or Chromium)\n"
    )
    assert Page(html.read_text()).figure("learning-curves")["data"]  # the page is whole
    assert not static.exists()


@pytest.mark.skipif(not KALEIDO, reason="kaleido is not installed (no dependency of lbs-tune)")
def test_static_figures_with_kaleido_are_written_or_chrome_is_named(cli, tiny_quickstart, tmp_path):
    html, static = tmp_path / "r.html", tmp_path / "static"
    code, _, err = cli("report", tiny_quickstart, "-o", html, "--static", static)
    written = sorted(p.name for p in static.glob("*")) if static.exists() else []
    assert code == 0 and html.exists()
    if err:  # kaleido without a Chrome to drive: one line says so, nothing is half-written
        assert err.count("\n") == 1 and err.startswith("lbs-tune: static figures skipped: ")
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
    assert [d.label for d in parallel.dimensions] == ["lr.scaling", "batch_size", "lr.base"]
    assert parallel.dimensions[2].values == [0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.2, 0.2]


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
    narrow = parallel_coordinates.dimension("batch_size", [32, 64])
    assert narrow == parallel_coordinates.Dimension("batch_size", [32.0, 64.0], None, None)
    rules = parallel_coordinates.dimension("lr.scaling", ["none", "linear", "none"])
    assert rules == parallel_coordinates.Dimension(
        "lr.scaling", [1.0, 0.0, 1.0], [0, 1], ["linear", "none"]
    )
