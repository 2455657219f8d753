"""How long the noisy quadratic model's exact answer (lbs_tune.nqm) takes on one core.

Each case prints one JSON line: its name, the wall seconds (the median of --repeat runs), and
the best steps it found per batch size. The cases: issue 24's check (d = 1000, h_i = 1/i, C = H,
target 1% of the initial loss, plain SGD, 200 rates, batch sizes 1 to 8192), the same with the
rate refined between grid points, heavy ball and Nesterov (momentum 0.9, 200 rates) at three batch
sizes, and a momentum range searched jointly with the rate at one batch size.

    python benchmarks/nqm.py [--repeat 3] [--dim 1000]
"""

# ruff: noqa: E402  (the path fix below must run before the package imports)
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on the path and its name hides the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lbs_tune import nqm

LR_RANGE = (1e-3, 1.99)  # the grid that gives the figures (tests/test_nqm.py)
MAX_STEPS = 10**6


def cases(dim: int) -> dict:
    """Name -> (batch sizes, keyword arguments of nqm.exact_steps beyond the problem)."""
    plain = {"lr_range": LR_RANGE, "max_steps": MAX_STEPS}
    return {
        "plain_grid": ([2**k for k in range(14)], {**plain, "refine": 0}),
        "plain_refined": ([2**k for k in range(14)], plain),
        "heavy_ball_0.9": ([16, 128, 8192], {**plain, "momentum": 0.9, "refine": 0}),
        "nesterov_0.9": (
            [16, 128, 8192],
            {**plain, "momentum": 0.9, "nesterov": True, "refine": 0},
        ),
        "momentum_range": ([128], {**plain, "momentum": nqm.Uniform(0.0, 0.99), "refine": 1}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--only", help="comma-separated case names")
    args = parser.parse_args(argv)
    q = nqm.quadratic(dim=args.dim, power=1.0)
    target = 0.01 * nqm.initial_loss(q)
    chosen = cases(args.dim)
    if args.only:
        chosen = {name: chosen[name] for name in args.only.split(",")}
    for name, (batch_sizes, options) in chosen.items():
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            curve = nqm.exact_steps(batch_sizes, q, target, **options)
            times.append(time.perf_counter() - started)
        steps = {str(b): best.steps for b, best in zip(batch_sizes, curve, strict=True)}
        line = {"case": name, "dim": args.dim, "wall_s": round(statistics.median(times), 3)}
        print(json.dumps({**line, "steps": steps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
