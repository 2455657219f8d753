"""lbs_tune.schedule: trial costs and the longest-first order, against figures worked by hand."""

from __future__ import annotations

import pytest

from lbs_tune.config import TrialConfig
from lbs_tune.errors import UserError
from lbs_tune.schedule import (
    images_per_s,
    read_throughput,
    sweep_jobs,
    trial_seconds,
)
from lbs_tune.sweep import SweepSpec

# Two points: between them images/s is 2000 x 4^t with t = log(b / 100) / log(8).
TABLE = {("m", 100): 2000.0, ("m", 800): 8000.0}
CUBE_ROOT_4 = 4 ** (1 / 3)  # 1.5874: the images/s factor from batch 100 to 200 (t = 1/3)


# ============================================================================ Costs


def test_loglog_interpolation_between_two_points_and_flat_beyond():
    # Batch 200: t = log(200/100) / log(800/100) = 1/3, so 2000 x 4^(1/3) = 3174.80.
    assert images_per_s(TABLE, "m", 200) == pytest.approx(3174.80, abs=0.01)
    assert images_per_s(TABLE, "m", 100) == 2000 and images_per_s(TABLE, "m", 800) == 8000
    assert images_per_s(TABLE, "m", 16) == 2000 and images_per_s(TABLE, "m", 8192) == 8000


def test_unknown_model_takes_a_stand_in_or_is_refused():
    assert images_per_s(TABLE, "mlp", 200, stand_in="m") == pytest.approx(2000 * CUBE_ROOT_4)
    with pytest.raises(UserError, match=r"no throughput figures for model 'mlp' .*has m"):
        images_per_s(TABLE, "mlp", 200)


def test_trial_seconds_from_steps_and_micro_batch():
    # 100 steps x 200 images / 3174.80 images/s = 6.2996 s.
    config = TrialConfig(model="m", batch_size=200, steps=100)
    assert trial_seconds(config, 45_000, TABLE) == pytest.approx(6.2996, abs=1e-4)
    # Batch 800 in micro-batches of 200 runs at batch 200's speed: 10 x 800 / 3174.80 = 2.5198 s.
    config = TrialConfig(model="m", batch_size=800, max_device_batch=200, steps=10)
    assert trial_seconds(config, 45_000, TABLE) == pytest.approx(2.5198, abs=1e-4)
    # 2 epochs of 45,000 at batch 100: 2 x 450 steps x 100 / 2000 = 45 s.
    config = TrialConfig(model="m", batch_size=100, epochs=2)
    assert trial_seconds(config, 45_000, TABLE) == 45


def test_sweep_jobs_take_fractions_from_resources_by_batch_size():
    spec = SweepSpec(
        name="s",
        base={"model": "m", "steps": 10},
        grid={"batch_size": [16, 128, 800]},
        resources={"gpu": {32: 0.25, 128: 0.5, "default": 1}},
    )
    jobs = sweep_jobs(spec, lambda config: 45_000, TABLE)
    assert [j.gpu for j in jobs] == [0.25, 0.5, 1]
    # Batch 16, below the table, runs flat at 2000 images/s: 10 x 16 / 2000 = 0.08 s.
    # Batch 128: t = log 1.28 / log 8 = 0.11871, 2000 x 4^t = 2357.76 images/s: 0.5429 s.
    # Batch 800: 10 x 800 / 8000 = 1 s.
    assert [j.seconds for j in jobs] == pytest.approx([0.08, 0.5429, 1], abs=1e-4)


def test_read_throughput_takes_the_cases_of_throughput_py():
    text = "\n".join(
        [
            '{"model": "resnet20", "batch_size": 32, "loop_images_per_s": 3000.5, "x": 1}',
            "(pid=1) a log line",
            '{"model": "resnet20", "batch_size": 128, "loop_images_per_s": 9000}',
            '{"summary": "loop overhead", "cases": []}',
        ]
    )
    assert read_throughput(text, "t.jsonl") == {("resnet20", 32): 3000.5, ("resnet20", 128): 9000}
    twice = text + '\n{"model": "resnet20", "batch_size": 32, "loop_images_per_s": 1}'
    with pytest.raises(UserError, match=r"t\.jsonl:5: a second figure for resnet20 at batch 32"):
        read_throughput(twice, "t.jsonl")
    with pytest.raises(UserError, match=r"t\.jsonl:1: resnet20 at batch 32 has no positive 'ips'"):
        read_throughput(text, "t.jsonl", field="ips")
    with pytest.raises(UserError, match=r"t\.jsonl: no throughput cases"):
        read_throughput('{"summary": 1}', "t.jsonl")
