"""`lbs-tune evaluate` on a copy of the real quickstart sweep: every checkpoint on every split,
what is done is skipped, and the report draws the checkpoints' curves.

Expected values come from the trial folders (plain json) and from evaluation.parquet read with
pyarrow: a checkpoint's val and test metrics equal what the trial reported at its step.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import Page, raw_trials, trace, without_ray_lines

import lbs_tune.evaluate
from analysis.report import write_report
from lbs_tune.evaluate import evaluate_experiment

SPLITS = ["train", "val", "test"]


def checkpoint_steps(trial) -> dict[str, int]:
    """Checkpoint folder name -> step, from the reports that came with a checkpoint."""
    return {r["checkpoint_dir_name"]: r["step"] for r in trial.reports if r["checkpoint_dir_name"]}


def copy_of(experiment: Path, folder: Path) -> Path:
    target = folder / experiment.name
    shutil.copytree(experiment, target, ignore=shutil.ignore_patterns(".lbs*"))
    return target


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny evaluations beside Ray's processes on few cores: threads would only spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluated(quickstart_experiment, tmp_path_factory) -> Path:
    """A copy of the quickstart experiment with every checkpoint evaluated."""
    folder = copy_of(quickstart_experiment, tmp_path_factory.mktemp("evaluated"))
    evaluate_experiment(str(folder), device="cpu")
    return folder


def rows_of(folder: Path) -> list[dict]:
    return pq.read_table(folder / "evaluation.parquet").to_pylist()


@pytest.mark.ray
def test_every_checkpoint_is_evaluated_on_every_split(evaluated):
    rows = {(r["trial_id"], r["step"], r["split"]): r for r in rows_of(evaluated)}
    expected = set()
    for trial in raw_trials(evaluated):
        steps = checkpoint_steps(trial)
        on_disk = sorted(p.name for p in trial.folder.glob("checkpoint_*"))
        assert sorted(steps) == on_disk and on_disk
        reported = {r["step"]: r for r in trial.reports}
        for step in steps.values():
            expected |= {(trial.trial_id, step, split) for split in SPLITS}
            # The same weights and evaluation as the trial's own report at that step.
            for split in ("val", "test"):
                row = rows[(trial.trial_id, step, split)]
                assert row["loss"] == pytest.approx(reported[step][f"{split}/loss"], rel=1e-6)
                assert row["accuracy"] == pytest.approx(reported[step][f"{split}/accuracy"])
            train = rows[(trial.trial_id, step, "train")]
            assert train["loss"] > 0 and 0 <= train["accuracy"] <= 1
    assert set(rows) == expected and len(rows_of(evaluated)) == len(expected)


@pytest.mark.ray
def test_a_second_run_evaluates_nothing_again(evaluated, monkeypatch, capsys):
    before = rows_of(evaluated)
    written = (evaluated / "evaluation.parquet").stat().st_mtime_ns

    def nothing_to_do(*args, **kwargs):
        raise AssertionError("read or evaluated a checkpoint that was evaluated before")

    monkeypatch.setattr(lbs_tune.evaluate, "read_state", nothing_to_do)
    monkeypatch.setattr(lbs_tune.evaluate, "build_trial", nothing_to_do)
    evaluate_experiment(str(evaluated), device="cpu")
    assert f"evaluated 0 checkpoint splits ({len(before)} were done before)" in without_ray_lines(
        capsys.readouterr().out
    )
    assert rows_of(evaluated) == before
    assert (evaluated / "evaluation.parquet").stat().st_mtime_ns == written


@pytest.mark.ray
def test_a_new_split_adds_only_its_rows(cli, quickstart_experiment, tmp_path, monkeypatch):
    folder = copy_of(quickstart_experiment, tmp_path)
    code, out, _ = cli("evaluate", folder, "--splits", "test", "--device", "cpu")
    assert code == 0 and out.startswith("evaluated ")
    first = rows_of(folder)
    assert {r["split"] for r in first} == {"test"}
    splits = []
    original = lbs_tune.evaluate.build_trial

    def counting(*args, **kwargs):
        built = original(*args, **kwargs)
        evaluate = built.task.evaluate

        def each(model, split, batch_size):
            splits.append(split)
            return evaluate(model, split, batch_size)

        built.task.evaluate = each
        return built

    monkeypatch.setattr(lbs_tune.evaluate, "build_trial", counting)
    code, _, _ = cli("evaluate", folder, "--splits", "test,val", "--device", "cpu")
    both = rows_of(folder)
    assert code == 0 and len(both) == 2 * len(first) == 2 * len(splits)
    assert set(splits) == {"val"}  # the test split is not evaluated again
    assert [r for r in both if r["split"] == "test"] == first


@pytest.mark.ray
def test_a_splits_typo_is_a_one_line_usage_error(cli, quickstart_experiment):
    code, out, err = cli("evaluate", quickstart_experiment, "--splits", "train,vall")
    assert code == 2 and out == ""
    assert (
        err
        == "lbs-tune: error: --splits train,vall: choose among train, val, test (comma-separated)\n"
    )
    assert not (quickstart_experiment / "evaluation.parquet").exists()


@pytest.mark.ray
def test_the_report_adds_the_checkpoints_curves(evaluated, tmp_path):
    page = Page(write_report(evaluated, out=tmp_path / "report.html").read_text())
    ids = [a.get("id") for a, _ in page.scripts if a.get("type") == "application/json"]
    # The answer's figure first (steps to target), then the curves over training.
    at = ids.index("fig-learning-curves")
    assert ids[0] == "fig-steps-to-target" and ids[at : at + 3] == [
        "fig-learning-curves",
        "fig-loss-curves",
        "fig-evaluation",
    ]
    figure = page.figure("evaluation")
    keys = {t.trial_id: t.key for t in raw_trials(evaluated)}
    rows = rows_of(evaluated)
    # Losses in the top row, accuracies below, a column per split: axes x (train/loss) to x6.
    for split, kind, axis in (
        ("train", "loss", "x"),
        ("test", "accuracy", "x6"),
        ("val", "loss", "x2"),
    ):
        for batch_size in (16, 64, 256):
            for rule in ("none", "linear"):
                by_step: dict[int, list[float]] = {}
                for r in rows:
                    if r["split"] == split and keys[r["trial_id"]][:2] == (batch_size, rule):
                        by_step.setdefault(r["step"], []).append(r[kind])
                line = trace(figure, f"B={batch_size} {rule}", axis)
                assert line["x"] == sorted(by_step)
                medians = [statistics.median(by_step[s]) for s in sorted(by_step)]
                assert line["y"] == pytest.approx(medians)
    titles = [a["text"] for a in figure["layout"]["annotations"]]
    assert titles == [f"{s}/{k}" for k in ("loss", "accuracy") for s in SPLITS]
    assert figure["layout"]["xaxis4"]["title"]["text"] == "checkpoint (steps)"
