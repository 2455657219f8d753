"""Learning-rate rules against numbers worked out by hand."""

import math

import pytest

from lbs_tune.config import KeyedError, LRConfig, OptimizerConfig, epoch_steps
from lbs_tune.rules import lr_at, moved_optimizer, peak_lr, sde_moved, warmup_steps


def test_linear_rule_goyal_example():
    # Goyal et al. 2017: 0.1 per 256 images; at 8192 the LR is 0.1 x 32 = 3.2.
    assert peak_lr(
        LRConfig(base=0.1, base_batch_size=256, scaling="linear"), 8192
    ) == pytest.approx(3.2)


def test_sqrt_rule_scales_by_sqrt_k_not_sqrt_of_product():
    rule = LRConfig(base=0.1, base_batch_size=256, scaling="sqrt")
    # k = 8192 / 256 = 32: 0.1 x sqrt(32) = 0.5657, not sqrt(0.1 x 32) = 1.789.
    assert peak_lr(rule, 8192) == pytest.approx(0.1 * math.sqrt(32))
    assert peak_lr(rule, 8192) != pytest.approx(math.sqrt(0.1 * 32))
    assert peak_lr(rule, 1024) == pytest.approx(0.2)  # k = 4


def test_no_scaling_keeps_base():
    assert peak_lr(LRConfig(base=0.05, scaling="none"), 4096) == 0.05


def test_warmup_over_five_epochs_of_50000_examples():
    rule = LRConfig(base=0.1, base_batch_size=256, scaling="linear", warmup_epochs=5)
    spe = epoch_steps(50_000, 8192)  # 6.1035 steps per epoch: batches run across epochs
    assert spe == pytest.approx(6.1035, abs=1e-4)
    assert warmup_steps(rule, spe) == 31  # round(5 x 6.1035) = round(30.52): the same examples
    total = 600
    # lr(t) = 0.1 + (3.2 - 0.1) x (t + 1) / 31 during warmup.
    assert lr_at(0, rule, 8192, total, spe) == pytest.approx(0.1 + 3.1 / 31)
    assert lr_at(14, rule, 8192, total, spe) == pytest.approx(0.1 + 3.1 * 15 / 31)  # 1.6
    assert lr_at(30, rule, 8192, total, spe) == pytest.approx(3.2)
    assert lr_at(31, rule, 8192, total, spe) == pytest.approx(3.2)  # constant after


def test_warmup_from_zero():
    rule = LRConfig(
        base=0.1, base_batch_size=256, scaling="linear", warmup_epochs=5, warmup_from="zero"
    )
    # Batch 1000: 50 steps per epoch, 250 warmup steps to 0.1 x 1000 / 256 = 0.390625.
    spe = epoch_steps(50_000, 1000)
    assert spe == 50
    assert lr_at(0, rule, 1000, 1000, spe) == pytest.approx(0.390625 / 250)
    assert lr_at(124, rule, 1000, 1000, spe) == pytest.approx(0.390625 / 2)
    assert lr_at(249, rule, 1000, 1000, spe) == pytest.approx(0.390625)


def test_step_decay_at_budget_fractions():
    rule = LRConfig(base=1.0, decay="step", milestones=(0.5, 0.75), gamma=0.1)
    assert lr_at(49, rule, 256, 100, 10) == 1.0
    assert lr_at(50, rule, 256, 100, 10) == pytest.approx(0.1)
    assert lr_at(74, rule, 256, 100, 10) == pytest.approx(0.1)
    assert lr_at(75, rule, 256, 100, 10) == pytest.approx(0.01)


def test_cosine_and_linear_decay_after_warmup():
    cosine = LRConfig(base=1.0, decay="cosine", warmup_epochs=1)
    # 10 warmup steps, then 90 decay steps: halfway (step 55) cosine gives 0.5.
    assert lr_at(10, cosine, 256, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, cosine, 256, 100, 10) == pytest.approx(0.5)
    assert lr_at(99, cosine, 256, 100, 10) > 0
    linear = LRConfig(base=1.0, decay="linear")
    assert lr_at(0, linear, 256, 100, 10) == 1.0
    assert lr_at(25, linear, 256, 100, 10) == pytest.approx(0.75)
    assert lr_at(99, linear, 256, 100, 10) == pytest.approx(0.01)


def test_warmup_never_goes_down_for_small_batches():
    # Below the base batch size the sqrt rule gives a peak under the base LR: hold the peak.
    rule = LRConfig(base=0.1, base_batch_size=256, scaling="sqrt", warmup_epochs=1)
    assert lr_at(0, rule, 64, 1000, 100) == pytest.approx(0.05)


def test_poly_decay_after_warmup():
    # Needs LRConfig's `decay: poly` and `power` (config.py, issue 10).
    rule = LRConfig.model_validate({"base": 1.0, "decay": "poly", "power": 2, "warmup_epochs": 1})
    # 10 warmup steps, then 100 decay steps with progress p = (step - 10) / 100: lr = (1 - p)².
    assert lr_at(10, rule, 256, 110, 10) == pytest.approx(1.0)
    assert lr_at(60, rule, 256, 110, 10) == pytest.approx(0.25)  # p = 0.5
    assert lr_at(100, rule, 256, 110, 10) == pytest.approx(0.01)  # p = 0.9: 0.1²
    assert lr_at(109, rule, 256, 110, 10) == pytest.approx(1e-4)  # p = 0.99: 0.01²
    # Power 1 is the linear decay; power 0.5 at p = 0.25 gives sqrt(0.75) = 0.866.
    for step in (0, 37, 99):
        assert lr_at(step, rule.model_copy(update={"power": 1.0}), 256, 100, 10) == pytest.approx(
            lr_at(step, LRConfig(base=1.0, decay="linear", warmup_epochs=1), 256, 100, 10)
        )
    half = LRConfig.model_validate({"base": 2.0, "decay": "poly", "power": 0.5})
    assert lr_at(25, half, 256, 100, 10) == pytest.approx(2.0 * math.sqrt(0.75))


# --------------------------------------------------------------------------- SDE rule for Adam
# Malladi et al. 2022, the square-root scaling rule: a batch k times larger trains with LR x
# sqrt(k), 1 - beta1 and 1 - beta2 times k, and eps / sqrt(k). Values below worked by hand.

ADAMW = OptimizerConfig(name="adamw", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
SDE = LRConfig(base=1e-3, base_batch_size=256, scaling="sde")


def test_sde_rule_four_times_the_batch():
    # k = 1024 / 256 = 4: LR 1e-3 x 2; beta1 1 - 4 x 0.1 = 0.6; beta2 1 - 4 x 0.001 = 0.996;
    # eps 1e-8 / 2.
    assert peak_lr(SDE, 1024) == pytest.approx(2e-3)
    moved = moved_optimizer(ADAMW, SDE, 1024)
    assert moved.betas == pytest.approx((0.6, 0.996)) and moved.eps == pytest.approx(5e-9)
    # Weight decay and the rest stay: the rule moves lr, betas and eps only.
    assert moved.model_dump(exclude={"betas", "eps"}) == ADAMW.model_dump(exclude={"betas", "eps"})


def test_sde_rule_a_quarter_of_the_batch():
    # k = 64 / 256 = 1/4: LR 1e-3 / 2; beta1 1 - 0.1 / 4 = 0.975; beta2 1 - 0.001 / 4 = 0.99975;
    # eps 1e-8 x 2.
    assert peak_lr(SDE, 64) == pytest.approx(5e-4)
    moved = moved_optimizer(ADAMW, SDE, 64)
    assert moved.betas == pytest.approx((0.975, 0.99975)) and moved.eps == pytest.approx(2e-8)


def test_sde_rule_at_the_base_batch_changes_nothing():
    moved = moved_optimizer(ADAMW, SDE, 256)
    assert moved.betas == pytest.approx(ADAMW.betas) and moved.eps == pytest.approx(1e-8)


def test_sde_rule_moves_the_default_eps():
    # eps unset: AdamW's 1e-8, over sqrt(9) = 3 at batch 2304 (k = 9).
    moved = moved_optimizer(OptimizerConfig(name="adamw"), SDE, 2304)
    assert moved.eps == pytest.approx(1e-8 / 3)


def test_sde_rule_refuses_a_batch_beyond_its_reach():
    # beta1 0.9: k (1 - beta1) < 1 needs k < 10. k = 9 gives beta1 0.1; k = 10 gives 0.
    assert sde_moved((0.9, 0.999), 1e-8, 9)[0] == pytest.approx((0.1, 0.991))
    with pytest.raises(ValueError, match=r"beta1 0.9 to 1 - 10 x 0.1 = .*outside \(0, 1\)"):
        sde_moved((0.9, 0.999), 1e-8, 10)
    with pytest.raises(KeyedError, match=r"batch_size 2560 .*under 10 x the base") as caught:
        moved_optimizer(ADAMW, SDE, 2560)
    assert caught.value.key == "lr.scaling"
    # beta2 is the one out of range when it is the further from 1.
    with pytest.raises(ValueError, match=r"beta2 0\.5 to 1 - 4 x 0\.5 = -1"):
        sde_moved((0.95, 0.5), 1e-8, 4)


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_sde_rule_is_for_adamw_only(name):
    with pytest.raises(KeyedError, match=f"optimizer.name is {name}: use adamw") as caught:
        moved_optimizer(OptimizerConfig(name=name), SDE, 512)
    assert caught.value.key == "lr.scaling"


@pytest.mark.parametrize("scaling", ["none", "linear", "sqrt"])
def test_other_rules_leave_the_optimizer_alone(scaling):
    rule = LRConfig(base=1e-3, base_batch_size=256, scaling=scaling)
    assert moved_optimizer(ADAMW, rule, 4096) is ADAMW
