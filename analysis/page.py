"""The report's page: which figures it shows, and in which order (its HTML: `analysis.html`).

`SECTIONS` is the one list of the page's figures. Each `Section` names its figure (the id of
its `<div>` and of its JSON), says whether it applies to a sweep (`applies`, cheap: the kind of
sweep and the columns present) and draws it (`draw`: a plotly figure, or None when the data
leave nothing to draw). Adding a figure is a module in `analysis/figures/` and one entry here.
The first drawn section marked `answer` goes into the answer at the top of the page, beside the
numbers and the sentence of `analysis.answer`; the rest follow in list order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa

from analysis._arrow import to_numpy
from analysis.figures import (
    best_lr,
    evaluation_curves,
    exact_steps,
    learning_curves,
    learning_rates,
    local_cbs,
    metric_vs_batch_size,
    noise_scale,
    parallel_coordinates,
    pareto,
    search_budget,
    sharpness,
    steps_to_target,
    study_objective,
    throughput,
    tuned_steps,
)

if TYPE_CHECKING:
    from analysis.known import Exact
    from analysis.summary import Summary
    from analysis.tables import Results
    from lbs_tune.names import Mode


class Context(NamedTuple):
    """What the page is drawn from: the sweep's tables, its metric and target, the learning
    curves' x axis, and where they exist its studies' Summary, the checkpoints' evaluation
    table (`lbs-tune evaluate`), fixed-rule sweeps to compare (label, Results) and the search
    space of its record ({dotted key: {kind: ...}}), and for a workload with a known answer
    its exact values (`analysis.known.known_answer`)."""

    results: Results
    metric: str = "val/accuracy"
    target: tuple[str, float] | None = None
    x: str = "step"
    summary: Summary | None = None
    evaluation: pa.Table | None = None
    compared: Sequence[tuple[str, Results]] = ()
    space: dict[str, Any] | None = None
    exact: Sequence[Exact] | None = None  # a sweep with a known answer (analysis.known)
    branches: dict[str, Any] | None = None  # a branched sweep's numbers (analysis.branches)
    mode: Mode | None = None  # the sweep's mode of `metric` (its spec's `metric.mode`)

    @property
    def trials(self) -> pa.Table:
        return self.results.trials

    @property
    def history(self) -> pa.Table:
        return self.results.history

    def mode_of(self, metric: str) -> Mode | None:
        """The sweep's own mode of `metric`: given for its metric (`metrics.better`)."""
        return self.mode if metric == self.metric else None

    @property
    def tuned(self) -> bool:
        return self.summary is not None

    @property
    def best(self) -> set[str] | None:
        """The trials drawn over training: the studies' best (None for a fixed-rule sweep)."""
        return best_trial_ids(self.summary)

    def has(self, column: str) -> bool:
        """Whether the history has `column` with a value somewhere."""
        if column not in self.history.column_names:
            return False
        return bool(np.isfinite(to_numpy(self.history[column], np.nan).astype(float)).any())


def best_trial_ids(summary: Summary | None) -> set[str] | None:
    """The Ray trial ids of the studies' best trials (None without a summary)."""
    if summary is None:
        return None
    return {p.best["ray_trial_id"] for p in summary.points if p.best and p.best["ray_trial_id"]}


class Section(NamedTuple):
    id: str
    applies: Callable[[Context], bool]
    draw: Callable[[Context], go.Figure | None]
    answer: bool = False  # a candidate for the figure of the answer


def _steps_objective(c: Context) -> bool:
    return c.summary is not None and c.summary.objective.kind == "steps_to_target"


def _nonempty(figure_data: Any, field: str, render: Callable[[Any], go.Figure]) -> go.Figure | None:
    return render(figure_data) if getattr(figure_data, field) else None


def _tuned_steps(c: Context) -> go.Figure:
    fixed = [("this sweep", c.trials, c.history)]
    fixed += [(name, r.trials, r.history) for name, r in c.compared]
    return tuned_steps.render(tuned_steps.extract(c.summary, fixed))


def _learning_curves(metric: Callable[[Context], str]) -> Callable[[Context], go.Figure]:
    """The learning curves of `metric(context)`: each study's best trial in a searched sweep."""

    def draw(c: Context) -> go.Figure:
        shown = metric(c)
        data = learning_curves.extract(c.trials, c.history, shown, c.x, c.best, c.mode_of(shown))
        return learning_curves.render(data, "best trial of each study" if c.tuned else "")

    return draw


def _noise_vs_critical(c: Context) -> go.Figure | None:
    versus = noise_scale.extract_versus(c.summary, c.history)
    return noise_scale.render_versus(versus) if versus.batch_sizes else None


def _parallel(c: Context) -> go.Figure | None:
    if c.tuned:
        data = parallel_coordinates.extract_studies(c.summary, c.space)
    else:
        data = parallel_coordinates.extract(c.trials, c.metric)
    # One axis alone is a figure of its own elsewhere (against batch size).
    return parallel_coordinates.render(data) if len(data.dimensions) >= 2 else None


SECTIONS: tuple[Section, ...] = (
    # A workload with a known answer (the noisy quadratic model): measured against exact, first.
    Section(
        "exact-steps",
        lambda c: c.tuned and bool(c.exact),
        lambda c: exact_steps.render(exact_steps.extract(c.summary, c.exact)),
        answer=True,
    ),
    # A branched sweep: the local critical batch size over training from its probes.
    Section(
        "local-cbs",
        lambda c: c.branches is not None,
        lambda c: local_cbs.render(local_cbs.extract(c.results, c.summary)),
        answer=True,
    ),
    Section("tuned-steps", lambda c: c.tuned, _tuned_steps, answer=True),
    Section(
        "steps-to-target",
        lambda c: not c.tuned and c.target is not None and c.has(c.target[0]),
        lambda c: steps_to_target.render(steps_to_target.extract(c.trials, c.history, *c.target)),
        answer=True,
    ),
    # A fixed training budget's score: no sense for studies whose trials stop at the target.
    Section(
        "metric-vs-batch-size",
        lambda c: not _steps_objective(c) and f"final/{c.metric}" in c.trials.column_names,
        lambda c: metric_vs_batch_size.render(
            metric_vs_batch_size.extract(c.trials, c.metric, c.mode)
        ),
        answer=True,
    ),
    Section(
        "pareto",
        lambda c: c.tuned,
        lambda c: _nonempty(pareto.extract(c.summary), "series", pareto.render),
    ),
    Section(
        "best-lr",
        lambda c: c.tuned,
        lambda c: _nonempty(best_lr.extract(c.summary), "series", best_lr.render),
    ),
    Section(
        "search-budget",
        _steps_objective,
        lambda c: _nonempty(search_budget.extract(c.summary), "studies", search_budget.render),
    ),
    Section(
        "study-objective",
        lambda c: c.tuned,
        lambda c: study_objective.render(study_objective.extract(c.summary)),
    ),
    Section("learning-curves", lambda c: c.has(c.metric), _learning_curves(lambda c: c.metric)),
    Section(
        "loss-curves",
        lambda c: c.metric != "train/loss" and c.has("train/loss"),
        _learning_curves(lambda c: "train/loss"),
    ),
    Section(
        "evaluation",
        lambda c: c.evaluation is not None and c.evaluation.num_rows > 0,
        lambda c: evaluation_curves.render(evaluation_curves.extract(c.trials, c.evaluation)),
    ),
    # Each trial's LR as its rule set it; a searched LR has its own figures above.
    Section(
        "learning-rate",
        lambda c: not c.tuned and c.has("lr"),
        lambda c: learning_rates.render(learning_rates.extract(c.trials, c.history)),
    ),
    Section(
        "noise-scale",
        lambda c: c.has(noise_scale.COLUMN),
        lambda c: noise_scale.render(
            noise_scale.extract(c.trials, c.history, c.x, c.metric, c.best)
        ),
    ),
    Section(
        "noise-scale-hessian",
        lambda c: c.has(noise_scale.HESSIAN_COLUMN),
        lambda c: noise_scale.render(
            noise_scale.measured_curves(
                c.trials, c.history, noise_scale.HESSIAN_COLUMN, c.x, c.metric, c.best
            )
        ),
    ),
    Section(
        "noise-vs-critical",
        lambda c: c.tuned and c.has(noise_scale.COLUMN),
        _noise_vs_critical,
    ),
    Section(
        "sharpness",
        lambda c: c.has(sharpness.COLUMN),
        lambda c: sharpness.render(sharpness.extract(c.trials, c.history, c.x, c.metric, c.best)),
    ),
    Section(
        "throughput",
        lambda c: c.has("images_per_s") or c.has("time_s"),
        lambda c: throughput.render(throughput.extract(c.trials, c.history)),
    ),
    Section("parallel-coordinates", lambda c: c.trials.num_rows > 0, _parallel),
)


def build_figures(context: Context) -> dict[str, go.Figure]:
    """The page's figures by section id, in page order: every section of SECTIONS that
    applies and has something to draw (each in the page's look: `_draw.finish`)."""
    drawn = {}
    for section in SECTIONS:
        if not section.applies(context):
            continue
        figure = section.draw(context)
        if figure is not None:
            drawn[section.id] = figure
    return drawn


def answer_figure(drawn: dict[str, go.Figure]) -> str | None:
    """The id of the figure shown in the answer: the first drawn section marked `answer`."""
    marked = [s.id for s in SECTIONS if s.answer]
    return next((i for i in drawn if i in marked), None)
