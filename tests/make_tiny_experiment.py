"""Write tests/experiments/: the text files of two tiny real sweeps, for the tests that read
experiment folders without starting Ray.

    .venv/bin/python tests/make_tiny_experiment.py

Runs, on a local Ray with 4 CPUs and 4 (declared) GPUs, the two sweeps that conftest runs with
Ray: `quickstart` (QUICKSTART_TINY: 12 trials, one diverged) and `broken` (`broken_overrides`:
one finished trial, one that fails for want of CIFAR-10 files). From each experiment folder it
copies only what `analysis` reads: the newest experiment_state-*.json, lbs_sweep.json, and every
trial folder's params.json, result.json and error.txt (no checkpoints, no pickles). The Ray test
`test_the_committed_experiments_match_what_a_sweep_writes_now` says when to run this again.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from conftest import (  # noqa: E402  (conftest is found through the path set above)
    HOSTILE,
    QUICKSTART,
    QUICKSTART_TINY,
    TINY_EXPERIMENTS,
    broken_overrides,
)

from lbs_tune.experiment import STATE_FILE, SWEEP_FILE, TRIAL_FILES  # noqa: E402


def text_files(experiment: Path) -> list[Path]:
    """The files of an experiment folder that `analysis` reads, relative to it, sorted."""
    states = sorted(p.name for p in experiment.iterdir() if STATE_FILE.match(p.name))
    found = [Path(name) for name in [*states[-1:], SWEEP_FILE]]
    for folder in sorted(p for p in experiment.iterdir() if p.is_dir()):
        found += [Path(folder.name, n) for n in TRIAL_FILES if (folder / n).exists()]
    return sorted(found)


def copy_text_files(experiment: Path, target: Path) -> None:
    """Replace `target` with the `text_files` of `experiment`."""
    shutil.rmtree(target, ignore_errors=True)
    for relative in text_files(experiment):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(experiment / relative, target / relative)


def main() -> int:
    import ray

    from lbs_tune.cluster import start_ray
    from lbs_tune.runner import run

    with tempfile.TemporaryDirectory(prefix="lbs-tiny-") as scratch:
        storage = Path(scratch)
        os.environ["LBS_DATA_DIR"] = str(storage / "data")
        # As conftest's ray_cluster: the sweeps join a cluster, so no data is prepared here.
        start_ray(cpus=4, gpus=4)
        address = ray.get_runtime_context().gcs_address
        assert run(QUICKSTART, QUICKSTART_TINY, storage=str(storage), address=address) == 0
        data = storage / f"data {HOSTILE}"
        data.mkdir(parents=True)
        # As in conftest's broken_sweep: Ray saves the experiment state every second.
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
        assert run(QUICKSTART, broken_overrides(data), storage=str(storage), address=address) == 1
        ray.shutdown()
        for name in ("quickstart", "broken"):
            copy_text_files(storage / name, TINY_EXPERIMENTS / name)
            size = sum(p.stat().st_size for p in (TINY_EXPERIMENTS / name).rglob("*"))
            print(f"{TINY_EXPERIMENTS / name}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
