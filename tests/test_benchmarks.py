"""The benchmarks, at a tiny size: benchmarks/throughput.py prints both figures per case and a
summary line; benchmarks/analysis.py times Ray's loader and ours, process against process, on
the committed tiny experiment and a folder made of it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_EXPERIMENTS, raw_trials, without_ray_lines

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
CASE_FIELDS = {
    "model",
    "batch_size",
    "loop_images_per_s",
    "bare_images_per_s",
    "overhead_pct",
    "device",
    "precision",
    "channels_last",
    "torch",
    "warmup_steps",
    "timed_steps",
}


@pytest.fixture
def throughput():
    """The script as a module; torch's thread count is restored after the run changes it."""
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_tiny_cpu_run_prints_both_figures_per_case(throughput, capsys):
    # More timed steps than warm-up steps: the loop's figure then spans two reports.
    argv = "--device cpu --models resnet20,mlp --batch-sizes 8 --warmup 2 --steps 3"
    argv += " --repeats 2 --samples 32 --threads 1 --anchors --compile off,graphs"
    assert throughput.main(argv.split()) == 0
    *cases, summary = [
        json.loads(line) for line in without_ray_lines(capsys.readouterr().out).splitlines()
    ]

    assert [(c["model"], c["batch_size"]) for c in cases] == [("resnet20", 8), ("mlp", 8)]
    for case in cases:
        assert set(case) >= CASE_FIELDS
        assert case["loop_images_per_s"] > 0 and case["bare_images_per_s"] > 0
        ratio = case["bare_images_per_s"] / case["loop_images_per_s"]
        assert case["overhead_pct"] == pytest.approx((ratio - 1) * 100, abs=1)  # rounded figures
        assert (case["device"], case["precision"], case["channels_last"]) == ("cpu", "fp32", False)
        assert (case["warmup_steps"], case["timed_steps"]) == (2, 3)
        assert len(case["loop_runs"]) == len(case["bare_runs"]) == 2
        # The first mode's figure is the loop's; a mode that would run eagerly is not timed.
        assert case["compile"] == "off"
        assert case["images_per_s_off"] == case["loop_images_per_s"]
        assert case["runs_off"] == case["loop_runs"] and "runs_graphs" not in case
        assert case["images_per_s_graphs"] is None
        assert "CUDA graphs need a CUDA device" in case["fallback_graphs"]
        # Anchors, their ratios and MFU are H200 figures and a card's peak: CUDA only.
        assert not [k for k in case if k.startswith(("anchor", "ratio_to_anchor", "mfu"))]
    assert [c["shape"] for c in cases] == [[3, 32, 32], [40]]

    assert [(v["model"], v["within_target"]) for v in summary["cases"]] == [
        ("resnet20", cases[0]["overhead_pct"] <= 10),
        ("mlp", cases[1]["overhead_pct"] <= 10),
    ]
    assert summary["all_within_target"] == all(v["within_target"] for v in summary["cases"])
    assert "all_anchor_targets_met" not in summary


def test_throughput_anchor_cases_peaks_and_targets(throughput):
    assert throughput.parse_args(["--anchors"]).cases == [
        ("resnet20", 32), ("resnet20", 128), ("resnet20", 512), ("resnet20", 2048),
        ("wrn28_10", 128), ("wrn28_10", 512),
    ]  # fmt: skip
    assert throughput.parse_args(["--anchors", "--models", "mlp"]).cases == [
        ("mlp", 128),
        ("mlp", 512),
        ("mlp", 2048),
    ]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--compile", "off,fast"])
    assert throughput.peak_flops("NVIDIA H200") == throughput.peak_flops("NVIDIA H100 80GB HBM3")
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert throughput.peak_flops("NVIDIA GeForce GTX 1080") is None
    assert throughput.peak_flops(None) is None
    # ResNet-20 at batch 32: ANCHORS.md's 18,638 img/s with the step in one CUDA graph.
    resnet = {"model": "resnet20", "ratio_to_anchor_off": 0.2, "ratio_to_anchor_graphs": 1.05}
    assert throughput.anchor_verdict(resnet) == {"target": "ratio >= 1", "best": 1.05}
    # WRN-28-10: 10,354 img/s x 31.5 GFLOP = 33% of an H200's 989 TFLOP/s, short of 40%.
    mfu = round(10_354 * throughput.TRAIN_FLOPS["wrn28_10"] / 989e12, 4)
    wrn = {"model": "wrn28_10", "mfu_graphs": mfu, "anchor_source": "x"}
    assert throughput.anchor_verdict(wrn) == {"target": "mfu >= 0.4", "best": 0.3298}
    assert throughput.anchor_verdict({"model": "mlp", "mfu_off": 0.5}) is None


def test_tiny_analysis_benchmark_times_both_loaders_on_the_same_rows(tmp_path):
    script = ROOT / "benchmarks" / "analysis.py"
    argv = [sys.executable, str(script), "--tiny", "--no-ray-big", "--folder", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    *figures, first, cached = done.stdout.splitlines()
    real, report, big = (json.loads(line) for line in figures)
    reports = sum(len(t.reports) for t in raw_trials(TINY_EXPERIMENTS / "quickstart"))
    # Both loaders, each in its own process, read every trial and every report.
    assert (real["trials"], real["rows"]) == (real["ray_trials"], real["ray_rows"]) == (12, reports)
    assert real["first_load_s"] > 0 and real["ray_s"] > 0 and real["cached_load_s"] > 0
    assert real["first_load_share_of_ray"] == pytest.approx(
        real["first_load_s"] / real["ray_s"], abs=2e-3
    )
    assert report["report_s"] > 0 and (tmp_path / "report.html").exists()
    # 60 trials made of the 12: five times every report; Ray's loader skipped there.
    assert (big["trials"], big["rows"]) == (60, 5 * reports) and "ray_s" not in big
    fast = real["first_load_s"] <= 0.2 * real["ray_s"]  # as the script decides
    quick = real["cached_load_s"] <= 0.2
    assert first.split(": ") == [
        "PASS" if fast else "FAIL",
        "first load <= 1/5 of Ray's, process against process (real folder)",
    ]
    assert cached.split(": ") == ["PASS" if quick else "FAIL", "cached load <= 0.2 s (real folder)"]
    assert done.returncode == (0 if first.startswith("PASS") and cached.startswith("PASS") else 1)


def test_tiny_nqm_coverage_runs_the_protocol_with_confirmation_and_counts_what_holds():
    """benchmarks/nqm_coverage.py on a d = 100 NQM, 3 batch sizes x 3 trials, each best rate
    confirmed on 3 fresh seeds: one line per replicate and the coverage line."""
    script = ROOT / "benchmarks" / "nqm_coverage.py"
    tiny = ["base.data.nqm.dim=100", "grid.batch_size=[4, 16, 64]", "search.trials_per_point=3"]
    tiny += ["target.value=2", "base.target.value=2"]
    argv = [sys.executable, str(script), "--replicates", "2", "--jobs", "1"]
    for override in tiny:
        argv += ["--set", override]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    *replicates, closing = [
        json.loads(line) for line in without_ray_lines(done.stdout).split("\n") if line
    ]
    assert [r["replicate"] for r in replicates] == [0, 1] and closing["replicates"] == 2
    for r in replicates:
        assert len(r["measured_steps"]) == len(r["exact_steps"]) == 3
        assert r["exact"]["b_crit"] == pytest.approx(closing["exact"]["b_crit"])
    for name in ("s_min", "e_min", "b_crit"):
        count = sum(bool(r["exact"]["holds"][name]) for r in replicates)
        assert closing["coverage"]["summary"][name] == f"{count}/2 ({count / 2:.0%})"
