"""The sweep's figures, one module per figure as in Optuna's visualization package: each has
`extract(...)`, a pure function from the loaded tables (or a study `Summary`) to a small named
tuple (tested without drawing), and `render(data)`, which draws that tuple with plotly. The
numbers they draw come from `analysis.metrics`, `analysis.scaling`, `analysis.summary` and
`analysis.answer`; drawing helpers (the look, colours, log ticks, units) are in `_draw`. Which
figures the report shows, in which order, is `analysis.page.SECTIONS`.

Conventions: one panel or line per LR rule (`lr.scaling`) where rules vary; batch sizes on a
log2 axis; seeds aggregated as the median with a min–max band where there are several; for a
searched sweep the best configuration per batch size; errored trials left out (a crash is not a
result) while diverged ones stay in and are marked (divergence is).

This package's `__init__` imports nothing: import each figure's module by name.
"""
