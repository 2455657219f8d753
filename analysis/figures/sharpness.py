"""Sharpness, the top eigenvalue of the Hessian of the loss a step descends, over training per
batch size, with the optimizer's own stability limit beside each curve (dotted): along a
direction of higher curvature the iterates grow, and training rises to the limit and hovers
there, the edge of stability (Cohen et al. 2021). The limit is `lbs_tune.rules.stability_limit`
of each trial's optimizer at each report's `lr` (warmup and decay included): 2/lr for gradient
descent, 2(1 + β)/lr with heavy-ball momentum, 2(1 + β)/((1 + 2β)·lr) with Nesterov's. For AdamW
the curve is the preconditioned sharpness λ_max(P⁻¹H) and the limit 2(1 + β₁)/((1 − β₁)·lr)
(Cohen et al. 2022); LARS and LAMB have no such line."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa

from analysis._arrow import from_numpy, to_numpy
from analysis.figures._common import Curve
from analysis.figures._draw import batch_colour
from analysis.figures.noise_scale import Measured, measured_curves, render_curves

COLUMN = "sharpness/top_eig"
PRECONDITIONED = "sharpness/precond_top_eig"
SHOWN = "sharpness"  # the top eigenvalue, or for AdamW that of P⁻¹H: what the limit bounds
THRESHOLD = "stability limit"
# The trial's optimizer settings that the limit depends on.
OPTIMIZER_KEYS = ("optimizer.name", "optimizer.momentum", "optimizer.nesterov", "optimizer.betas")
MOVED_BETA1 = "optimizer/beta1"  # reported where the SDE rule moved it (lbs_tune.training)


class Sharpness(NamedTuple):
    sharpness: Measured
    threshold: list[Curve]  # the stability limit at the same reports, per rule and batch size


def limits(trials: pa.Table) -> dict[str, tuple[float, bool]]:
    """Per trial id: lr times its optimizer's stability limit (the limit is this over lr; NaN
    for none) and whether the limit bounds the preconditioned sharpness (AdamW). A setting
    missing from the table is the trial config's default."""
    # Imported here: reading an experiment needs no trial-config models.
    from lbs_tune.config import OptimizerConfig
    from lbs_tune.rules import stability_limit

    default = OptimizerConfig()
    found = {}
    columns = [k for k in OPTIMIZER_KEYS if k in trials.column_names]
    for row in trials.select(["trial_id", *columns]).to_pylist():

        def setting(key: str, row: dict = row):
            value = row.get(f"optimizer.{key}")
            return getattr(default, key) if value is None else value

        betas = setting("betas")
        if isinstance(betas, str):  # list-valued config keys may come as text
            betas = [float(b) for b in betas.strip("[]()").split(",")]
        name = setting("name")
        limit = stability_limit(name, 1.0, setting("momentum"), setting("nesterov"), tuple(betas))
        found[row["trial_id"]] = (math.nan if limit is None else limit, name == "adamw")
    return found


def extract(
    trials: pa.Table,
    history: pa.Table,
    x: str = "epoch",
    metric: str = "val/accuracy",
    keep: Collection[str] | None = None,
) -> Sharpness:
    """Sharpness (preconditioned for AdamW) and the stability limit over training for the
    trials shown (see `noise_scale.measured_curves`), both at the reports that measured it."""
    per_trial = limits(trials)
    ids = history["trial_id"].to_pylist()
    factor = np.array([per_trial.get(i, (math.nan, False))[0] for i in ids], dtype=float)
    adam = np.array([per_trial.get(i, (math.nan, False))[1] for i in ids], dtype=bool)
    if MOVED_BETA1 in history.column_names:
        # The SDE rule moves Adam's beta1 with the batch: its limit is that of the beta1 each
        # report trained with (the loop reports it), not the config's.
        from lbs_tune.rules import stability_limit

        moved = to_numpy(history[MOVED_BETA1], np.nan).astype(float)
        for i in np.flatnonzero(adam & np.isfinite(moved)):
            # (beta2 does not enter Adam's limit: only beta1 is read.)
            factor[i] = stability_limit("adamw", 1.0, betas=(moved[i], math.nan))
    top = to_numpy(history[COLUMN], np.nan).astype(float)
    if PRECONDITIONED in history.column_names:
        preconditioned = to_numpy(history[PRECONDITIONED], np.nan).astype(float)
    else:
        preconditioned = np.full(len(top), np.nan)
    shown = np.where(adam, preconditioned, top)
    lr = to_numpy(history["lr"], np.nan).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = np.where(np.isfinite(shown) & (lr > 0), factor / lr, np.nan)
    history = history.append_column(SHOWN, from_numpy(shown, np.isfinite(shown)))
    history = history.append_column(THRESHOLD, from_numpy(limit, np.isfinite(limit)))
    sharp = measured_curves(trials, history, SHOWN, x, metric, keep)
    threshold = measured_curves(trials, history, THRESHOLD, x, metric, keep).curves
    return Sharpness(sharp, threshold)


def render(data: Sharpness) -> go.Figure:
    fig = render_curves(
        data.sharpness,
        "sharpness (top Hessian eigenvalue of the training loss; for AdamW of P⁻¹H) during "
        "training, and the optimizer's stability limit (dotted): the edge of stability "
        "(Cohen et al. 2021, 2022)",
    )
    panels = data.sharpness.panels or [""]
    sizes = sorted({c.batch_size for c in data.sharpness.curves}) or [1]
    for curve in data.threshold:
        if curve.panel not in panels:
            continue
        fig.add_trace(
            go.Scatter(
                x=curve.x,
                y=curve.median,
                mode="lines",
                line={"dash": "dot", "color": batch_colour(curve.batch_size, sizes)},
                name=f"limit, B={curve.batch_size}",
                legendgroup=f"B={curve.batch_size}",
                showlegend=False,
            ),
            row=1,
            col=panels.index(curve.panel) + 1,
        )
    return fig
