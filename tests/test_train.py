"""`lbs-tune train`: one trial in-process, resume after kill -9, corrupted checkpoints, results."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import read_jsonl, same_results, tiny_base, without_timing, write_spec

from lbs_tune.checkpoints import load_checkpoint
from lbs_tune.config import TrialConfig
from lbs_tune.experiment import run_checkpoints
from lbs_tune.training import ListReporter, train


@pytest.fixture
def spec(tmp_path, data_dir):
    return write_spec(tmp_path / "tiny.yaml", tiny_base())


def test_train_writes_config_metrics_and_checkpoints(cli, spec, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = cli("train", spec, "--out", out)
    assert code == 0
    rows = read_jsonl(out / "metrics.jsonl")
    # 2000 samples -> 1600 train -> 1440 after the 10% validation split: 45 steps per epoch.
    assert [r["step"] for r in rows] == [22, 44, 66, 88, 90]
    assert rows[-1]["epoch"] == pytest.approx(90 * 32 / 1440)
    assert rows[-1]["examples"] == 90 * 32
    for key in ("lr", "train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss"):
        assert key in rows[-1]
    assert rows[-1]["diverged"] is False
    assert rows[-1]["val/accuracy"] > 0.3  # chance is 0.1
    assert [s for s, _ in run_checkpoints(out)] == [90, 88, 66, 44, 22]
    assert "step 90/90" in stdout  # plain lines when stdout is not a terminal

    code, stdout, _ = cli("train", spec, "--out", out)
    assert code == 0 and "already finished at step 90" in stdout


def test_set_overrides_dotted_keys(cli, spec, tmp_path):
    out = tmp_path / "run"
    code, _, _ = cli(
        "train",
        spec,
        "--out",
        out,
        "--set",
        "batch_size=64",
        "--set",
        "lr.scaling=linear",
        "--set",
        "steps=5",
    )
    assert code == 0
    row = read_jsonl(out / "metrics.jsonl")[-1]
    assert row["step"] == 5 and row["examples"] == 320
    assert row["lr"] == pytest.approx(0.1)  # 0.05 x 64 / 32


def _train_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lbs_tune.cli", "train", str(spec), "--out", str(out)]


def test_kill_9_midway_then_rerun_gives_the_same_metrics(cli, tmp_path, data_dir):
    spec = write_spec(tmp_path / "long.yaml", tiny_base(epochs=12, checkpoint_every=1))
    whole = tmp_path / "whole"
    assert cli("train", spec, "--out", whole)[0] == 0
    expected = read_jsonl(whole / "metrics.jsonl")

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(spec, out), stdout=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = run_checkpoints(out)
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_jsonl(out / "metrics.jsonl")
    assert 0 < len(killed_at) < len(expected), "the kill must land mid-run"

    code, stdout, stderr = cli("train", spec, "--out", out)  # the rerun: in this process
    assert code == 0, stderr
    assert "resuming from the checkpoint of step" in stdout
    assert same_results(read_jsonl(out / "metrics.jsonl"), expected)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(cli, spec, tmp_path):
    whole = tmp_path / "whole"
    assert cli("train", spec, "--out", whole)[0] == 0
    expected = read_jsonl(whole / "metrics.jsonl")

    # Roll a finished run back to its state at step 66, then damage that checkpoint.
    out = tmp_path / "damaged"
    assert cli("train", spec, "--out", out)[0] == 0
    files = dict(run_checkpoints(out))
    for step in (90, 88):
        files[step].unlink()
    damaged = files[66]
    truncated = damaged.read_bytes()[:1000]
    damaged.write_bytes(truncated)
    code, _stdout, stderr = cli("train", spec, "--out", out)
    assert code == 0
    assert f"{damaged}: corrupted or truncated checkpoint" in stderr
    folder = damaged.parent
    assert f"moved it aside to {folder.name}.damaged; resuming from checkpoint_000044" in stderr
    aside = folder.with_name(folder.name + ".damaged") / damaged.name
    assert aside.read_bytes() == truncated, "nothing is deleted or overwritten"
    assert load_checkpoint(damaged)["step"] == 66, "the resumed run made that step again"
    assert same_results(read_jsonl(out / "metrics.jsonl"), expected)


def test_only_checkpoint_corrupted_is_a_clear_error(cli, spec, tmp_path):
    out = tmp_path / "run"
    assert cli("train", spec, "--out", out)[0] == 0
    files = run_checkpoints(out)
    for _, path in files[1:]:
        shutil.rmtree(path.parent)
    files[0][1].write_bytes(b"not a checkpoint")
    code, _, stderr = cli("train", spec, "--out", out)
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "no earlier checkpoint to fall back to" in stderr and str(files[0][1]) in stderr


def test_other_config_in_the_same_folder_is_refused(cli, spec, tmp_path):
    out = tmp_path / "run"
    assert cli("train", spec, "--out", out, "--set", "steps=3")[0] == 0
    code, _, stderr = cli("train", spec, "--out", out, "--set", "steps=4")
    assert code == 2 and "steps: 3 -> 4" in stderr


def test_a_run_that_failed_before_its_first_checkpoint_takes_the_fixed_config(cli, spec, tmp_path):
    whole = tmp_path / "whole"
    assert cli("train", spec, "--out", whole)[0] == 0
    whole = whole / "metrics.jsonl"
    out = tmp_path / "run"
    missing = tmp_path / "no-data"
    code, _, stderr = cli(
        "train", spec, "--out", out, "--set", "dataset=mnist", "--set", "model=lenet",
        "--set", f"data.dir={missing}",
    )  # fmt: skip
    assert code == 2 and str(missing) in stderr
    # The user fixes the input; nothing of the failed run (no checkpoint) stands in the way.
    assert cli("train", spec, "--out", out)[0] == 0
    assert same_results(read_jsonl(out / "metrics.jsonl"), read_jsonl(whole))


def test_a_checkpoint_of_something_else_is_a_clear_error(cli, spec, tmp_path):
    import torch

    out = tmp_path / "run"
    assert cli("train", spec, "--out", out, "--set", "steps=3")[0] == 0
    ((_, path),) = run_checkpoints(out)[:1]
    torch.save({"step": 3, "model": {}}, path)
    code, _, stderr = cli("train", spec, "--out", out, "--set", "steps=3")
    assert code == 2 and stderr.count("\n") == 1
    assert f"{path}: not an lbs-tune checkpoint (no finished, optimizer" in stderr
    path.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle: torch.load says to drop weights_only
    code, _, stderr = cli("train", spec, "--out", out, "--set", "steps=3")
    assert code == 2 and "corrupted or truncated" in stderr and "weights_only" not in stderr


def test_divergence_is_a_finished_result(cli, tmp_path, data_dir):
    spec = write_spec(tmp_path / "hot.yaml", tiny_base(lr__base=1e4, epochs=1))
    out = tmp_path / "run"
    code, _stdout, _ = cli("train", spec, "--out", out)
    assert code == 0
    last = read_jsonl(out / "metrics.jsonl")[-1]
    assert last["diverged"] is True
    assert last["train/loss"] is None or not math.isfinite(last["train/loss"])
    assert last["step"] < 45, "a diverged run stops at the report that sees it"
    assert "already finished" in cli("train", spec, "--out", out)[1]


def test_gradient_accumulation_matches_one_large_batch(cli, tmp_path, data_dir):
    spec = write_spec(tmp_path / "acc.yaml", tiny_base(batch_size=64, epochs=1))
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    assert cli("train", spec, "--out", whole)[0] == 0
    assert cli("train", spec, "--out", micro, "--set", "max_device_batch=16")[0] == 0
    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(micro / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4)
        assert x["val/loss"] == pytest.approx(y["val/loss"], rel=1e-4)


def test_gradient_accumulation_with_ghost_batch_norm(cli, tmp_path, data_dir):
    # With ghost batch norm of 8, BN statistics no longer depend on how the batch is split.
    base = tiny_base(
        dataset="synthetic",
        model="resnet20",
        batch_size=32,
        steps=3,
        eval_every=100,
        ghost_batch_size=8,
    )
    base["data"] = {"samples": 96, "shape": [3, 8, 8], "val_fraction": 0.25}
    spec = write_spec(tmp_path / "ghost.yaml", base)
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    assert cli("train", spec, "--out", whole)[0] == 0
    assert cli("train", spec, "--out", micro, "--set", "max_device_batch=16")[0] == 0
    a, b = read_jsonl(whole / "metrics.jsonl")[-1], read_jsonl(micro / "metrics.jsonl")[-1]
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)


def test_progress_bar_on_a_terminal(tmp_path, data_dir, monkeypatch):
    """`lbs-tune train` with its stdout on a terminal (a pseudo-terminal, read as it writes)."""
    import pty

    from lbs_tune.cli import main

    spec = write_spec(tmp_path / "tty.yaml", tiny_base(epochs=1))
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closes when the run ends
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        code = main(["train", str(spec), "--out", str(tmp_path / "run")])
        monkeypatch.undo()
    reader.join(timeout=60)
    os.close(leader)
    assert code == 0
    text = b"".join(chunks).decode()
    assert "\r[" in text and "] step 45/45" in text, text[-500:]
    assert "\nstep 22/45" not in text, "no plain lines on a terminal"


def test_a_non_finite_loss_stops_the_run_within_fifty_steps(data_dir):
    """The evaluation is 1000 steps away, but a NaN is looked for every 25 steps."""
    config = TrialConfig.model_validate(tiny_base(lr__base=1e6, steps=1000, eval_every=100))
    reporter = ListReporter()
    train(config, reporter)
    (last,) = reporter.rows
    assert last["diverged"] is True and last["step"] <= 50


def test_label_smoothing_reports_the_plain_loss_and_bounds_it(data_dir):
    """At step 1 the reported train loss is the first batch's loss under the initial weights:
    the same plain cross-entropy whatever the smoothing; the smoothed loss comes apart."""
    base = tiny_base(steps=1, eval_every=0.001)
    plain = ListReporter()
    train(TrialConfig.model_validate(base), plain)
    smoothed = ListReporter()
    train(TrialConfig.model_validate({**base, "label_smoothing": 0.3}), smoothed)
    (a,), (b,) = plain.rows, smoothed.rows
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    assert "train/smoothed_loss" not in a and b["train/smoothed_loss"] != b["train/loss"]
    # A bound between the two: the plain loss is what divergence_loss is compared with.
    bound = (b["train/loss"] + b["train/smoothed_loss"]) / 2
    bounded = ListReporter()
    config = {**base, "label_smoothing": 0.3, "divergence_loss": bound}
    train(TrialConfig.model_validate(config), bounded)
    assert bounded.rows[-1]["diverged"] is (b["train/loss"] > bound)


def test_a_trial_with_a_target_reports_its_step_and_may_stop_there(data_dir):
    base = tiny_base(epochs=4, eval_every=0.25, target={"metric": "val/accuracy", "value": 0.3})
    watched = ListReporter()
    train(TrialConfig.model_validate(base), watched)
    first = next(r for r in watched.rows if r["val/accuracy"] >= 0.3)
    assert all(r["target/step"] is None for r in watched.rows if r["step"] < first["step"])
    assert all(
        r["target/step"] == first["step"] for r in watched.rows if r["step"] >= first["step"]
    )
    assert watched.rows[-1]["step"] == 180, "without stop the budget runs out"

    base["target"]["stop"] = True
    stopped = ListReporter()
    train(TrialConfig.model_validate(base), stopped)
    same = [without_timing(r) for r in watched.rows[: len(stopped.rows)]]
    assert [without_timing(r) for r in stopped.rows] == same
    assert stopped.rows[-1]["step"] == first["step"] < 180


def test_measurements_leave_the_trial_unchanged_and_report_positive_values(data_dir):
    base = tiny_base(batch_size=64, epochs=2, eval_every=0.5)
    measured = {
        **base,
        "noise_scale": {"every": 0.5, "window": 2, "batch": 64, "hessian_examples": 2},
        "sharpness": {"every": 1, "batch": 256, "iterations": 10},
    }
    plain, both = ListReporter(), ListReporter()
    train(TrialConfig.model_validate(base), plain)
    train(TrialConfig.model_validate(measured), both)
    measures = ("noise/", "sharpness/")
    unmeasured = [{k: v for k, v in r.items() if not k.startswith(measures)} for r in both.rows]
    assert [without_timing(r) for r in unmeasured] == [without_timing(r) for r in plain.rows]
    noise = [r["noise/b_simple"] for r in both.rows if "noise/b_simple" in r]
    sharp = [r["sharpness/top_eig"] for r in both.rows if "sharpness/top_eig" in r]
    # 22.5 steps per epoch: windows of 2 steps from steps 0, 11, 22, 33 and 44 (every 11, the
    # last cut by the budget), each reported with the next evaluation (11, 22, 33, 44, 45).
    assert len(noise) == 5 and all(v is not None and v > 0 for v in noise)
    assert len(sharp) == 2 and all(v > 0 for v in sharp)


def test_an_epoch_budget_gives_every_batch_size_the_same_examples(data_dir):
    # 1440 training examples, 8 epochs = 11,520 examples: batch 256 takes exactly 45 steps;
    # batch 1000 takes round(11.52) = 12 steps, 12,000 examples, within one batch of it.
    for batch, steps in ((256, 45), (1000, 12)):
        reporter = ListReporter()
        train(TrialConfig.model_validate(tiny_base(batch_size=batch, epochs=8)), reporter)
        last = reporter.rows[-1]
        assert last["step"] == last["total_steps"] == steps
        assert abs(last["examples"] - 8 * 1440) < batch
        assert last["epoch"] == pytest.approx(last["examples"] / 1440)
        assert last["bn_batch"] == batch


def test_out_of_memory_is_one_line_naming_the_batch_and_the_fix(cli, spec, tmp_path, monkeypatch):
    """A CUDA out-of-memory error cannot happen on a CPU: it is injected where the loop runs."""
    import torch

    import lbs_tune.local

    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(lbs_tune.local, "train", too_big)
    code, _, stderr = cli("train", spec, "--out", tmp_path / "run")
    assert code == 2 and stderr.count("\n") == 1
    assert "out of GPU memory at batch_size 32" in stderr and "max_device_batch" in stderr
