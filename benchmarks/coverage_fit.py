"""Coverage of the critical-batch-size intervals (analysis.scaling) on synthetic sweeps with a
known truth: S_min 22.6 and B_crit 217 (the quickstart_tuned sweep's fit).

Profile likelihood (`fit_scaling`): log-normal noise of sigma 0.1 and 0.2 on the steps at 8
batch sizes (16..2048), three sets of 6, and 4 batch sizes seen by 3 seeds each. Hierarchical
bootstrap (`bootstrap_studies`): per seed a seed effect of sigma `--seed-spread` on the steps,
per trial a learning-rate miss exp(|N(0, 0.3)|) that only costs steps; 8 trials per study, 3
and 5 seeds. Best-of-n selection biases the steps by a factor common to every batch size, so
only B_crit has a known truth there. One line per setting: the share of the 95% intervals
that hold the truth, per parameter.

    python benchmarks/coverage_fit.py [--sweeps 1000] [--bootstrap-sweeps 200]
"""

# ruff: noqa: E402  (the path fix below must run before the package imports)
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from analysis.scaling import bootstrap_studies, fit_scaling

S_MIN, B_CRIT = 22.6, 217.0
TRUTH = {"s_min": S_MIN, "e_min": S_MIN * B_CRIT, "b_crit": B_CRIT}


def steps(b) -> np.ndarray:
    return S_MIN * (1 + B_CRIT / np.asarray(b, dtype=float))


def covered(fit, names) -> dict[str, bool]:
    return {n: fit.intervals[n][0] <= TRUTH[n] <= fit.intervals[n][1] for n in names}


def profile_coverage(sizes: np.ndarray, sigma: float, sweeps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(TRUTH, 0)
    for _ in range(sweeps):
        fit = fit_scaling(sizes, steps(sizes) * np.exp(rng.normal(0, sigma, len(sizes))))
        for name, hit in covered(fit, TRUTH).items():
            hits[name] += hit
    return {name: count / sweeps for name, count in hits.items()}


def bootstrap_coverage(seeds: int, spread: float, sweeps: int, resamples: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = 2.0 ** np.arange(4, 12)
    hits = 0
    for _ in range(sweeps):
        studies = [
            [
                list(s * math.exp(rng.normal(0, spread)) * np.exp(np.abs(rng.normal(0, 0.3, 8))))
                for _ in range(seeds)
            ]
            for s in steps(sizes)
        ]
        fit = bootstrap_studies(
            sizes, studies, resamples=resamples, seed=int(rng.integers(1e9))
        ).fit
        hits += covered(fit, ["b_crit"])["b_crit"]
    return {"b_crit": hits / sweeps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=1000)
    parser.add_argument("--bootstrap-sweeps", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--seed-spread", type=float, default=0.1)
    args = parser.parse_args()
    print(f"95% intervals, share holding the truth (S_min {S_MIN}, B_crit {B_CRIT:g})")
    settings = [
        ("16..2048 (8)", 2.0 ** np.arange(4, 12)),
        ("16..512 (6)", 2.0 ** np.arange(4, 10)),
        ("32..1024 (6)", 2.0 ** np.arange(5, 11)),
        ("64..2048 (6)", 2.0 ** np.arange(6, 12)),
        ("16,64,256,1024 x 3 seeds", np.repeat(4.0 ** np.arange(2, 6), 3)),
    ]
    for label, sizes in settings:
        for sigma in (0.1, 0.2):
            start = time.perf_counter()
            coverage = profile_coverage(sizes, sigma, args.sweeps, seed=1)
            ms = (time.perf_counter() - start) / args.sweeps * 1e3
            shown = "  ".join(f"{k} {v:.1%}" for k, v in coverage.items())
            print(f"profile    {label:26} sigma {sigma}: {shown}  ({ms:.1f} ms a fit)")
    for seeds in (3, 5):
        coverage = bootstrap_coverage(
            seeds, args.seed_spread, args.bootstrap_sweeps, args.resamples, seed=2
        )
        label = f"{seeds} seeds x 8 trials"
        print(
            f"bootstrap  {label:26} seed sigma {args.seed_spread}: "
            f"b_crit {coverage['b_crit']:.1%} ({args.bootstrap_sweeps} sweeps)"
        )


if __name__ == "__main__":
    main()
