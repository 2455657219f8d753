"""The sweep's figures, one module per figure as in Optuna's visualization package: each has
`extract(...)`, a pure function from the loaded tables to a small named tuple (tested without
drawing), and `render(data)`, which draws that tuple with plotly. The data preparation they share
(trials shown, medians over seeds, best configuration per batch size, steps to a target) is in
`analysis.metrics`; drawing helpers are in `_draw`.

Conventions: one panel or line per LR rule (`lr.scaling`); batch sizes on a log2 axis; seeds
aggregated as the median with a min–max band; for a searched sweep (lr.base or another key
varies besides batch size, rule and seed) the best configuration per batch size; errored trials
left out (a crash is not a result) while diverged ones stay in and are marked (divergence is).
"""

from analysis.figures import (
    evaluation_curves,
    learning_curves,
    learning_rates,
    metric_vs_batch_size,
    parallel_coordinates,
    steps_to_target,
    throughput,
)

__all__ = [
    "evaluation_curves",
    "learning_curves",
    "learning_rates",
    "metric_vs_batch_size",
    "parallel_coordinates",
    "steps_to_target",
    "throughput",
]
