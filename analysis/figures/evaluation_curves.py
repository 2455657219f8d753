"""The checkpoints' scores (`lbs-tune evaluate`: loss, accuracy, perplexity, mIoU) against
their step, per split: as the learning curves, a curve per LR rule and batch size with the
median and band over seeds."""

from __future__ import annotations

from typing import Any, NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis.figures import learning_curves
from analysis.figures._draw import (
    RULE_DASHES,
    axis_title,
    batch_colour,
    curve_traces,
    finish,
    series_name,
    spread_note,
)

SPLITS = ("train", "val", "test")


# The scores drawn, a row each, when some checkpoint has them (pixel accuracy is a
# segmentation task's accuracy again).
KINDS = ("loss", "accuracy", "perplexity", "miou")


class EvaluationCurves(NamedTuple):
    """One LearningCurves per `<split>/<kind>` present, a row per kind (loss, accuracy,
    perplexity, miou: those with a value), splits in train, val, test order."""

    splits: list[str]
    kinds: list[str]
    curves: list[learning_curves.LearningCurves]


def extract(trials: pa.Table, evaluation: pa.Table) -> EvaluationCurves:
    """From the rows of evaluation.parquet (trial_id, step, split and a column per score): the
    table turned wide (a `<split>/<kind>` column per split and kind), then learning curves of
    each."""
    present = set(evaluation["split"].to_pylist())
    splits = [s for s in SPLITS if s in present]
    kinds = [
        k
        for k in KINDS
        if k in evaluation.column_names and evaluation[k].null_count < evaluation.num_rows
    ]
    metrics = [f"{split}/{kind}" for kind in kinds for split in splits]
    wide: dict[tuple[str, int], dict[str, Any]] = {}
    for r in evaluation.to_pylist():
        row = wide.setdefault(
            (r["trial_id"], r["step"]),
            {"trial_id": r["trial_id"], "step": r["step"]} | dict.fromkeys(metrics),
        )
        for kind in kinds:
            row[f"{r['split']}/{kind}"] = r[kind]
    schema = pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64())] + [(m, pa.float64()) for m in metrics]
    )
    table = pa.Table.from_pylist([wide[k] for k in sorted(wide)], schema)
    return EvaluationCurves(
        splits, kinds, [learning_curves.extract(trials, table, m) for m in metrics]
    )


def render(data: EvaluationCurves) -> go.Figure:
    """A row per kind of score (losses on top), a column per split; colour runs over
    log2(batch size), the dash tells the LR rule."""
    columns = len(data.splits) or 1
    rows = len(data.kinds) or 1
    fig = make_subplots(
        rows=rows, cols=columns, subplot_titles=[c.metric for c in data.curves], shared_xaxes=True
    )
    sizes = sorted({c.batch_size for lc in data.curves for c in lc.curves})
    rules = sorted({c.panel for lc in data.curves for c in lc.curves})
    for number, lc in enumerate(data.curves):
        row, col = divmod(number, columns)
        for curve in lc.curves:
            line = {
                "color": batch_colour(curve.batch_size, sizes),
                "dash": RULE_DASHES[rules.index(curve.panel) % len(RULE_DASHES)],
            }
            name = f"B={curve.batch_size} {series_name(curve.panel, rules)}".strip()
            # Checkpoints are few: markers show where each one is.
            for part in curve_traces(curve, name, line, number == 0, "lines+markers"):
                fig.add_trace(part, row=row + 1, col=col + 1)
    fig.update_xaxes(title_text=f"checkpoint ({axis_title('step')})", row=rows)
    for row, kind in enumerate(data.kinds, start=1):
        fig.update_yaxes(title_text=kind, row=row, col=1)
    seeds = max((lc.seeds for lc in data.curves), default=1)
    title = f"checkpoints evaluated by lbs-tune evaluate{spread_note(seeds)}"
    return finish(fig, title, rows, legend="batch size")
