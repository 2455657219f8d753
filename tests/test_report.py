"""analysis.report and analysis.figures on the fake sweep of test_analysis_load.py.

The numbers are worked out by hand from its `fake_accuracy` and `fake_step`: val/accuracy
reaches 0.52 at the third report (0.2/report) with the linear rule at every batch size, and
without scaling at B=32 on the third, at B=128 on the sixth (seed 0) or fifth (seed 1), never at
B=512. Reports come every 512 examples, so at steps 16i (B=32), 4i (B=128) and i (B=512).
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest
import test_analysis_load as fake
from test_analysis_load import HOSTILE, TARGET, result_file

from analysis import figures, load
from analysis.report import parse_target, script_json, trial_counts, write_report, write_static
from lbs_tune.errors import UserError

# The fake sweep's fixtures: one Ray and one experiment folder for the whole test run.
ray_session, experiment, copy = fake.ray_session, fake.experiment, fake.copy

FIGURES = [
    "learning-curves",
    "loss-curves",
    "metric-vs-batch-size",
    "steps-to-target",
    "learning-rate",
    "throughput",
    "parallel-coordinates",
]


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


@pytest.fixture(scope="module")
def page(experiment, tmp_path_factory) -> tuple[Path, Page]:
    path = write_report(experiment, out=tmp_path_factory.mktemp("report") / "report.html")
    return path, Page(path.read_text())


# ============================================================================ The page


def test_the_page_is_self_contained_with_plotly_inlined_once(page):
    path, parsed = page
    text = path.read_text()
    assert text.count("plotly.js v") == 1
    assert not any("src" in a for a, _ in parsed.scripts)  # nothing to fetch: works offline
    embedded = [a["id"] for a, _ in parsed.scripts if a.get("type") == "application/json"]
    assert embedded == [f"fig-{name}" for name in FIGURES]
    for name in FIGURES:
        assert f'<div class="plot" id="plot-{name}"></div>' in text
    header = " ".join(parsed.text)
    assert "12 trials: 10 finished, 1 diverged, 1 errored, 0 running or pending" in header
    assert "0123abc" in header and f"val/accuracy ≥ {TARGET}" in header


def test_config_values_and_errors_cannot_inject_markup(page):
    path, parsed = page
    text = path.read_text()
    # plotly.js, the loader, one JSON block per figure: nothing else is a script.
    assert len(parsed.scripts) == 2 + len(FIGURES)
    assert all(a == {} or a.get("type") == "application/json" for a, _ in parsed.scripts)
    shown = "".join(parsed.text)
    assert f"/data/{HOSTILE}" in shown  # the spec's data.dir, as text
    assert f"RuntimeError: trial blew up {HOSTILE}" in shown  # the error cell, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)" not in text


def test_embedded_json_cannot_close_its_script_element():
    hostile = {"name": "</script><script>alert(1)</script>", "b": "a & b > c"}
    text = script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


def test_the_trial_table_lists_every_trial_with_its_steps_to_target(page):
    path, _ = page
    text = path.read_text()
    assert text.count("<tr><td") == 12
    assert "<th>step to reach val/accuracy ≥ 0.52</th>" in text
    assert '<table class="sortable">' in text and "function sortBy" in text


# ============================================================================ Figure data


def test_steps_to_target_has_the_hand_worked_steps_and_the_perfect_scaling_line(page):
    figure = page[1].figure("steps-to-target")
    linear, none = trace(figure, "linear"), trace(figure, "none")
    assert linear["x"] == [32, 128, 512]
    # Linear: step 48 (3 x 16) at B=32, 12 (3 x 4) at B=128; B=512 diverged or crashed.
    assert linear["y"] == [48, 12, None]
    # None: B=128 seeds at steps 24 and 20 -> median 22, band 20-24; B=512 never.
    assert none["y"] == [48, 22, None]
    assert none["error_y"]["array"] == [0, 2, None]
    assert none["error_y"]["arrayminus"] == [0, 2, None]
    reference = trace(figure, "perfect scaling (steps ∝ 1/B)")
    assert reference["y"] == [48, 12, 3]
    assert figure["layout"]["xaxis"]["type"] == "log" and figure["layout"]["yaxis"]["type"] == "log"
    assert figure["layout"]["yaxis"]["title"]["text"] == "steps"


def test_the_extracted_steps_to_target_match_the_figure(experiment):
    trials, history = load(experiment)
    data = figures.steps_to_target(trials, history, "val/accuracy", TARGET)
    assert [(line.name, line.median, line.low, line.high) for line in data.lines] == [
        ("linear", [48, 12, None], [48, 12, None], [48, 12, None]),
        ("none", [48, 22, None], [48, 20, None], [48, 24, None]),
    ]
    assert data.reference.median == [48, 12, 3]


def test_final_and_best_metric_against_batch_size(page):
    figure = page[1].figure("metric-vs-batch-size")
    # Final val/accuracy: 6 reports -> min(0.9, 6 x rate + 0.05 x seed), median over 2 seeds.
    assert trace(figure, "none")["y"] == pytest.approx([0.9, 0.625, 0.325])
    assert trace(figure, "linear")["y"] == pytest.approx([0.9, 0.9, 0.1])
    diverged = trace(figure, "diverged")
    assert (diverged["x"], diverged["y"]) == ([512], [0.1])
    assert trace(figure, "diverged", "x2")["y"] == [0.2]  # best: the report before diverging
    assert trace(figure, "linear", "x2")["y"] == pytest.approx([0.9, 0.9, 0.2])
    assert figure["layout"]["yaxis"]["title"]["text"] == "val/accuracy"
    assert figure["layout"]["xaxis"]["tickvals"] == [32, 128, 512]


def test_learning_curves_are_medians_over_seeds_per_batch_size_and_rule(page):
    figure = page[1].figure("learning-curves")
    # Panels in order linear (x), none (x2). None, B=128: seeds 0.1i and 0.1i + 0.05.
    median = trace(figure, "B=128", "x2")
    assert median["x"] == [4, 8, 12, 16, 20, 24]
    assert median["y"] == pytest.approx([0.125, 0.225, 0.325, 0.425, 0.525, 0.625])
    band = trace(figure, "B=128 min–max", "x2")
    assert band["y"] == pytest.approx(
        [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    )
    assert trace(figure, "B=512", "x")["y"] == pytest.approx([0.2, 0.1])  # the diverged seed
    assert figure["layout"]["xaxis"]["title"]["text"] == "step"
    assert figure["layout"]["yaxis"]["title"]["text"] == "val/accuracy"
    loss = page[1].figure("loss-curves")
    assert loss["layout"]["yaxis"]["title"]["text"] == "train/loss"


def test_learning_rate_throughput_and_parallel_coordinates(page):
    rates = page[1].figure("learning-rate")
    linear = trace(rates, "linear")
    # Peak LR from the config: 0.05 x B/32 with the linear rule, 0.05 without scaling.
    assert sorted(zip(linear["x"], linear["y"], strict=True)) == [
        (32, 0.05),
        (32, 0.05),
        (128, 0.2),
        (128, 0.2),
        (512, 0.8),
    ]
    assert set(trace(rates, "none")["y"]) == {0.05}
    assert trace(rates, "diverged")["y"] == [0.8]

    speed = page[1].figure("throughput")
    assert sorted(trace(speed, "linear")["y"]) == [1.0, 3.0, 3.0, 3.0, 3.0]  # time_s
    assert sorted(set(trace(speed, "none", "x2")["y"])) == [3200, 12800, 51200]  # 100 x B

    parallel = page[1].figure("parallel-coordinates")["data"][0]
    labels = [d["label"] for d in parallel["dimensions"]]
    assert labels == ["lr.scaling", "batch_size", "final val/accuracy"]
    assert parallel["dimensions"][1]["ticktext"] == ["32", "128", "512"]
    assert len(parallel["dimensions"][2]["values"]) == 11  # the errored trial is left out


# ============================================================================ Options


def test_a_target_and_x_axis_given_on_the_command_line_win(experiment, tmp_path):
    path = write_report(
        experiment, out=tmp_path / "r.html", target=parse_target("val/loss=0.42"), x="examples"
    )
    parsed = Page(path.read_text())
    figure = parsed.figure("steps-to-target")
    # val/loss <= 0.42 is val/accuracy >= 0.58: the third report at 0.2/report, the sixth at 0.1.
    assert trace(figure, "none")["y"] == [48, 24, None]
    assert "val/loss ≤ 0.42" in figure["layout"]["title"]["text"]
    assert parsed.figure("learning-curves")["layout"]["xaxis"]["title"]["text"] == "examples"
    assert "<th>examples to reach val/loss ≤ 0.42</th>" in path.read_text()


def test_a_running_sweep_gets_a_report_of_what_is_there(copy):
    record = json.loads((copy / "lbs_sweep.json").read_text())
    record["ended"] = None
    del record["spec"]["target"]
    (copy / "lbs_sweep.json").write_text(json.dumps(record))
    trials, _ = load(copy, cache=False)
    path = result_file(copy, trials["trial_id"][0].as_py())
    with path.open("ab") as f:
        f.write(b'{"step": 200, "val/acc')
    with pytest.warns(UserWarning, match="incomplete"):
        written = write_report(copy)
    assert written == copy / "report.html"
    parsed = Page(written.read_text())
    assert "running (not ended)" in parsed.text
    ids = [a.get("id") for a, _ in parsed.scripts]
    assert "fig-steps-to-target" not in ids and "fig-learning-curves" in ids


def test_static_figures_say_in_one_line_what_is_missing(experiment, tmp_path, capsys):
    write_report(experiment, out=tmp_path / "r.html", static=tmp_path / "static")
    err = capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("kaleido") is None:
        assert err.count("\n") == 1 and "kaleido is not installed" in err
    else:
        assert err == "" or "static figures skipped" in err
    assert write_static({}, tmp_path / "none") in (None, err.strip().removeprefix("lbs-tune: "))


def test_trial_counts_and_target_parsing(experiment):
    trials, _ = load(experiment)
    assert trial_counts(trials) == {
        "finished": 10,
        "diverged": 1,
        "errored": 1,
        "running or pending": 0,
    }
    assert parse_target("val/accuracy=0.7") == ("val/accuracy", 0.7)
    for bad in ("val/accuracy", "val/accuracy=high", "val/acuracy=0.7"):
        with pytest.raises(UserError, match="--target"):
            parse_target(bad)


def test_a_copy_without_the_sweep_record_still_reports(experiment, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(experiment, folder, ignore=shutil.ignore_patterns("lbs_sweep.json", ".lbs*"))
    parsed = Page(write_report(folder, target=("val/accuracy", TARGET)).read_text())
    assert trace(parsed.figure("steps-to-target"), "linear")["y"] == [48, 12, None]


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
