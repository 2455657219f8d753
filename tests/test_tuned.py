"""Tuned sweeps (a `search` section), through `lbs-tune run` of sweeps/quickstart_tuned.yaml.

A bad search section is refused in one line at its key's line, before anything starts. On Ray,
the file at a tiny size (its best trial confirmed on 2 fresh seeds, losing trials pruned) runs
once uninterrupted and once with its driver SIGKILLed three times (twice in the search, once
among the confirmation runs) and run again: every study ends with exactly trials_per_point
trials, each asked once, with (sampler qmc) the parameters and the outcomes of the uninterrupted
run (a trial stopped as it could no longer win may have been stopped at another step, or not at
all, since that depends on when the others finished), the same best and exactly the same
confirmation runs: configuration, seed and outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    QUICKSTART_TUNED,
    STUDIES,
    TINY_TUNED,
    check_studies,
    driver_command,
    told,
)

from analysis.summary import read_summary
from lbs_tune.runner import run
from lbs_tune.space import KINDS
from lbs_tune.storage import locate
from lbs_tune.studies import read_studies

# ---------------------------------------------------------------------------- Bad input

TEXT = QUICKSTART_TUNED.read_text()
TARGET_SECTION = "target:\n  metric: val/accuracy\n  value: 0.5\n"


def line_of(text: str, key: str) -> int:
    """The line of a dotted key of a sweep file: a search space's keys hold dots themselves, and
    a distribution's kind (`search.space.lr.base.uniform`) is on its key's line."""
    section, _, rest = key.partition(".")
    leaf = rest.rsplit(".", 1)[-1]
    if section == "search":
        head, _, last = rest.removeprefix("space.").rpartition(".")
        leaf = head if last in KINDS else rest.removeprefix("space.")
    lines = text.splitlines()
    start = lines.index(f"{section}:")
    return next(
        i for i, t in enumerate(lines[start:], start + 1) if t.strip().startswith(leaf + ":")
    )


@pytest.mark.parametrize(
    "old, new, key, message",
    [
        ("{log_uniform: [0.003", "{loguniform: [0.003", "search.space.lr.base",
         "unknown distribution 'loguniform' (did you mean 'log_uniform'?)"),
        ("{uniform: [0.8, 0.95]}", "{uniform: [0.8, 0.8]}",
         "search.space.optimizer.momentum.uniform",
         "low < high, not [0.8, 0.8]"),
        ("{log_uniform: [0.003, 1.0]}", "{log_uniform: [1.0, 0.003]}",
         "search.space.lr.base.log_uniform",
         "low < high, not [1.0, 0.003]"),
        ("    lr.base:", "    lr.bas:", "search.space.lr.bas",
         "not a trial config key (did you mean 'lr.base'?)"),
        ("    optimizer.momentum:", "    batch_size: {values: [16, 32]}\n    optimizer.momentum:",
         "search.space.batch_size", "'batch_size' is also a grid key"),
        ("trials_per_point: 8", "trials_per_point: 0", "search.trials_per_point",
         "greater than or equal to 1"),
        (TARGET_SECTION, "", "search.objective", "steps_to_target needs a `target`"),
        ("confirm: {top: 1,", "confirm: {top: 9,", "search.confirm",
         "top 9 is more than the 8 trials per point"),
        ("  prune: true", "  prune: median", "search.prune",
         "median pruning is for objective: metric"),
        ("scaling: none", "scaling: linear", "base.lr.scaling",
         "must be 'none' when search.space has lr.base"),
    ],
    ids=["unknown-distribution", "empty-range", "inverted-range", "not-a-config-key",
         "also-a-grid-key", "no-trials", "no-target", "confirm-too-many", "pruner-of-a-metric",
         "lr-scaled"],
)  # fmt: skip
def test_a_bad_search_is_one_line_at_its_key_and_nothing_starts(
    cli, tmp_path, old, new, key, message
):
    assert TEXT.count(old) == 1, old
    text = TEXT.replace(old, new)
    spec = tmp_path / "tuned.yaml"
    spec.write_text(text)
    line = line_of(text, key)
    code, out, err = cli("run", spec, "--dry-run", "--storage", tmp_path / "results")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"lbs-tune: error: {spec}:{line}: {key}: "), err
    assert message in err
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------- On Ray


def studies(folder: Path) -> dict[str, list[dict]]:
    """{study: its trials in number order} (what read_studies finds now)."""
    return {r.name: sorted(r.trials, key=lambda t: t["number"]) for r in read_studies(folder)}


def confirmed(folder: Path) -> int:
    """Confirmation runs told so far, over all studies."""
    return sum(c["state"] != "RUNNING" for r in read_studies(folder) for c in r.confirmations)


def best_steps(folder: Path) -> dict[str, float | None]:
    """{study: the best trial's steps to target}: the numbers of summary.json's points."""
    return {r.name: (r.best() or {}).get("value") for r in read_studies(folder)}


def confirmations(folder: Path) -> dict[str, list[tuple]]:
    """{study: (confirmed trial, seed, params, state, value) of each confirmation run}."""
    return {
        r.name: [(c["confirms"], c["seed"], c["params"], c["state"], c["value"])
                 for c in r.confirmations]
        for r in read_studies(folder)
    }  # fmt: skip


def same_outcome(found: dict, expected: dict) -> bool:
    """One trial of the killed and of the unbroken run: the same outcome, except that a trial
    pruned in one (its steps known to exceed `pruned_at`) may have run on in the other."""
    if "PRUNED" not in (found["state"], expected["state"]):
        return (found["state"], found["value"]) == (expected["state"], expected["value"])
    pruned, other = (found, expected) if found["state"] == "PRUNED" else (expected, found)
    return other["state"] != "COMPLETE" or other["value"] > pruned["pruned_at"]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("tuned")
    assert run(QUICKSTART_TUNED, TINY_TUNED, storage=str(storage), address=ray_cluster.address) == 0
    return storage / "quickstart_tuned"


@pytest.mark.ray
def test_each_study_runs_its_trials_once_and_finds_a_best(uninterrupted):
    check_studies(uninterrupted)
    best = best_steps(uninterrupted)
    assert all(best[name] is not None for name in STUDIES), best
    meta = json.loads((uninterrupted / "lbs_sweep.json").read_text())
    assert meta["optuna_storage"] == f"sqlite:///{uninterrupted.resolve() / 'optuna.db'}"
    # Each batch size's steps are its best configuration's on the two fresh seeds.
    summary = read_summary(locate(uninterrupted))
    assert [p.steps.source for p in summary.points] == ["confirmed", "confirmed"]
    assert [p.confirmed.count for p in summary.points] == [2, 2]


@pytest.mark.ray
def test_driver_killed_three_times_then_rerun_ends_as_the_uninterrupted_run(
    ray_cluster, uninterrupted, tmp_path
):
    storage = tmp_path / "results"
    folder = storage / "quickstart_tuned"
    command = driver_command(
        QUICKSTART_TUNED,
        storage,
        ray_cluster.address,
        *(arg for override in TINY_TUNED for arg in ("--set", override)),
    )

    def runs() -> int:
        record = folder / "lbs_sweep.json"
        return len(json.loads(record.read_text())["runs"]) if record.exists() else 0

    def kill_once_told(at_least: int, confirmations: int = 0) -> int:
        """Start the driver, SIGKILL it once it has entered its run in the sweep's record and
        `at_least` trials and `confirmations` confirmation runs are told; return those told (the
        confirmation runs, when asked for)."""
        count = confirmed if confirmations else told
        at_least = confirmations or at_least
        before = runs()
        driver = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 240
        # (The driver before may have told as many already: this one is then killed early on.)
        while time.monotonic() < deadline and driver.poll() is None:
            if runs() > before and count(folder) >= at_least:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        return count(folder)

    first = kill_once_told(1)  # once the first trial is told
    second = kill_once_told(first + 1)  # later: at least one more told by the resumed sweep
    assert 1 <= first < second
    third = kill_once_told(0, confirmations=1)  # once a confirmation run is told
    # Confirmation runs are short: all four may be told before the kill lands (the driver,
    # still running then, had yet to end the sweep).
    assert 1 <= third <= 4
    assert run(QUICKSTART_TUNED, TINY_TUNED, storage=str(storage), address=ray_cluster.address) == 0

    check_studies(folder)
    # qmc draws what the uninterrupted run drew, and a trial trains the same, killed or not.
    expected, found = studies(uninterrupted), studies(folder)
    for name in STUDIES:
        assert [t["params"] for t in found[name]] == [t["params"] for t in expected[name]], name
        for mine, theirs in zip(found[name], expected[name], strict=True):
            assert same_outcome(mine, theirs), (name, mine, theirs)
    assert best_steps(folder) == best_steps(uninterrupted)
    assert confirmations(folder) == confirmations(uninterrupted)
    meta = json.loads((folder / "lbs_sweep.json").read_text())
    assert len(meta["runs"]) == 4 and meta["ended"]
