"""The report page's HTML around its figures: the header, the answer (one sentence, the numbers
as a table, the answer's figure), the figures, the trials table, what ran where.

Every text on the page goes through `printable` (no bidirectional controls, no terminal
escapes) and is HTML-escaped; the figures' JSON has `<`, `>` and `&` escaped, so no value can
end a script element or start one.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from datetime import datetime
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import plotly.offline
import pyarrow as pa

from analysis import answer as numbers
from analysis.metrics import reached_at, varying_keys
from analysis.page import Context, answer_figure
from lbs_tune.errors import printable
from lbs_tune.experiment import count_outcomes
from lbs_tune.names import target_label
from lbs_tune.provenance import summary_lines

if TYPE_CHECKING:
    from analysis.summary import Steps

_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


def script_json(value: Any) -> str:
    """JSON text that is safe inside <script>: no `<`, `>` or `&` can close or open an element."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.translate(_JSON_ESCAPES)


def clean(value: Any) -> Any:
    """`value` (JSON data) with every string made printable (`lbs_tune.errors.printable`)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): clean(v) for k, v in value.items()}
    return value


def figure_json(figure: go.Figure) -> str:
    """A figure's JSON for the page: printable strings, safe inside a script element."""
    return script_json(json.dumps(clean(json.loads(figure.to_json()))))


def _e(value: Any) -> str:
    return html.escape(printable("" if value is None else str(value)), quote=True)


def trial_counts(trials: pa.Table) -> dict[str, int]:
    """Trials by outcome: finished, diverged, errored, and running or pending (the rest)."""
    return count_outcomes(
        zip(trials["state"].to_pylist(), trials["diverged"].to_pylist(), strict=True)
    )


def render_html(context: Context, drawn: dict[str, go.Figure], experiment: str) -> str:
    """The whole report page as text; `experiment` is the folder's path or URI."""
    sweep = context.results.sweep or {}
    name = sweep.get("name") or experiment.rstrip("/").rsplit("/", 1)[-1]
    first = answer_figure(drawn)
    plots = "\n".join(_plot(key, fig) for key, fig in drawn.items() if key != first)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(name)} · lbs-tune report</title>
<style>{_STYLE}</style>
<script>{plotly.offline.get_plotlyjs()}</script>
</head>
<body>
{_header(context, name)}
{answer_html(context, drawn.get(first) and _plot(first, drawn[first]))}
<h2>Figures</h2>
{plots}
<h2>Trials</h2>
{_table(context)}
{_about(context, experiment)}
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _plot(key: str, figure: go.Figure) -> str:
    return (
        f'<div class="plot" id="plot-{_e(key)}"></div>\n'
        f'<script type="application/json" id="fig-{_e(key)}">{figure_json(figure)}</script>'
    )


def _header(context: Context, name: str) -> str:
    sweep = context.results.sweep or {}
    counts = trial_counts(context.trials)
    summary = ", ".join(f"{n} {label}" for label, n in counts.items())
    return (
        f"<header><h1>{_e(name)}</h1>"
        f"<p>{_e((sweep.get('spec') or {}).get('description'))}</p>"
        f'<p class="counts">{context.trials.num_rows} trials: {_e(summary)}</p></header>'
    )


def _about(context: Context, experiment: str) -> str:
    """The sweep's facts: where it is, its commit, command and times; its spec; its machines."""
    sweep = context.results.sweep or {}
    target = context.target
    facts = {
        "experiment": experiment,
        "git commit": sweep.get("git_commit"),
        "lbs-tune": sweep.get("lbs_tune_version"),
        "command": sweep.get("command") and shlex.join(sweep["command"]),
        "started": sweep.get("started"),
        "ended": sweep.get("ended") or ("running (not ended)" if sweep else None),
        "runs": len(sweep["runs"]) if sweep.get("runs") else None,
        "target": target and target_label(*target),
        "report written": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items() if v is not None)
    spec = sweep.get("spec")
    spec_block = (
        f"<details><summary>sweep spec</summary>"
        f"<pre>{_e(json.dumps(spec, indent=2, ensure_ascii=False))}</pre>"
        "</details>"
        if spec
        else ""
    )
    return f"<h2>The sweep</h2><dl>{rows}</dl>{machines_html(sweep)}{spec_block}"


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


# ---------------------------------------------------------------------------- The answer


def answer_html(context: Context, figure: str | None) -> str:
    """The answer section: one sentence, the numbers as a table, and the answer's figure."""
    if context.branches is not None:
        body = f'<p class="sentence">{_e(numbers.branch_sentence(context.branches))}</p>'
    elif context.summary is not None:
        found = numbers.tuned_answer(context.summary)
        body = f'<p class="sentence">{_e(numbers.tuned_sentence(found))}</p>' + "".join(
            _tuned_series_html(s, found.target) for s in found.series
        )
    elif context.target is not None and context.has(context.target[0]):
        found = numbers.fixed_answer(context.trials, context.history, *context.target)
        body = f'<p class="sentence">{_e(numbers.fixed_sentence(found))}</p>' + _fixed_html(found)
    else:
        body = (
            '<p class="sentence">This sweep has no target, so no steps to target: the figure '
            f"shows {_e(context.metric)} against batch size at its training budget (give "
            "<code>--target METRIC=VALUE</code> for steps to target).</p>"
        )
    return f'<section id="answer"><h2>Answer</h2>{body}{figure or ""}</section>'


def _spread(median: float | None, low: float | None, high: float | None, seeds: int) -> str:
    if median is None:
        return "not reached"
    if seeds > 1 and low is not None:
        top = "not reached" if high is None else numbers.number(high)
        return f"{numbers.number(median)} ({numbers.number(low)}–{top}, {seeds} seeds)"
    return numbers.number(median)


def _fixed_html(found: numbers.FixedAnswer) -> str:
    sizes = sorted({b for r in found.rules for b in r.batch_sizes})
    several = len(found.rules) > 1
    head = "".join(
        f"<th>lr.scaling {_e(r.rule)}</th>" if several else "<th>steps</th>" for r in found.rules
    )
    rows = []
    for b in sizes:
        cells = []
        for r in found.rules:
            if b not in r.batch_sizes:
                cells.append("<td></td>")
                continue
            i = r.batch_sizes.index(b)
            mark = ' class="last"' if b == r.scales_to else ""
            text = _spread(r.median[i], r.low[i], r.high[i], r.seeds[i])
            cells.append(f"<td{mark}>{_e(text)}</td>")
        rows.append(f"<tr><th>{b}</th>{''.join(cells)}</tr>")
    limits = "".join(f"<td>{_e(r.scales_to or '—')}</td>" for r in found.rules)
    rows.append(f"<tr><th>scales up to batch size</th>{limits}</tr>")
    return (
        f'<table class="answer"><thead><tr><th>batch size</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<p class="note">Steps to reach {_e(found.target)}: the best configuration at each '
        "batch size, median over seeds (min–max where there are several; a seed that never "
        f"reached it counts as the worst). A rule <em>scales</em> at batch size B while its "
        f"steps are at most {found.factor:g}× what perfect scaling (steps ∝ 1/B) predicts "
        "from its smallest batch size that reached the target; it stops at the first batch "
        "size that needs more. In S(B) = S_min (1 + B_crit / B) that holds up to about "
        "B_crit.</p>"
    )


def _tuned_series_html(series: numbers.TunedSeries, target: str) -> str:
    fit = series.fit
    facts = []
    if fit.b_crit is not None:
        method = f" ({_e(fit.method)})" if getattr(fit, "method", None) else ""
        facts = [
            ("B_crit (critical batch size)", numbers.with_interval(fit, "b_crit") + method),
            ("S_min (fewest steps)", numbers.with_interval(fit, "s_min")),
            ("E_min (fewest examples)", numbers.with_interval(fit, "e_min")),
            (
                "regimes",
                f"perfect scaling below {numbers.number(series.perfect_below)}, maximal data "
                f"parallelism above {numbers.number(series.maximal_above)} (B_crit / 4, "
                "4 B_crit)",
            ),
        ]
    listed = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    confirmed = any(p.confirmed is not None for p in series.points)
    capped = any(p.cap_hits is not None for p in series.points)
    head = ["batch size", f"best steps to {target}", "examples", "trials that reached it"]
    head += ["confirmed on fresh seeds"] * confirmed + ["trials at their step cap"] * capped
    rows = []
    for p in series.points:
        cells = [
            str(p.batch_size),
            _spread(p.steps, p.low, p.high, p.seeds),
            numbers.number(p.examples),
            f"{p.feasible} of {p.asked}",
        ]
        if confirmed:
            cells.append(_confirmed(p.confirmed))
        if capped:
            cells.append("" if p.cap_hits is None else str(p.cap_hits))
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    title = f"<h3>{_e(series.name)}</h3>" if series.name else ""
    return (
        f"{title}<dl>{listed}</dl>"
        f'<table class="answer"><thead><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _confirmed(steps: Steps | None) -> str:
    """A point's confirmed steps as median (low–high, n seeds)."""
    if steps is None:
        return ""
    return _spread(steps.median, steps.low, steps.high, steps.count)


# ---------------------------------------------------------------------------- The trials


def _table(context: Context) -> str:
    trials, history = context.results
    target, x = context.target, context.x
    # The searcher's study and point repeat the grid keys; its trial number stays.
    keys = [k for k in varying_keys(trials) if k not in ("search.study", "search.point")]
    columns = ["trial_id", "state", *keys, "diverged"]
    columns += [c for c in (f"final/{context.metric}", f"best/{context.metric}")]
    table = trials
    if target is not None and target[0] in history.column_names:
        label = f"{x} to reach {target_label(*target)}"
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
        f'<div class="table-wrap"><table class="sortable">\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def _cell(value: Any) -> str:
    """A table cell whose data-v holds the value to sort by (numbers as numbers)."""
    if value is None:
        return '<td data-v=""></td>'
    if isinstance(value, bool):
        return f'<td data-v="{int(value)}">{"yes" if value else ""}</td>'
    if isinstance(value, float):
        if not math.isfinite(value):
            return f'<td data-v="">{_e(value)}</td>'
        return f'<td data-v="{value!r}">{value:.4g}</td>'
    return f'<td data-v="{_e(value)}">{_e(value)}</td>'


_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1280px;
       padding: 0 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; font-family: monospace; overflow-wrap: anywhere; }
#answer { background: #f6f8fb; border: 1px solid #dde3ea; border-radius: 6px;
          padding: 0.4em 1.2em 1em; }
#answer h2 { border: none; margin-top: 0.6em; }
.sentence { font-size: 1.15em; max-width: 60em; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
table.answer td.last { font-weight: 700; }
.plot { width: 100%; min-height: 500px; margin: 1em 0; }
.table-wrap { max-width: 100%; max-height: 70vh; overflow: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right;
         white-space: nowrap; }
table.sortable th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
table.answer { background: white; margin: 0.6em 0; }
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
