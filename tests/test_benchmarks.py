"""benchmarks/throughput.py: a tiny CPU run prints both figures per case and a summary line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import without_ray_lines

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
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
    argv += " --repeats 2 --samples 32 --threads 1 --anchors"
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
        assert "anchor_images_per_s" not in case  # anchors are H200 figures: CUDA only
    assert [c["shape"] for c in cases] == [[3, 32, 32], [40]]

    assert [(v["model"], v["within_target"]) for v in summary["cases"]] == [
        ("resnet20", cases[0]["overhead_pct"] <= 10),
        ("mlp", cases[1]["overhead_pct"] <= 10),
    ]
    assert summary["all_within_target"] == all(v["within_target"] for v in summary["cases"])
