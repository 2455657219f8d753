"""lbs_tune.names: the one home of a metric's direction and of "the target is reached"."""

from __future__ import annotations

import numpy as np

from lbs_tune.names import METRICS, comparison, direction, first_reached, meets


def test_the_direction_of_a_metric_follows_its_name():
    assert direction("val/accuracy") == "max" and direction("test/accuracy") == "max"
    assert direction("train/loss") == "min" and direction("val/loss") == "min"
    assert direction("val/perplexity") == "min" and direction("test/perplexity") == "min"
    assert direction("val/miou") == "max" and direction("test/pixel_accuracy") == "max"
    assert direction("images_per_s") is None and direction("lr") is None
    assert (comparison("val/accuracy"), comparison("train/loss")) == ("≥", "≤")
    assert comparison("val/perplexity", ascii=True) == "<="


def test_every_metric_with_a_score_in_its_name_has_a_direction():
    scored = [m for m in METRICS if m.split("/")[-1] in ("loss", "accuracy", "perplexity", "miou")]
    assert len(scored) == 10  # train, val, test losses and accuracies; perplexities; mIoUs
    assert all(direction(m) is not None for m in scored)


def test_a_target_is_met_on_its_own_value_and_beyond():
    assert meets(0.5, 0.5, "max") and meets(0.51, 0.5, "max") and not meets(0.49, 0.5, "max")
    assert meets(120.0, 120.0, "min") and meets(80.0, 120.0, "min") and not meets(121, 120, "min")
    values = np.array([0.1, 0.5, 0.7, np.nan])
    with np.errstate(invalid="ignore"):
        assert meets(values, 0.5, "max").tolist() == [False, True, True, False]


def test_first_reached_is_the_smallest_step_whose_value_meets_the_target():
    values = {10: 300.0, 20: 150.0, 30: 90.0, 40: 80.0}  # a perplexity falling
    assert first_reached(values, 100.0, "min") == 30
    assert first_reached(values, 50.0, "min") is None
    assert first_reached({5: 0.9, 1: 0.95}, 0.9, "max") == 1  # by step, not by order given
    assert first_reached({}, 0.5, "max") is None
