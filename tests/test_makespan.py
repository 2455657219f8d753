"""benchmarks/makespan.py: the makespan simulator, Ray Tune's grid order and the benchmark's
lines, against figures worked by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import without_ray_lines

from lbs_tune.names import set_dotted
from lbs_tune.schedule import H200_DEVICE_RESIDENT, Job, longest_first
from lbs_tune.sweep import SweepSpec

ROOT = Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "benchmarks" / "makespan.py"
    spec = importlib.util.spec_from_file_location("makespan_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_module = _load()
makespan, lower_bound = bench_module.makespan, bench_module.lower_bound
tune_grid_order = bench_module.tune_grid_order


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


@pytest.fixture
def bench():
    return bench_module


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
