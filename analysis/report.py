"""`lbs-tune report`: one self-contained HTML file per sweep, readable offline.

This module reads the experiment, decides the defaults (target, x axis), asks `analysis.page`
for the figures and the page, and writes: report.html and, for a searched sweep, summary.json,
each atomically (`lbs_tune.storage`: an earlier report stays whole until the new one is
complete, and a write that fails, a full disk above all, leaves no partial file and is one line
naming the path); with `--static`, every figure as PNG, PDF and SVG (kaleido).

plotly.js is inlined once; each figure travels as JSON in `<script type="application/json"
id="fig-NAME">` and a few lines of JavaScript draw it, so tests (and anyone) can read the data
back.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io

from analysis.branches import branches_json
from analysis.html import render_html
from analysis.known import known_answer
from analysis.load import experiment_location, load, load_evaluation
from analysis.metrics import distinct_batch_sizes
from analysis.page import Context, build_figures
from analysis.summary import read_summary
from analysis.summary_json import summary_path, write_summary
from lbs_tune.errors import UserError, cut, did_you_mean
from lbs_tune.experiment import REPORT_FILE, SWEEP_FILE
from lbs_tune.names import METRICS
from lbs_tune.storage import locate

X_AXES = ("step", "examples", "epoch")
STATIC_FORMATS = ("png", "pdf", "svg")
KALEIDO = (
    "pip install kaleido (and, where no Chrome or Chromium is installed, run "
    "plotly_get_chrome); or leave out --static for the HTML report alone"
)


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
    x: str | None = None,
    static: Path | None = None,
    compare: Sequence[Any] = (),
) -> Path:
    """Write the HTML report of an experiment (folder path, URI or ResultGrid); return its path.

    The page opens with the sweep's answer (`analysis.answer`), then the figures that apply
    (`analysis.page.SECTIONS`). A searched sweep (Optuna studies) also gets `summary.json`
    beside the page; `compare` names experiments whose fixed-rule steps to target are drawn
    beside the tuned ones.

    `out` defaults to `<experiment>/report.html` (`./<name>-report.html` for remote storage);
    `target` (metric, value) defaults to the sweep spec's target; `x` is the axis of the
    figures over training (step, examples or epoch; default: examples when the trials have
    several batch sizes, else step). With `static`, every figure is also written there as PNG,
    PDF and SVG; without kaleido that is a UserError before anything is read. Works on a
    running sweep (whatever results exist so far). When `lbs-tune evaluate` has written
    `<experiment>/evaluation.parquet`, the checkpoints' curves per split are added.
    """
    if x is not None and x not in X_AXES:
        raise UserError(f"x axis '{x}': choose one of {', '.join(X_AXES)}")
    if static is not None and importlib.util.find_spec("kaleido") is None:
        raise UserError(f"--static {static}: static figures need kaleido: {KALEIDO}")
    where = experiment_location(source)
    results = load(source)
    spec = (results.sweep or {}).get("spec") or {}
    metric = (spec.get("metric") or {}).get("name") or "val/accuracy"
    mode = (spec.get("metric") or {}).get("mode")
    if target is None and spec.get("target"):
        target = (spec["target"]["metric"], spec["target"]["value"])
    for name in (metric, target and target[0]):
        if name and name not in METRICS:  # a record of another version of lbs-tune
            raise UserError(
                f"{where.join(SWEEP_FILE).uri}: the sweep's metric '{cut(name)}' is not one this "
                f"lbs-tune reports{did_you_mean(name, METRICS)}; report it with the version "
                "that ran it"
            )
    if x is None:
        x = "examples" if distinct_batch_sizes(results.trials) > 1 else "step"
    summary = read_summary(where, results.sweep, target)
    compared = [(experiment_location(c).name, load(c)) for c in compare]
    if compared and summary is None:
        raise UserError(
            f"--compare: {where.uri} has no studies (no search section); --compare draws "
            "fixed-rule sweeps beside a tuned one"
        )
    context = Context(
        results,
        metric,
        target,
        x,
        summary,
        load_evaluation(source),
        compared,
        (spec.get("search") or {}).get("space"),
        known_answer(where) if summary is not None else None,
        branches_json(results),
        mode if mode in ("max", "min") else None,
    )
    drawn = build_figures(context)
    named = f"-o {out}" if out is not None else None  # as the user wrote it
    if out is None:
        remote = Path(f"{where.name}-report.html")
        out = Path(where.path) / REPORT_FILE if where.is_local else remote
    out = Path(out)
    page = render_html(context, drawn, where.uri).encode()
    with writing(named or str(out), len(page)), locate(out).atomic_output() as f:
        f.write(page)
    if summary is not None or context.branches is not None:
        with writing(str(summary_path(out))):
            write_summary(summary, summary_path(out), context.exact, context.branches)
    if static is not None:
        write_static(drawn, Path(static), out)
    return out


@contextlib.contextmanager
def writing(path: str, size: int | None = None) -> Iterator[None]:
    """An atomic write of `path` (of `size` bytes, where known) that fails, a full disk above
    all, is one line naming the path and the space it needs: the atomic writer left no partial
    file, and an earlier file there as it was."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc).splitlines()[0]
        needs = f"; it needs {size / 1e6:.1f} MB" if size else ""
        raise UserError(
            f"{path}: cannot write there ({reason}{needs}); free space or choose another path "
            "with -o (an earlier file there is left as it was)"
        ) from None


def write_static(drawn: dict[str, go.Figure], folder: Path, page: Path) -> None:
    """Write each figure as PNG, PDF and SVG into `folder`; kaleido that cannot render (no
    Chrome to drive) is a UserError that says what to install."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        (fig, folder / f"{name}.{fmt}") for name, fig in drawn.items() for fmt in STATIC_FORMATS
    ]
    try:
        plotly.io.write_images([f for f, _ in names], [p for _, p in names])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise UserError(
            f"--static {folder}: {cut(reason, 200)}; {KALEIDO} (the HTML report is written: {page})"
        ) from None
