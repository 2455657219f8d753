"""Loading a sweep's results: Ray's ExperimentAnalysis beside analysis.load, process by process.

A real Ray Tune experiment (a real Tuner running a trivial function trainable that reports our
metric names; by default 10 batch sizes x 3 LR rules x 10 seeds = 300 trials x 200 reports) is
built once under --folder and reused by later runs. On it this times, each in a fresh Python
process as a user runs it (imports included): Ray's `ExperimentAnalysis(path)` + `.dataframe()`
+ `.trial_dataframes`, and our first load (cache removed); then in this process our cached load
and the HTML report. Then the same on a folder of --big trials synthesised from the real one,
since running 10,000 real trials takes too long here: new trial ids in a rewritten
experiment_state file, each trial folder hard-linked to a real one's result.json and params.json.
Each measurement is one JSON line on stdout (wall seconds, the median of --repeat runs taken in
turn with Ray's, and the processes' CPU seconds); the last lines compare with the targets.

    python benchmarks/analysis.py [--seeds 10] [--reports 200] [--big 10000] [--repeat 3]
    python benchmarks/analysis.py --tiny    # seconds: the committed tests/experiments/quickstart
"""

# ruff: noqa: E402  (the path fix below must run before the package imports)
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder comes first on the path and its name hides the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from analysis import load
from analysis.report import write_report
from lbs_tune.experiment import CACHE_DIR, PARAMS_FILE, RESULT_FILE, SWEEP_FILE
from lbs_tune.names import set_dotted
from lbs_tune.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"
# The committed experiment that --tiny measures (12 trials of a real tiny sweep).
TINY = ROOT / "tests" / "experiments" / "quickstart"
# 8 to 4096: all within the quickstart's 18,000 training examples.
BATCH_SIZES = [2**k for k in range(3, 13)]
RULES = ["none", "linear", "sqrt"]
# Targets: the first load takes at most this share of Ray's time; a cached load at most this long.
FIRST_LOAD_SHARE = 1 / 5
CACHED_LOAD_S = 0.2
# What each process runs on the folder in argv[1]; its last stdout line is the counts as JSON.
LOADERS = {
    "ray": (
        "from ray.tune import ExperimentAnalysis\n"
        "a = ExperimentAnalysis(sys.argv[1])\n"
        "frame, frames = a.dataframe(), a.trial_dataframes\n"
        "print(json.dumps([len(frame), sum(len(f) for f in frames.values())]))"
    ),
    "ours": (
        "import analysis\n"
        "trials, history = analysis.load(sys.argv[1])\n"
        "print(json.dumps([trials.num_rows, history.num_rows]))"
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="trials = 30 x seeds")
    parser.add_argument("--reports", type=int, default=200, help="reports per trial")
    parser.add_argument("--big", type=int, default=10_000, help="trials of the synthesised folder")
    parser.add_argument("--repeat", type=int, default=3, help="timings per figure (median)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/lbs-bench-analysis"))
    parser.add_argument(
        "--no-ray-big", action="store_true", help="skip Ray's loader on the big folder"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"measure a copy of {TINY.relative_to(ROOT)} and 60 trials made of it, once each "
        "(seconds; what tests/test_benchmarks.py runs)",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.big, args.repeat = 60, 1
    return args


# ============================================================================ Folders


def build_real(folder: Path, seeds: int, reports: int) -> Path:
    """A real Tune experiment of the quickstart config over batch size x rule x seed."""
    # v2: reports carry total_steps and peak_lr, as the training loop's do.
    experiment = folder / f"real-v2-{seeds}seeds-{reports}reports" / NAME
    if (experiment / SWEEP_FILE).exists():  # written last: the folder is complete
        return experiment
    import ray
    from ray import tune

    shutil.rmtree(experiment.parent, ignore_errors=True)
    spec = load_spec(ROOT / "sweeps" / "quickstart.yaml")

    def trainable(config):
        batch, rule, seed = config["batch_size"], config["lr"]["scaling"], config["seed"]
        k = batch / config["lr"]["base_batch_size"]
        lr = config["lr"]["base"] * {"none": 1.0, "linear": k, "sqrt": math.sqrt(k)}[rule]
        steps_per_report = max(1, config["examples"] // reports // batch)
        for i in range(1, reports + 1):
            step = i * steps_per_report
            examples = step * batch
            accuracy = 0.1 + 0.8 * (1 - math.exp(-lr * step / 20)) - 0.005 * seed
            tune.report(
                {
                    "step": step,
                    "epoch": examples / 18_000,
                    "examples": examples,
                    "total_steps": reports * steps_per_report,
                    "lr": lr,
                    "peak_lr": lr,
                    "train/loss": 2.3 * (1 - accuracy) + 0.01,
                    "train/accuracy": accuracy + 0.02,
                    "val/loss": 2.3 * (1 - accuracy),
                    "val/accuracy": accuracy,
                    "test/loss": 2.3 * (1 - accuracy) + 0.02,
                    "test/accuracy": accuracy - 0.01,
                    "images_per_s": 2000.0 * math.sqrt(batch),
                    "diverged": False,
                    "time_s": 0.01 * i,
                    "host": "bench",
                    "gpu_ids": "",
                    "device": "cpu",
                }
            )

    space = copy.deepcopy(spec.base)
    grid = {"batch_size": BATCH_SIZES, "lr.scaling": RULES, "seed": list(range(seeds))}
    for key, values in grid.items():
        set_dotted(space, key, tune.grid_search(values))
    print(f"building {experiment} ({30 * seeds} trials x {reports} reports)", file=sys.stderr)
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tune.Tuner(
        # Whole CPUs with actor reuse: fractional CPUs start more processes than 2 cores bear.
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=NAME, storage_path=str(experiment.parent), verbose=0),
    ).fit()
    ray.shutdown()
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    record = {"name": NAME, "spec": spec.model_dump(mode="json") | {"grid": grid}, "ended": None}
    (experiment / SWEEP_FILE).write_text(json.dumps(record))
    return experiment


def copy_tiny(folder: Path) -> Path:
    """A fresh copy of the committed tiny experiment (without a cache), alone in `folder/tiny`."""
    experiment = folder / "tiny" / "copy" / TINY.name
    shutil.rmtree(experiment.parent.parent, ignore_errors=True)
    shutil.copytree(TINY, experiment, ignore=shutil.ignore_patterns(CACHE_DIR))
    return experiment


def synthesise(real: Path, folder: Path, trials: int) -> Path:
    """A folder of `trials` trials made of the real ones, without running anything.

    The first copies keep their real ids and folders; the others get new ids and folders that
    hard-link a real trial's files (the same bytes to parse). Ray takes each trial's folder
    from the pickled storage in the state file, which names a real folder: both loaders then
    read and parse one result.json per trial.
    """
    big = folder / f"synth-{trials}-from-{real.parent.name}" / NAME
    if (big / SWEEP_FILE).exists():
        return big
    shutil.rmtree(big.parent, ignore_errors=True)
    big.mkdir(parents=True)
    (state_path,) = sorted(real.glob("experiment_state-*.json"))[-1:]
    state = json.loads(state_path.read_text())
    originals = state["trial_data"]
    entries = []
    for i in range(trials):
        trial_json, runtime_json = originals[i % len(originals)]
        trial = json.loads(trial_json)
        source = real / trial["relative_logdir"]
        if i >= len(originals):
            trial["trial_id"] = f"synth_{i:05d}"
            trial["relative_logdir"] = f"trainable_{trial['trial_id']}"
        target = big / trial["relative_logdir"]
        target.mkdir()
        for name in (RESULT_FILE, PARAMS_FILE):
            os.link(source / name, target / name)
        entries.append([json.dumps(trial), runtime_json])
    (big / state_path.name).write_text(json.dumps(state | {"trial_data": entries}))
    shutil.copy(real / SWEEP_FILE, big / SWEEP_FILE)
    return big


# ============================================================================ Timing


def timed(run: Callable[[], object], repeat: int, before: Callable[[], None] = lambda: None):
    """The median wall time of `repeat` runs (`before` runs untimed ahead of each) and the
    last run's value."""
    times, value = [], None
    for _ in range(repeat):
        before()
        started = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def process(loader: str, path: Path) -> tuple[float, float, list[int]]:
    """Run LOADERS[loader] on `path` in a fresh Python: (wall seconds, CPU seconds of the
    process and its children, [trials, report rows])."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys\n" + LOADERS[loader], str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{loader} loader failed on {path}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(done.stdout.splitlines()[-1])


def processes(path: Path, repeat: int, with_ray: bool) -> dict[str, dict]:
    """Median wall and CPU seconds and the counts of each loader, runs taken in turn (Ray's, then
    ours with the cache removed) so that a busy machine weighs on both alike."""
    runs: dict[str, list] = {name: [] for name in LOADERS if with_ray or name != "ray"}
    for _ in range(repeat):
        for name in runs:
            shutil.rmtree(path / CACHE_DIR, ignore_errors=True)
            runs[name].append(process(name, path))
    return {
        name: {
            "wall_s": statistics.median(r[0] for r in found),
            "cpu_s": statistics.median(r[1] for r in found),
            "counts": found[-1][2],
        }
        for name, found in runs.items()
    }


def measure(path: Path, repeat: int, with_ray: bool, label: str) -> dict:
    """Every figure of one folder, printed as a JSON line; returns them by name."""
    size = sum(p.stat().st_size for p in path.glob(f"*/{RESULT_FILE}"))
    figures = {"folder": label, "result_json_mb": round(size / 2**20, 1)}
    found = processes(path, repeat, with_ray)
    ours = found["ours"]
    figures |= {"first_load_s": round(ours["wall_s"], 3), "first_load_cpu_s": ours["cpu_s"]}
    figures |= {"trials": ours["counts"][0], "rows": ours["counts"][1]}
    if with_ray:
        ray = found["ray"]
        figures |= {"ray_s": round(ray["wall_s"], 3), "ray_cpu_s": round(ray["cpu_s"], 3)}
        figures |= {"ray_trials": ray["counts"][0], "ray_rows": ray["counts"][1]}
        figures["first_load_share_of_ray"] = round(ours["wall_s"] / ray["wall_s"], 3)
    figures["first_load_cpu_s"] = round(figures["first_load_cpu_s"], 3)
    load(path)  # the cache, as the processes above left it removed
    seconds, _ = timed(lambda: load(path), max(repeat, 5))
    figures["cached_load_s"] = round(seconds, 4)
    print(json.dumps(figures), flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        real = copy_tiny(args.folder)
    else:
        real = build_real(args.folder, args.seeds, args.reports)
    # Beside the real folder: a fresh --tiny copy replaces its synthesised folder too.
    where = real.parent.parent
    small = measure(real, args.repeat, True, f"real: {real}")
    seconds, _ = timed(lambda: write_report(real, out=args.folder / "report.html"), 1)
    print(json.dumps({"folder": "real", "report_s": round(seconds, 2)}), flush=True)
    big = synthesise(real, where, args.big)
    print(
        f"synthesised: {args.big} trials from the {small['trials']} real ones (new trial ids, "
        "hard-linked result.json and params.json; Ray reads the real folders named in its "
        "pickled state, with the same bytes)",
        file=sys.stderr,
    )
    large = measure(big, 1, not args.no_ray_big, f"synthesised: {big}")
    checks = [
        (
            "first load <= 1/5 of Ray's, process against process (real folder)",
            small["first_load_s"] <= FIRST_LOAD_SHARE * small["ray_s"],
        ),
        (
            f"cached load <= {CACHED_LOAD_S} s (real folder)",
            small["cached_load_s"] <= CACHED_LOAD_S,
        ),
    ]
    if "ray_s" in large:
        checks.append(
            (
                "first load <= 1/5 of Ray's, process against process (synthesised folder)",
                large["first_load_s"] <= FIRST_LOAD_SHARE * large["ray_s"],
            )
        )
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
