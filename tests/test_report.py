"""analysis.report and analysis.figures on the real sweeps of conftest: the tiny quickstart
sweep (12 trials, one diverged) and the sweep with an errored trial.

The report's HTML is parsed and the figure JSON embedded in it is checked against numbers worked
out here from the trial folders with plain json (`raw_trials`): medians over the two seeds,
steps to the target, the peak learning rates.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import HOSTILE, raw_trials, without_ray_lines

from analysis import figures, load
from analysis.report import parse_target, script_json, trial_counts, write_report, write_static
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


@pytest.fixture(scope="module")
def page(quickstart_experiment, tmp_path_factory) -> tuple[Path, Page]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    path = write_report(quickstart_experiment, out=out)
    return path, Page(path.read_text())


@pytest.fixture(scope="module")
def broken_page(broken_experiment, tmp_path_factory) -> tuple[Path, Page]:
    out = tmp_path_factory.mktemp("broken-report") / "report.html"
    path = write_report(broken_experiment, out=out)
    return path, Page(path.read_text())


# ============================================================================ The page


@pytest.mark.ray
def test_the_page_is_self_contained_with_plotly_inlined_once(page, quickstart_experiment):
    path, parsed = page
    text = path.read_text()
    assert text.count("plotly.js v") == 1
    assert not any("src" in a for a, _ in parsed.scripts)  # nothing to fetch: works offline
    embedded = [a["id"] for a, _ in parsed.scripts if a.get("type") == "application/json"]
    assert embedded == [f"fig-{name}" for name in FIGURES]
    for name in FIGURES:
        assert f'<div class="plot" id="plot-{name}"></div>' in text
    header = " ".join(parsed.text)
    assert "12 trials: 11 finished, 1 diverged, 0 errored, 0 running or pending" in header
    record = json.loads((quickstart_experiment / "lbs_sweep.json").read_text())
    assert record["git_commit"] in header and record["started"] in header
    assert f"val/accuracy ≥ {TARGET}" in header


@pytest.mark.ray
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


@pytest.mark.ray
def test_an_error_message_cannot_inject_markup(broken_page, broken_experiment):
    path, parsed = broken_page
    text = path.read_text()
    assert "<script>alert(1)" not in text
    assert all(a == {} or a.get("type") == "application/json" for a, _ in parsed.scripts)
    (failed,) = [t for t in raw_trials(broken_experiment) if t.state == "ERROR"]
    message = (failed.folder / "error.txt").read_text().strip().splitlines()[-1]
    assert HOSTILE in message and message in parsed.text  # the error cell, as text
    assert "2 trials: 1 finished, 0 diverged, 1 errored, 0 running or pending" in parsed.text


def test_embedded_json_cannot_close_its_script_element():
    hostile = {"name": "</script><script>alert(1)</script>", "b": "a & b > c"}
    text = script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


@pytest.mark.ray
def test_the_trial_table_lists_every_trial_with_its_steps_to_target(page, quickstart_experiment):
    path, _ = page
    text = path.read_text()
    assert '<table class="sortable">' in text and "function sortBy" in text
    column = f"step to reach val/accuracy ≥ {TARGET}"
    rows = {row["trial_id"]: row for row in table_rows(text)}
    raw = raw_trials(quickstart_experiment)
    assert sorted(rows) == [t.trial_id for t in raw]
    for t in raw:
        step = first_step(t, "val/accuracy", TARGET)
        assert rows[t.trial_id][column] == ("" if step is None else str(step))
        assert rows[t.trial_id]["reports"] == str(len(t.reports))
    assert [rows[t.trial_id]["diverged"] for t in raw].count("1") == 1


# ============================================================================ Figure data


@pytest.mark.ray
def test_steps_to_target_per_batch_size_and_the_perfect_scaling_line(page, quickstart_experiment):
    figure = page[1].figure("steps-to-target")
    expected = expected_steps_to_target(quickstart_experiment, "val/accuracy", TARGET)
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


@pytest.mark.ray
def test_final_and_best_metric_against_batch_size(page, quickstart_experiment):
    figure = page[1].figure("metric-vs-batch-size")
    for kind, axis, value in (
        ("final", "x", lambda t: t.reports[-1]["val/accuracy"]),
        ("best", "x2", lambda t: max(r["val/accuracy"] for r in t.reports)),
    ):
        values = by_config(quickstart_experiment, value)
        for rule in RULES:
            medians = [spread(values[(rule, b)], "max")[0] for b in BATCH_SIZES]
            assert trace(figure, rule, axis)["y"] == pytest.approx(medians), (kind, rule)
        (hit,) = [t for t in raw_trials(quickstart_experiment) if t.reports[-1]["diverged"]]
        diverged = trace(figure, "diverged", axis)
        assert (diverged["x"], diverged["y"]) == ([256], [value(hit)])
    assert figure["layout"]["yaxis"]["title"]["text"] == "val/accuracy"
    assert figure["layout"]["xaxis"]["tickvals"] == BATCH_SIZES


@pytest.mark.ray
def test_learning_curves_are_medians_over_seeds_per_batch_size_and_rule(
    page, quickstart_experiment
):
    figure = page[1].figure("learning-curves")
    reports = by_config(quickstart_experiment, lambda t: {r["step"]: r for r in t.reports})
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


@pytest.mark.ray
def test_learning_rate_throughput_and_parallel_coordinates(page, quickstart_experiment):
    raw = raw_trials(quickstart_experiment)
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
    assert trace(rates, "diverged")["y"] == [pytest.approx(1.6)]

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


@pytest.mark.ray
def test_a_target_and_x_axis_given_on_the_command_line_win(quickstart_experiment, tmp_path):
    path = write_report(
        quickstart_experiment,
        out=tmp_path / "r.html",
        target=parse_target("val/loss=1.8"),
        x="examples",
    )
    parsed = Page(path.read_text())
    figure = parsed.figure("steps-to-target")
    expected = expected_steps_to_target(quickstart_experiment, "val/loss", 1.8)
    assert any(m is not None for m, _, _ in expected["none"])
    assert trace(figure, "none")["y"] == [m for m, _, _ in expected["none"]]
    assert "val/loss ≤ 1.8" in figure["layout"]["title"]["text"]
    assert parsed.figure("learning-curves")["layout"]["xaxis"]["title"]["text"] == "examples"
    assert "<th>examples to reach val/loss ≤ 1.8</th>" in path.read_text()


@pytest.fixture
def copy(quickstart_experiment, tmp_path) -> Path:
    target = tmp_path / "quickstart"
    shutil.copytree(quickstart_experiment, target, ignore=shutil.ignore_patterns(".lbs*"))
    return target


@pytest.mark.ray
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


@pytest.mark.ray
def test_static_figures_say_in_one_line_what_is_missing(quickstart_experiment, tmp_path, capsys):
    write_report(quickstart_experiment, out=tmp_path / "r.html", static=tmp_path / "static")
    err = without_ray_lines(capsys.readouterr().err)
    import importlib.util

    if importlib.util.find_spec("kaleido") is None:
        assert err.count("\n") == 1 and "kaleido is not installed" in err
    else:
        assert err == "" or "static figures skipped" in err
    assert write_static({}, tmp_path / "none") in (None, err.strip().removeprefix("lbs-tune: "))


@pytest.mark.ray
def test_trial_counts_and_target_parsing(quickstart_experiment, broken_experiment):
    trials, _ = load(quickstart_experiment)
    assert trial_counts(trials) == {
        "finished": 11,
        "diverged": 1,
        "errored": 0,
        "running or pending": 0,
    }
    trials, _ = load(broken_experiment)
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


@pytest.mark.ray
def test_a_copy_without_the_sweep_record_still_reports(quickstart_experiment, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(
        quickstart_experiment, folder, ignore=shutil.ignore_patterns("lbs_sweep.json", ".lbs*")
    )
    parsed = Page(write_report(folder, target=("val/accuracy", TARGET)).read_text())
    expected = expected_steps_to_target(quickstart_experiment, "val/accuracy", TARGET)
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
    final = figures.metric_vs_batch_size(trials, "val/accuracy")
    (line,) = final.lines
    # No lr.scaling key: the TrialConfig default rule, "none".
    assert (line.panel, line.name, line.batch_sizes) == ("final", "none", [32, 64])
    assert line.median == pytest.approx([0.86, 0.79])
    assert (line.low, line.high) == ([0.85, 0.78], [0.87, 0.80])

    curves = figures.learning_curves(trials, history, "val/accuracy")
    assert [(c.batch_size, c.x) for c in curves.curves] == [(32, [10, 20]), (64, [5, 10])]
    assert curves.curves[0].median == pytest.approx([0.56, 0.86])  # lr.base 0.2 at B=32
    assert curves.curves[1].median == pytest.approx([0.49, 0.79])  # lr.base 0.1 at B=64

    # To 0.5: both configs at B=32 at step 10; at B=64 lr.base 0.1 at steps 10 and 5.
    steps = figures.steps_to_target(trials, history, "val/accuracy", 0.5)
    (line,) = steps.lines
    assert (line.median, line.low, line.high) == ([10, 7.5], [10, 5], [10, 10])
    assert steps.reference.median == [10, 5]

    parallel = figures.parallel_coordinates(trials, "val/accuracy")
    assert [d.label for d in parallel.dimensions] == ["lr.scaling", "batch_size", "lr.base"]
    assert parallel.dimensions[2].values == [0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.2, 0.2]
