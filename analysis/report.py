"""`lbs-tune report`: one self-contained HTML file per sweep, readable offline.

plotly.js is inlined once; each figure travels as JSON in `<script type="application/json"
id="fig-NAME">` and a few lines of JavaScript draw it, so tests (and anyone) can read the data
back. Every value from a config, a spec or an error message is HTML-escaped, and embedded JSON
has `<`, `>` and `&` escaped, so no value can end a script element or start one.
"""

from __future__ import annotations

import html
import importlib.util
import json
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io
import plotly.offline
import pyarrow as pa

from analysis.figures import (
    evaluation_curves,
    learning_curves,
    learning_rates,
    metric_vs_batch_size,
    parallel_coordinates,
    steps_to_target,
    throughput,
)
from analysis.load import experiment_location, load, load_evaluation
from analysis.metrics import reached_at, varying_keys
from analysis.summary import extra_figures, read_summary, summary_path, write_summary
from analysis.tables import Results
from lbs_tune.errors import UserError, cut, did_you_mean
from lbs_tune.experiment import REPORT_FILE, SWEEP_FILE, count_outcomes
from lbs_tune.names import METRICS, comparison
from lbs_tune.provenance import summary_lines

X_AXES = ("step", "examples", "epoch")
STATIC_FORMATS = ("png", "pdf", "svg")
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


def parse_target(text: str) -> tuple[str, float]:
    """'val/accuracy=0.7' -> ('val/accuracy', 0.7), for `--target METRIC=VALUE`."""
    metric, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or number is None:
        raise UserError(f"--target {text}: expected METRIC=VALUE, e.g. --target val/accuracy=0.7")
    if metric not in METRICS:
        raise UserError(
            f"--target {text}: unknown metric '{metric}'{did_you_mean(metric, METRICS)}"
        )
    return metric, number


def write_report(
    source: Any,
    out: Path | None = None,
    target: tuple[str, float] | None = None,
    x: str = "step",
    static: Path | None = None,
    compare: Sequence[Any] = (),
) -> Path:
    """Write the HTML report of an experiment (folder path, URI or ResultGrid); return its path.

    A searched sweep (Optuna studies) also gets the tuned figures (best steps per batch size with
    the critical-batch fit, the examples-steps frontier, the best LR against batch size, each
    study's basin) and `summary.json` beside the page; `compare` names experiments whose
    fixed-rule steps to target are drawn beside the tuned ones. Measurement figures (noise scale,
    sharpness) appear when the trials reported them.

    `out` defaults to `<experiment>/report.html` (`./<name>-report.html` for remote storage);
    `target` (metric, value) defaults to the sweep spec's target; `x` is the learning curves'
    axis (step, examples or epoch). With `static`, every figure is also written there as
    PNG, PDF and SVG when kaleido and Chrome are available; otherwise one line on stderr says
    what is missing. Works on a running sweep (whatever results exist so far). When
    `lbs-tune evaluate` has written `<experiment>/evaluation.parquet`, the checkpoints' loss and
    accuracy curves per split are added.
    """
    if x not in X_AXES:
        raise UserError(f"x axis '{x}': choose one of {', '.join(X_AXES)}")
    where = experiment_location(source)
    results = load(source)
    spec = (results.sweep or {}).get("spec") or {}
    metric = (spec.get("metric") or {}).get("name") or "val/accuracy"
    if target is None and spec.get("target"):
        target = (spec["target"]["metric"], spec["target"]["value"])
    for name in (metric, target and target[0]):
        if name and name not in METRICS:  # a record of another version of lbs-tune
            raise UserError(
                f"{where.join(SWEEP_FILE).uri}: the sweep's metric '{cut(name)}' is not one this "
                f"lbs-tune reports{did_you_mean(name, METRICS)}; report it with the version "
                "that ran it"
            )
    summary = read_summary(where, results.sweep, target)
    compared = [(experiment_location(c).name, load(c)) for c in compare]
    if compared and summary is None:
        raise UserError(
            f"--compare: {where.uri} has no studies (no search section); --compare draws "
            "fixed-rule sweeps beside a tuned one"
        )
    drawn = build_figures(results, metric, target, x, load_evaluation(source))
    drawn.update(extra_figures(results, summary, metric, compared, x))
    if out is None:
        remote = Path(f"{where.name}-report.html")
        out = Path(where.path) / REPORT_FILE if where.is_local else remote
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(results, drawn, where.uri, metric, target, x), encoding="utf-8")
    if summary is not None:
        write_summary(summary, summary_path(out))
    if static is not None:
        problem = write_static(drawn, Path(static))
        if problem:
            print(f"lbs-tune: {problem}", file=sys.stderr)
    return out


def build_figures(
    results: Results,
    metric: str,
    target: tuple[str, float] | None,
    x: str = "step",
    evaluation: pa.Table | None = None,
) -> dict[str, go.Figure]:
    """The report's figures by id, in page order (steps-to-target only with a target, the
    checkpoints' curves only with an `evaluation` table from `lbs-tune evaluate`)."""
    trials, history = results
    drawn = {
        "learning-curves": learning_curves.render(
            learning_curves.extract(trials, history, metric, x)
        )
    }
    if metric != "train/loss":
        drawn["loss-curves"] = learning_curves.render(
            learning_curves.extract(trials, history, "train/loss", x)
        )
    if evaluation is not None and evaluation.num_rows:
        drawn["evaluation"] = evaluation_curves.render(
            evaluation_curves.extract(trials, evaluation)
        )
    drawn["metric-vs-batch-size"] = metric_vs_batch_size.render(
        metric_vs_batch_size.extract(trials, metric)
    )
    if target is not None:
        drawn["steps-to-target"] = steps_to_target.render(
            steps_to_target.extract(trials, history, *target)
        )
    drawn["learning-rate"] = learning_rates.render(learning_rates.extract(trials, history))
    drawn["throughput"] = throughput.render(throughput.extract(trials, history))
    drawn["parallel-coordinates"] = parallel_coordinates.render(
        parallel_coordinates.extract(trials, metric)
    )
    return drawn


def write_static(drawn: dict[str, go.Figure], folder: Path) -> str | None:
    """Write each figure as PNG, PDF and SVG into `folder`; None when done, else one line that
    says what is missing (kaleido, or the Chrome it drives)."""
    if importlib.util.find_spec("kaleido") is None:
        return (
            "static figures skipped: kaleido is not installed "
            "(pip install kaleido; it also needs Chrome or Chromium)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        (fig, folder / f"{name}.{fmt}") for name, fig in drawn.items() for fmt in STATIC_FORMATS
    ]
    try:
        plotly.io.write_images([f for f, _ in names], [p for _, p in names])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        return f"static figures skipped: {reason}"
    return None


def trial_counts(trials: pa.Table) -> dict[str, int]:
    """Trials by outcome: finished, diverged, errored, and running or pending (the rest)."""
    return count_outcomes(
        zip(trials["state"].to_pylist(), trials["diverged"].to_pylist(), strict=True)
    )


# ============================================================================ HTML


def script_json(value: Any) -> str:
    """JSON text that is safe inside <script>: no `<`, `>` or `&` can close or open an element."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.translate(_JSON_ESCAPES)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def render_html(
    results: Results,
    drawn: dict[str, go.Figure],
    experiment: str,
    metric: str,
    target: tuple[str, float] | None,
    x: str = "step",
) -> str:
    """The whole report page as text; `experiment` is the folder's path or URI."""
    sweep = results.sweep or {}
    name = sweep.get("name") or experiment.rstrip("/").rsplit("/", 1)[-1]
    plots = "\n".join(
        f'<div class="plot" id="plot-{_e(key)}"></div>\n'
        f'<script type="application/json" id="fig-{_e(key)}">{script_json(fig.to_json())}</script>'
        for key, fig in drawn.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(name)} · lbs-tune report</title>
<style>{_STYLE}</style>
<script>{plotly.offline.get_plotlyjs()}</script>
</head>
<body>
{_header(results, name, experiment, target)}
<h2>Figures</h2>
{plots}
<h2>Trials</h2>
{_table(results, metric, target, x)}
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _header(results: Results, name: str, experiment: str, target: tuple[str, float] | None) -> str:
    sweep = results.sweep or {}
    counts = trial_counts(results.trials)
    facts = {
        "experiment": experiment,
        "git commit": sweep.get("git_commit"),
        "lbs-tune": sweep.get("lbs_tune_version"),
        "command": sweep.get("command") and shlex.join(sweep["command"]),
        "started": sweep.get("started"),
        "ended": sweep.get("ended") or ("running (not ended)" if sweep else None),
        "runs": len(sweep["runs"]) if sweep.get("runs") else None,
        "target": target and f"{target[0]} {comparison(target[0])} {target[1]:g}",
        "report written": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items() if v is not None)
    summary = ", ".join(f"{n} {label}" for label, n in counts.items())
    spec = sweep.get("spec")
    spec_block = (
        f"<details><summary>sweep spec</summary><pre>{_e(json.dumps(spec, indent=2))}</pre>"
        "</details>"
        if spec
        else ""
    )
    return (
        f"<header><h1>{_e(name)}</h1>"
        f"<p>{_e((sweep.get('spec') or {}).get('description'))}</p>"
        f"<dl>{rows}</dl>"
        f'<p class="counts">{results.trials.num_rows} trials: {_e(summary)}</p>'
        f"{machines_html(sweep)}{spec_block}</header>"
    )


def machines_html(sweep: dict[str, Any]) -> str:
    """The versions and machine of each run of the sweep (lbs_tune.provenance), one list per
    run; '' for a record without them (runs recorded before they were kept)."""
    runs = [r for r in sweep.get("runs") or [] if isinstance(r, dict) and r.get("machine")]
    items = "".join(
        f"<li>run of {_e(run.get('started'))}: "
        + "; ".join(_e(line) for line in summary_lines(run["machine"]))
        + "</li>"
        for run in runs
    )
    return (
        f"<details><summary>versions and machine</summary><ul>{items}</ul></details>"
        if runs
        else ""
    )


def _table(results: Results, metric: str, target: tuple[str, float] | None, x: str) -> str:
    trials, history = results
    columns = ["trial_id", "state", *varying_keys(trials), "diverged"]
    columns += [c for c in (f"final/{metric}", f"best/{metric}") if c in trials.column_names]
    table = trials
    if target is not None:
        label = f"{x} to reach {target[0]} {comparison(target[0])} {target[1]:g}"
        table = table.append_column(label, reached_at(trials, history, *target, x))
        columns.append(label)
    columns += ["reports", "final/time_s", "final/device", "error"]
    columns = [c for c in columns if c in table.column_names]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(_cell(row[c]) for c in columns) + "</tr>"
        for row in table.select(columns).to_pylist()
    )
    return (
        f'<table class="sortable">\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table>"
    )


def _cell(value: Any) -> str:
    """A table cell whose data-v holds the value to sort by (numbers as numbers)."""
    if value is None:
        return '<td data-v=""></td>'
    if isinstance(value, bool):
        return f'<td data-v="{int(value)}">{"yes" if value else ""}</td>'
    if isinstance(value, float):
        return f'<td data-v="{value!r}">{value:.4g}</td>'
    return f'<td data-v="{_e(value)}">{_e(value)}</td>'


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; font-family: monospace; }
.plot { width: 100%; min-height: 480px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th[data-order="asc"]::after { content: " ▲"; } th[data-order="desc"]::after { content: " ▼"; }
pre { background: #f8f8f8; padding: 1em; overflow: auto; }
"""

_SCRIPT = """
for (const node of document.querySelectorAll('script[type="application/json"][id^="fig-"]')) {
  const figure = JSON.parse(node.textContent);
  Plotly.newPlot("plot-" + node.id.slice(4), figure.data, figure.layout,
                 {responsive: true, displaylogo: false});
}
function sortBy(th) {
  const body = th.closest("table").tBodies[0], i = th.cellIndex;
  const up = th.dataset.order !== "asc";
  for (const other of th.parentNode.children) delete other.dataset.order;
  th.dataset.order = up ? "asc" : "desc";
  const key = (row) => {
    const v = row.cells[i].dataset.v;
    return v === "" ? null : isNaN(v) ? v : Number(v);
  };
  const rows = Array.from(body.rows).sort((a, b) => {
    const p = key(a), q = key(b);
    if (p === null || q === null) return (p === null) - (q === null);
    return (p < q ? -1 : p > q ? 1 : 0) * (up ? 1 : -1);
  });
  body.append(...rows);
}
for (const th of document.querySelectorAll("table.sortable th")) {
  th.addEventListener("click", () => sortBy(th));
}
"""
