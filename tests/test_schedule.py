"""Trial costs, longest-first order and the makespan simulator, against figures worked by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import without_ray_lines

from lbs_tune.config import SweepSpec, TrialConfig, set_dotted
from lbs_tune.errors import UserError
from lbs_tune.schedule import (
    H200_DEVICE_RESIDENT,
    Job,
    images_per_s,
    longest_first,
    lower_bound,
    makespan,
    read_throughput,
    refine,
    sweep_jobs,
    trial_seconds,
    tune_grid_order,
)

ROOT = Path(__file__).resolve().parents[1]
# Two points: between them images/s is 2000 x 4^t with t = log(b / 100) / log(8).
TABLE = {("m", 100): 2000.0, ("m", 800): 8000.0}
CUBE_ROOT_4 = 4 ** (1 / 3)  # 1.5874: the images/s factor from batch 100 to 200 (t = 1/3)


# ============================================================================ Simulator


def test_whole_gpu_jobs_on_two_gpus():
    jobs = [Job(3, 1), Job(2, 1), Job(2, 1), Job(1, 1)]
    # t=0: A (3 s) on GPU 0, B (2 s) on GPU 1. t=2: B ends, C starts (ends 4).
    # t=3: A ends, D starts (ends 4). Makespan 4 = the bound max(3, (3+2+2+1)/2 = 4).
    assert makespan(jobs, 2, [0, 1, 2, 3]) == 4
    assert lower_bound(jobs, 2) == 4


def test_longest_first_beats_grid_order_that_puts_the_longest_last():
    jobs = [Job(1, 1)] * 4 + [Job(4, 1)]
    # Grid order: 1-s jobs in pairs at t=0 and t=1, the 4-s job starts at t=2 and ends at 6.
    assert makespan(jobs, 2, range(5)) == 6
    # Longest first: the 4-s job holds GPU 0 over 0-4 while GPU 1 runs the four 1-s jobs in turn.
    assert longest_first([j.seconds for j in jobs]) == [4, 0, 1, 2, 3]
    assert makespan(jobs, 2, longest_first([j.seconds for j in jobs])) == 4
    assert lower_bound(jobs, 2) == 4  # max(4, 8 / 2)


def test_fractions_pack_onto_the_gpu_with_least_room():
    jobs = [Job(4, 0.5), Job(4, 0.75), Job(4, 0.25), Job(4, 0.5)]
    # t=0: A (0.5) on GPU 0 leaves 0.5; B (0.75) only fits GPU 1, leaves 0.25. Best fit puts C
    # (0.25) on GPU 1 (least room that fits), so D (0.5) fits GPU 0: all four run over 0-4.
    # First fit (C on GPU 0) or the most room (GPU 0 too) would leave 0.25 + 0.25: D ends at 8.
    assert makespan(jobs, 2, range(4)) == 4
    # GPU-time 2 + 3 + 1 + 2 = 8 over 2 GPUs: the bound is 4, met.
    assert lower_bound(jobs, 2) == 4


def test_a_job_that_does_not_fit_holds_back_later_ones_only_without_backfill():
    jobs = [Job(4, 0.75), Job(4, 0.75), Job(2, 0.5), Job(5, 0.25)]
    # t=0: A and B leave 0.25 on each GPU; C (0.5) does not fit.
    # In order: D waits behind C; at t=4 C (ends 6) and D (ends 9) start: 9.
    assert makespan(jobs, 2, range(4), backfill=False) == 9
    # Backfill: D takes GPU 0's last quarter at t=0 (ends 5); C starts at t=4 and ends at 6.
    assert makespan(jobs, 2, range(4), backfill=True) == 6
    # Bound: max(longest 5, GPU-time (3 + 3 + 1 + 1.25) / 2 = 4.125) = 5.
    assert lower_bound(jobs, 2) == 5


def test_a_multi_gpu_job_waits_for_whole_free_gpus():
    # t=0: the 1-s job takes GPU 0, the 2-GPU job needs both whole: it runs over 1-4.
    assert makespan([Job(1, 1), Job(3, 2)], 2, [0, 1]) == 4
    # GPU-time 1 + 6 = 7 over 2 GPUs: the bound is 3.5.
    assert lower_bound([Job(1, 1), Job(3, 2)], 2) == 3.5


def test_impossible_inputs_are_refused():
    with pytest.raises(ValueError, match="each of the 2 jobs once"):
        makespan([Job(1, 1), Job(1, 1)], 2, [0, 0])
    with pytest.raises(ValueError, match="cannot run on 2 GPUs"):
        makespan([Job(1, 3)], 2, [0])
    with pytest.raises(ValueError, match="cannot run on 2 GPUs"):
        makespan([Job(1, 0)], 2, [0])


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


def test_refine_scales_a_models_curve_by_measured_over_predicted():
    # One measurement at half the predicted speed halves the whole curve.
    once = refine(TABLE, {("m", 100): 1000})
    assert images_per_s(once, "m", 200) == pytest.approx(1000 * CUBE_ROOT_4)
    assert images_per_s(once, "m", 800) == pytest.approx(4000)
    # Two: the ratio goes 0.5 -> 1 over 100 -> 800, so at 200 it is 0.5 x 2^(1/3), and
    # 2000 x 4^(1/3) x 0.5 x 2^(1/3) = 1000 x 8^(1/3) = 2000.
    twice = refine(TABLE, {("m", 100): 1000, ("m", 800): 8000})
    assert images_per_s(twice, "m", 200) == pytest.approx(2000)
    # A model the table lacks takes what was measured.
    assert images_per_s(refine(TABLE, {("n", 64): 500}), "n", 1024) == 500


def test_refined_costs_reorder_the_remaining_trials():
    table = TABLE | {("n", 100): 1000.0}
    # m: 100 steps x 100 / 2000 = 5 s; n: 100 x 100 / 1000 = 10 s: n first.
    remaining = [TrialConfig(model=name, batch_size=100, steps=100) for name in ("m", "n")]
    before = [trial_seconds(c, 45_000, table) for c in remaining]
    assert before == [5, 10] and longest_first(before) == [1, 0]
    # m measured at 500 images/s, a quarter of the prediction: 20 s, now first; n unchanged.
    refined = refine(table, {("m", 100): 500})
    after = [trial_seconds(c, 45_000, refined) for c in remaining]
    assert after == [20, 10] and longest_first(after) == [0, 1]


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


# ============================================================================ Orders


def test_tune_grid_order_is_ray_tunes_own():
    from ray.tune.search.variant_generator import generate_variants

    grid = {"seed": [0, 1], "lr.scaling": ["none", "linear"], "batch_size": [16, 32, 64]}
    spec = SweepSpec(name="s", base={"steps": 1}, grid=grid)
    tree = {"steps": 1}
    for key, values in grid.items():
        set_dotted(tree, key, {"grid_search": values})
    made = [
        (s["config"]["seed"], s["config"]["lr"]["scaling"], s["config"]["batch_size"])
        for _, s in generate_variants({"config": tree})
    ]
    points = [tuple(p.values()) for p in spec.points()]
    assert [points[i] for i in tune_grid_order(spec)] == made
    # Ray varies batch_size (first by name) fastest, where the file's order varies it last.
    assert made[:3] == [(0, "none", 16), (0, "none", 32), (0, "none", 64)]
    assert sorted(tune_grid_order(spec)) == list(range(12))


# ============================================================================ Benchmark


@pytest.fixture
def bench():
    path = ROOT / "benchmarks" / "makespan.py"
    spec = importlib.util.spec_from_file_location("makespan_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KEYS = {"sweep", "trials", "gpus", "grid_h", "longest_first_h", "lower_bound_h", "grid_ratio"}
KEYS |= {"longest_first_ratio", "within_target", "table"}


def lines_of(capsys) -> list[dict]:
    return [json.loads(line) for line in without_ray_lines(capsys.readouterr().out).splitlines()]


def test_benchmark_prints_each_sweeps_makespans_and_meets_its_target(bench, capsys):
    assert bench.main([]) == 0
    *sweeps, summary = lines_of(capsys)
    assert [s["sweep"] for s in sweeps] == ["cifar10", "cifar10_wrn"]
    for line in sweeps:
        assert set(line) >= KEYS and (line["trials"], line["gpus"]) == (60, 8)
        assert line["grid_ratio"] >= 1 and line["longest_first_ratio"] >= 1
        assert line["grid_h"] == pytest.approx(line["grid_ratio"] * line["lower_bound_h"], 1e-3)
    assert summary["all_within_target"] and all(s["within_target"] for s in sweeps)


def test_benchmark_reads_a_measured_table(bench, capsys, tmp_path):
    measured = tmp_path / "throughput.jsonl"
    cases = {b: H200_DEVICE_RESIDENT[("resnet20", b)] / 2 for b in (32, 128, 512, 2048)}
    measured.write_text(
        "".join(
            json.dumps({"model": "resnet20", "batch_size": b, "loop_images_per_s": v}) + "\n"
            for b, v in cases.items()
        )
    )
    argv = [str(ROOT / "sweeps" / "cifar10.yaml"), "--gpus", "2"]
    assert bench.main([*argv, "--throughput", str(measured), "--in-order"]) == 0
    [line, _] = lines_of(capsys)
    assert (line["table"], line["gpus"], line["placement"]) == (str(measured), 2, "in order")
    assert line["grid_ratio"] >= 1 and line["longest_first_ratio"] >= 1
    # Batch 16 runs at batch 32's measured speed: 60 epochs x 2812 steps x 16 / 1740 images/s.
    assert line["longest_trial_h"] == pytest.approx(60 * 2812 * 16 / 1740 / 3600, abs=1e-4)
