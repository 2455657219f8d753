"""The noisy quadratic model as a trial (lbs_tune.quadratic): bad problems refused in one line, a
trial through `lbs-tune train`, the mean loss of many seeded trials against the exact expected
loss of lbs_tune.nqm (the check that the task's noise really is C / B), resume bit for bit,
divergence past the stability limit, Adam, and sweeps/nqm_tuned.yaml cut to a tiny Ray run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import read_jsonl, same_results, write_spec

from lbs_tune import nqm
from lbs_tune.checks import check_sweep_target
from lbs_tune.config import TrialConfig
from lbs_tune.experiment import run_checkpoints
from lbs_tune.names import set_dotted
from lbs_tune.sweep import Target
from lbs_tune.training import ListReporter, train

SWEEP = Path(__file__).parent.parent / "sweeps" / "nqm_tuned.yaml"
# A small problem of given values: curvatures, noise variances and start unlike one another.
SMALL = {"values": [1.0, 0.5, 0.25, 0.1], "noise": [1.0, 2.0, 0.5, 1.0], "theta0": 0.5}


def nqm_base(**changes) -> dict:
    """A trial on a d = 100 NQM that runs in well under a second."""
    base = {
        "dataset": "nqm",
        "data": {"samples": 16, "nqm": {"dim": 100, "power": 0.5}},
        "model": "nqm",
        "batch_size": 8,
        "steps": 40,
        "eval_every": 1,
        "checkpoint_every": 4,
        "optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
        "lr": {"base": 0.5},
        "device": "cpu",
    }
    for key, value in changes.items():
        set_dotted(base, key.replace("__", "."), value)
    return base


# ============================================================================ Bad input


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"data.nqm": {"values": [1.0, -0.5]}}, "data.nqm.values", "finite and > 0, not -0.5"),
        ({"data.nqm": {"values": [1.0, 0.0]}}, "data.nqm.values", "finite and > 0, not 0"),
        ({"data.nqm.scale": 0}, "data.nqm.scale", "finite and > 0"),
        ({"data.nqm.dim": 0}, "data.nqm.dim", "integer >= 1, got 0"),
        ({"data.nqm.noise_scale": -1}, "data.nqm.noise_scale", "finite and >= 0"),
        ({"data.nqm.noise": [-1.0] * 100}, "data.nqm.noise", "finite and >= 0, not -1"),
        ({"data.nqm.theta0": [1.0, 2.0]}, "data.nqm.theta0", "one per dimension (100)"),
        ({"data.nqm.values": [1.0]}, "data.nqm.values", "dim (with power and scale) or values"),
        ({"data.nqm": None}, "data.nqm", "dataset nqm needs its problem"),
        ({"target": {"metric": "val/loss", "value": 1000}}, "target.value", "(0, 9.2"),
        ({"target": {"metric": "val/loss", "value": 0}}, "target.value", "initial loss"),
        ({"target": {"metric": "val/accuracy", "value": 0.5}}, "target.metric", "val/loss"),
        ({"noise_scale": {"every": 1, "micro_batch": 2}}, "noise_scale", "remove noise_scale"),
        ({"max_device_batch": 4}, "max_device_batch", "without micro-batches"),
        ({"model": "mlp"}, "model", "models that can: nqm"),
        ({"dataset": "mnist1d"}, "data.nqm", "only dataset nqm reads data.nqm"),
    ],
)
def test_bad_nqm_keys_are_one_line_errors(cli, tmp_path, changes, key, words):
    spec = write_spec(tmp_path / "bad.yaml", nqm_base(**changes))
    code, out, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 2 and not out
    line = err.strip()
    assert "\n" not in line and line.startswith(f"lbs-tune: error: {spec}:"), line
    assert f": {key}: " in line and words in line, line
    assert not (tmp_path / "run").exists()


def test_a_sweep_target_the_nqm_cannot_reach_is_named():
    configs = [TrialConfig.model_validate(nqm_base())]
    assert check_sweep_target(Target(metric="val/loss", value=2.0), configs) is None
    key, message = check_sweep_target(Target(metric="val/loss", value=10.0), configs)
    assert key == "target.value" and "initial loss" in message


def test_a_sweep_file_whose_target_the_nqm_cannot_reach_is_refused_at_its_line(cli, tmp_path):
    spec = write_spec(
        tmp_path / "far.yaml", nqm_base(), target={"metric": "val/loss", "value": 1000}
    )
    code, _, err = cli("run", spec, "--storage", tmp_path / "results", "--dry-run")
    assert code == 2 and err.count("\n") == 1
    assert f"{spec}:" in err and ": target.value: " in err and "initial loss" in err
    assert not (tmp_path / "results").exists()


# ============================================================================ A trial


def test_a_trial_through_lbs_tune_train(cli, tmp_path):
    spec = write_spec(tmp_path / "nqm.yaml", nqm_base(target={"metric": "val/loss", "value": 2.0}))
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 41, 2))  # 16 examples: 2 steps of 8
    last = rows[-1]
    assert last["examples"] == 40 * 8 and last["epoch"] == 20
    assert last["train/accuracy"] is None and "val/accuracy" not in last and "test/loss" not in last
    assert rows[0]["val/loss"] < nqm.initial_loss(nqm.quadratic(dim=100, power=0.5))
    assert last["target/step"] == next(r["step"] for r in rows if r["val/loss"] <= 2.0)


def test_val_loss_is_the_loss_of_theta_exactly():
    # Without noise, plain SGD is deterministic: theta_t = (1 - lr h)^t theta_0.
    reporter = ListReporter()
    train(TrialConfig.model_validate(nqm_base(**{"data.nqm.noise_scale": 0})), reporter)
    q = nqm.quadratic(dim=100, power=0.5, noise_scale=0)
    exact = nqm.expected_loss(q, 0.5, 8, 40, every=2)[1:]
    assert [r["val/loss"] for r in reporter.rows] == pytest.approx(exact, rel=1e-5)


def mean_and_error(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array(rows)
    return values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values))


def mean_losses(seeds: int, **changes) -> tuple[tuple, tuple]:
    """(mean, standard error) of val/loss and of train/loss per report over `seeds` trials."""
    val, tr = [], []
    for seed in range(seeds):
        reporter = ListReporter()
        config = nqm_base(seed=seed, steps=6, data={"samples": 1, "nqm": SMALL}, **changes)
        train(TrialConfig.model_validate(config), reporter)
        val.append([r["val/loss"] for r in reporter.rows])
        tr.append([r["train/loss"] for r in reporter.rows])
    return mean_and_error(val), mean_and_error(tr)


@pytest.mark.parametrize(
    ("batch", "momentum", "nesterov"), [(4, 0.0, False), (2, 0.6, True)], ids=["sgd", "nesterov"]
)
def test_mean_loss_of_seeded_trials_is_the_exact_expected_loss(batch, momentum, nesterov):
    """The task's noise is C / B: 200 seeded trials of a d = 4 problem, whose noise is most of
    the loss after a few steps, agree with lbs_tune.nqm.expected_loss within 4 standard errors
    at every step, and are far from the loss of noise C (one example a batch)."""
    lr = 0.8 if momentum == 0 else 0.4
    optimizer = {"name": "sgd", "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0}
    (mean, se), (train_mean, train_se) = mean_losses(
        200, batch_size=batch, optimizer=optimizer, lr={"base": lr}
    )
    q = nqm.quadratic(**SMALL)
    exact = nqm.expected_loss(q, lr, batch, 6, momentum=momentum, nesterov=nesterov)
    assert np.all(np.abs(mean - exact[1:]) < 4 * se), (mean, exact)
    wrong = nqm.expected_loss(q, lr, 1, 6, momentum=momentum, nesterov=nesterov)
    assert np.all(np.abs(mean - wrong[1:]) > 10 * se)
    # train/loss at step t is the batch's loss before its update: unbiased for E L(theta_t-1).
    assert np.all(np.abs(train_mean - exact[:-1]) < 4 * train_se)


def test_resume_is_bit_for_bit(cli, tmp_path):
    spec = write_spec(tmp_path / "nqm.yaml", nqm_base(optimizer__momentum=0.9))
    whole = tmp_path / "whole"
    assert cli("train", spec, "--out", whole)[0] == 0
    expected = read_jsonl(whole / "metrics.jsonl")
    # Roll a copy back to its checkpoint of step 16: the noise generator must resume there.
    out = tmp_path / "resumed"
    assert cli("train", spec, "--out", out)[0] == 0
    for step, path in run_checkpoints(out):
        if step > 16:
            path.unlink()
            path.parent.rmdir()
    code, stdout, _ = cli("train", spec, "--out", out)
    assert code == 0 and "resuming from the checkpoint of step 16" in stdout

    assert same_results(read_jsonl(out / "metrics.jsonl"), expected)


def test_past_the_stability_limit_the_trial_diverges(cli, tmp_path):
    # 2 / max h = 2: a rate of 2.2 grows the top dimension by 1.2 a step.
    base = nqm_base(lr={"base": 2.2}, divergence_loss=100, steps=400)
    spec = write_spec(tmp_path / "nqm.yaml", base)
    assert cli("train", spec, "--out", tmp_path / "run")[0] == 0
    last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["diverged"] is True and last["step"] < 400
    q = nqm.quadratic(dim=100, power=0.5)
    assert nqm.steps_to_target(q, 1.0, 2.2, 8, 400) == math.inf


def test_adam_runs_simulated_only_and_sharpness_is_max_h():
    reporter = ListReporter()
    config = nqm_base(
        optimizer={"name": "adamw", "weight_decay": 0.0},
        lr={"base": 0.05},
        sharpness={"every": 10, "batch": 1, "iterations": 20},
    )
    train(TrialConfig.model_validate(config), reporter)
    losses = [r["val/loss"] for r in reporter.rows]
    assert losses[-1] < losses[0]
    assert (
        nqm.exact_problem("adamw")
        == "adamw has no closed form on the noisy quadratic (simulated only)"
    )
    # The Hessian of L is diag(h): its top eigenvalue is h_1 = 1.
    top = [r["sharpness/top_eig"] for r in reporter.rows if "sharpness/top_eig" in r]
    assert top and top[0] == pytest.approx(1.0, rel=1e-4)


# ============================================================================ The tuned sweep


@pytest.mark.ray
def test_the_tuned_sweep_cut_small_writes_summary_able_studies(cli, ray_cluster, tmp_path):
    from analysis.known import known_answer
    from analysis.summary import read_summary
    from lbs_tune.storage import locate

    code, _, err = cli(
        "run", SWEEP, "--address", ray_cluster.address, "--storage", tmp_path,
        "--set", "base.data.nqm.dim=100", "--set", "base.steps=60",
        "--set", "grid.batch_size=[8,64]", "--set", "search.trials_per_point=2",
        "--set", "loggers.tensorboard=false",
    )  # fmt: skip
    assert code == 0, err
    folder = tmp_path / "nqm_tuned"
    summary = read_summary(locate(folder))
    assert [p.batch_size for p in summary.points] == [8, 64]
    assert all(p.counts["asked"] == 2 for p in summary.points)
    (known,) = known_answer(folder)
    assert known.batch_sizes == (8, 64) and len(known.steps) == 2
    assert known.reason is None and known.fit.s_min is not None


def test_a_steps_noise_is_that_of_its_own_batch_size():
    """Under a batch schedule the loop hands each step its batch size: the noise of the mean
    gradient scales as 1 / sqrt(B) of that size, and the batch holds B examples."""
    from lbs_tune.build import build_trial

    config = TrialConfig.model_validate(nqm_base())
    small, large = build_trial(config).task, build_trial(config).task
    x8, y8 = small.batch(0, 0, 8)
    x32, y32 = large.batch(0, 0, 32)  # the same draw of the same stream, at 4x the batch
    assert (len(y8), len(y32)) == (8, 32)
    assert np.allclose(x8.numpy(), 2 * x32.numpy(), rtol=1e-6)
