"""The checkpoints' loss and accuracy (`lbs-tune evaluate`) against their step, per split: as
the learning curves, a curve per LR rule and batch size with the median and band over seeds."""

from __future__ import annotations

from typing import Any, NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis.figures import learning_curves
from analysis.figures._draw import RULE_DASHES, batch_colour, curve_traces

SPLITS = ("train", "val", "test")


class EvaluationCurves(NamedTuple):
    """One LearningCurves per `<split>/loss` and `<split>/accuracy` present, losses first,
    splits in train, val, test order."""

    splits: list[str]
    curves: list[learning_curves.LearningCurves]


def extract(trials: pa.Table, evaluation: pa.Table) -> EvaluationCurves:
    """From the rows of evaluation.parquet (trial_id, step, split, loss, accuracy): the table
    turned wide (a `<split>/<kind>` column per split and kind), then learning curves of each."""
    present = set(evaluation["split"].to_pylist())
    splits = [s for s in SPLITS if s in present]
    metrics = [f"{split}/{kind}" for kind in ("loss", "accuracy") for split in splits]
    wide: dict[tuple[str, int], dict[str, Any]] = {}
    for r in evaluation.to_pylist():
        row = wide.setdefault(
            (r["trial_id"], r["step"]),
            {"trial_id": r["trial_id"], "step": r["step"]} | dict.fromkeys(metrics),
        )
        row[f"{r['split']}/loss"], row[f"{r['split']}/accuracy"] = r["loss"], r["accuracy"]
    schema = pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64())] + [(m, pa.float64()) for m in metrics]
    )
    table = pa.Table.from_pylist([wide[k] for k in sorted(wide)], schema)
    return EvaluationCurves(splits, [learning_curves.extract(trials, table, m) for m in metrics])


def render(data: EvaluationCurves) -> go.Figure:
    """Losses in the top row, accuracies below, a column per split; colour runs over
    log2(batch size), the dash tells the LR rule."""
    columns = len(data.splits) or 1
    fig = make_subplots(
        rows=2, cols=columns, subplot_titles=[c.metric for c in data.curves], shared_xaxes=True
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
            name = f"B={curve.batch_size} {curve.panel}"
            # Checkpoints are few: markers show where each one is.
            for part in curve_traces(curve, name, line, number == 0, "lines+markers"):
                fig.add_trace(part, row=row + 1, col=col + 1)
    fig.update_xaxes(title_text="checkpoint step", row=2)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", row=2, col=1)
    fig.update_layout(
        title="checkpoints evaluated by lbs-tune evaluate (median and min–max over seeds)"
    )
    return fig
