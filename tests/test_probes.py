"""A branched sweep as plain data (`lbs_tune.probes`): its trials and their count, where a point
falls among the reference's checkpoints, each branch's and comparison run's config (the LR and
Adam's hyper-parameters moved by the rule), the losses to local critical batch sizes to a plan,
and the branch section's one-line errors. No Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lbs_tune.branching import LocalCBS, local_cbs, smoothed
from lbs_tune.config import BRANCH_KEY, TrialConfig, trial_config
from lbs_tune.probes import (
    Point,
    Slot,
    arm_config,
    branch_config,
    branch_loss,
    place,
    plan,
    point_sizes,
    slots,
    window,
)
from lbs_tune.rules import sde_moved
from lbs_tune.spec import load_spec
from lbs_tune.sweep import BranchSpec

QUICKSTART_BRANCH = Path(__file__).parent.parent / "sweeps" / "quickstart_branch.yaml"
TRAIN = 14_400  # MNIST-1D of 20,000 samples: its training split


def test_the_trials_of_a_branch_sweep_and_their_count(data_dir):
    spec = load_spec(QUICKSTART_BRANCH)
    found = slots(spec.branch)
    # The reference, 4 points x 5 multiples x 3 seeds, 3 arms x 3 seeds.
    assert spec.trial_count == len(found) == 1 + 60 + 9 == 70
    assert [s.index for s in found] == list(range(70))
    assert found[0] == Slot(0, "reference")
    assert found[1] == Slot(1, "branch", 0, 1, 0) and found[60] == Slot(60, "branch", 3, 16, 2)
    assert [(s.arm, s.seed) for s in found[61:64]] == [("schedule", 0), ("small", 0), ("large", 0)]
    no_compare = BranchSpec(points=[0.5], multiples=[1, 2], seeds=[3], compare_seeds=[])
    assert no_compare.trial_count == len(slots(no_compare)) == 3


def test_a_point_falls_on_the_newest_checkpoint_at_or_before_it():
    checkpoints = [(10, 320, "a"), (20, 640, "b"), (30, 960, "c")]
    assert place(checkpoints, 700, final=False) == Point("b", 20, 640)
    assert place(checkpoints, 640, final=False) == Point("b", 20, 640)  # at it
    # Past the newest checkpoint: undecided until the reference ends (a later one may come).
    assert place(checkpoints, 1000, final=False) is None
    assert place(checkpoints, 1000, final=True) == Point("c", 30, 960)
    # Before the first checkpoint: the first.
    assert place(checkpoints, 100, final=False) == Point("a", 10, 320)
    assert place([], 100, final=True) is None


def reference(**changes) -> TrialConfig:
    base = {
        "batch_size": 32,
        "epochs": 12,
        "lr": {"base": 0.01, "base_batch_size": 16, "scaling": "linear", "warmup_epochs": 1},
        "optimizer": {"name": "sgd"},
        "target": {"metric": "val/accuracy", "value": 0.5, "stop": True},
        "noise_scale": {"every": 1, "micro_batch": 4},
    }
    return TrialConfig.model_validate({**base, **changes})


def test_a_branch_moves_the_lr_by_the_linear_rule_from_the_reference_peak():
    spec = BranchSpec(points=[0.5], examples=8192, reports=4)
    ref = reference()
    point = Point("/x/checkpoint_000003/state.pt", 720, 23_040)
    tree = branch_config(ref, spec, Slot(5, "branch", 0, 8, 2), point, TRAIN)
    config = trial_config(tree)
    assert tree[BRANCH_KEY] == {
        "phase": "branch",
        "point": 0,
        "k": 8,
        "seed": 2,
        "examples_at": 23_040,
        "step_at": 720,
        "label": "point0_k8_seed2",
    }
    assert (config.batch_size, config.seed, config.examples) == (256, 2, 8192)
    assert config.start_from == point.checkpoint
    # The reference trains at 0.01 x 32/16 = 0.02; the branch at 8 x that, with no warmup.
    assert config.lr.base == 0.02 and config.lr.base_batch_size == 32
    assert config.lr.scaling == "linear" and config.lr.warmup_epochs == 0
    # Four reports over Δ: every 8192 / 4 / 256 = 8 steps; one checkpoint, at the end.
    assert config.eval_every * TRAIN / 256 == pytest.approx(8)
    assert config.checkpoint_every * TRAIN == pytest.approx(8192)
    assert config.target.stop is False and config.noise_scale is None


def test_a_branch_under_the_sde_rule_moves_adams_betas_from_those_of_the_reference():
    adam = {"name": "adamw", "betas": [0.9, 0.99], "eps": 1e-8}
    sde = {"base": 1e-3, "base_batch_size": 16, "scaling": "sde"}
    ref = reference(optimizer=adam, lr=sde)
    spec = BranchSpec(points=[0.5], multiples=[1, 2, 4], scaling="sde", examples=512)
    config = trial_config(
        branch_config(ref, spec, Slot(3, "branch", 0, 4, 0), Point("p", 1, 32), TRAIN)
    )
    # The reference trains at k = 2 of its own base: betas 0.8 and 0.98, eps 1e-8 / sqrt(2).
    at_reference = sde_moved((0.9, 0.99), 1e-8, 2)
    assert config.optimizer.betas == at_reference[0]
    assert config.optimizer.eps == at_reference[1]
    assert config.lr.base == pytest.approx(1e-3 * math.sqrt(2))
    # The branch's own k = 4 moves them on from there in the loop: 1 - 4 x 0.2 = 0.2.
    moved = sde_moved(config.optimizer.betas, config.optimizer.eps, 4)
    assert moved[0] == pytest.approx((0.2, 0.92))
    # AdamW's branches default to the square-root rule.
    default = BranchSpec(points=[0.5], multiples=[1, 2], examples=512)
    tree = branch_config(ref, default, Slot(2, "branch", 0, 2, 0), Point("p", 1, 32), TRAIN)
    assert trial_config(tree).lr.scaling == "sqrt"


def test_the_comparison_runs_the_reference_budget_on_the_schedule_and_constant_batches():
    spec = BranchSpec(points=[0.5], examples=8192)
    ref = reference()
    schedule = ((0, 32), (23_040, 64), (46_080, 256))
    arms = {
        arm: trial_config(
            arm_config(ref, spec, Slot(0, "compare", seed=1, arm=arm), schedule, TRAIN)
        )
        for arm in ("schedule", "small", "large")
    }
    assert all(c.examples == 12 * TRAIN and c.seed == 1 for c in arms.values())
    assert arms["schedule"].batch_schedule == schedule and arms["schedule"].batch_size == 32
    assert arms["small"].batch_size == 32 and arms["small"].batch_schedule is None
    assert arms["large"].batch_size == 256
    # The branches' rule at every batch; the reference's warmup kept (a run from scratch).
    assert all(c.lr.scaling == "linear" and c.lr.base == 0.02 for c in arms.values())
    assert all(c.lr.warmup_epochs == 1 for c in arms.values())


def test_the_default_window_is_the_papers_fraction_rounded_to_whole_reports():
    # 2/600 of 172,800 examples is 576; a multiple of 4 reports x 32 x lcm(1..16) = 2048.
    spec = BranchSpec(points=[0.5])
    assert window(spec, reference(), TRAIN) == 2048
    assert window(BranchSpec(points=[0.5], examples=4096), reference(), TRAIN) == 4096


def test_losses_become_local_critical_batch_sizes_and_a_plan():
    # Two seeds. Point 0: only k = 1 within 0.01; point 1: up to k = 4; point 2: every k.
    losses = {
        0: {1: [2.0, 2.0], 2: [2.05, 2.04], 4: [2.2, 2.1]},
        1: {1: [1.0, 1.0], 2: [1.004, 1.02], 4: [1.008, 1.0], 8: [1.5, 1.5]},
        2: {1: [0.5, 0.5], 2: [0.5, 0.5], 4: [0.502, 0.5], 8: [0.505, 0.51]},
    }
    losses[0][8] = [math.inf, math.inf]
    sizes = point_sizes(losses, 32, 0.01)
    assert sizes == {
        0: LocalCBS(32, 64, (32, 32)),
        # Seed 1 alone: k = 2 fails (1.02), k = 4 passes against k = 1 and 2: 128.
        1: LocalCBS(128, 256, (128, 128)),
        2: LocalCBS(256, None, (256, 256)),
    }
    assert sizes[1] == local_cbs(losses[1], 32, 0.01)
    points = [Point("a", 100, 3200), Point("b", 200, 6400), Point("c", 400, 12_800)]
    # Double while the CBS is at least twice the batch: 32 -> 128 at 6400, -> 256 at 12,800.
    assert plan(points, sizes, 32, 1024) == ((0, 32), (6400, 128), (12_800, 256))
    assert plan(points, sizes, 32, 64) == ((0, 32), (6400, 64))


def test_a_branch_loss_is_the_smoothed_series_and_a_diverged_one_is_infinite():
    assert branch_loss([2.0, 1.0, 0.8, 0.6], 0.5) == smoothed([2.0, 1.0, 0.8, 0.6], 0.5)
    assert branch_loss([2.0, None], 0.5) == math.inf
    assert branch_loss([2.0, math.nan], 0.5) == math.inf
    assert branch_loss([], 0.5) == math.inf
    # One that errored: what it reported before failing is no loss after Δ.
    assert branch_loss([2.0, 1.0, 0.8, 0.6], 0.5, errored=True) == math.inf


@pytest.mark.parametrize(
    "changes, key, message",
    [
        (["branch.examples=1000"], "branch.examples",
         "1000 is not a multiple of reports x B x every k = 2048; use 2048"),
        (["base.lr.decay=cosine"], "base.lr.decay", "must be constant after warmup"),
        (["branch.multiples=[2, 4]"], "branch.multiples", "starting at 1"),
        (["branch.points=[0.5, 1.5]"], "branch.points", "points_in: examples"),
        (["branch.points=[0.5, 0.2]"], "branch.points", "in increasing order"),
        (["grid.seed=[0, 1]"], "branch", "remove the grid section"),
        (["branch.scaling=sde"], "branch.scaling", "sde is AdamW's rule"),
        (["branch.multiples=[1, 2, 512]", "branch.examples=65536"], "branch.multiples",
         "at batch 16384: batch_size 16384 is larger than the 14400 training examples"),
        (["base.keep_checkpoints=2"], "base.keep_checkpoints", "every checkpoint"),
        (["branch.seeds=[0, 0]"], "branch.seeds", "each seed once"),
    ],
)  # fmt: skip
def test_a_bad_branch_section_is_one_line_at_its_key(
    cli, tmp_path, data_dir, changes, key, message
):
    sets = [arg for change in changes for arg in ("--set", change)]
    code, out, err = cli("run", QUICKSTART_BRANCH, "--dry-run", "--storage", tmp_path / "st", *sets)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    # Placed at the override that set the key, else at the key's line of the file.
    placed = [f"--set {change}" for change in changes] + [f"{QUICKSTART_BRANCH}:"]
    assert any(err.startswith(f"lbs-tune: error: {p}") for p in placed), err
    assert f": {key}: " in err, err
    assert message in err, err


@pytest.mark.parametrize(
    "schedule, problem",
    [
        ([[0, 64], [100, 128]], "is not batch_schedule's first batch 64"),
        ([[0, 32], [100, 32000]], "batch_size 32000 is larger than the 14400"),
        ([[10, 32]], "the first entry starts at 10 examples; it must start at 0"),
    ],
)
def test_a_bad_batch_schedule_is_one_line_at_its_key(cli, tmp_path, data_dir, schedule, problem):
    text = (
        QUICKSTART_BRANCH.read_text()
        .split("branch:\n")[0]
        .replace("name: quickstart_branch", "name: s")
    )
    spec = tmp_path / "s.yaml"
    spec.write_text(text + f"  batch_schedule: {schedule}\n")
    code, _, err = cli("run", spec, "--dry-run", "--storage", tmp_path / "st")
    assert code == 2 and err.count("\n") == 1, err
    assert problem in err and "batch_s" in err
