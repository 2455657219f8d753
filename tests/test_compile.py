"""`compile` and `max_device_batch: auto` (lbs_tune.compiled): torch.compile gives the eager
trial's metrics and checkpoints that resume in either mode; a step that cannot be captured in a
CUDA graph says why in one line and runs eagerly; the micro-batch search over divisors.

The CUDA paths (the captured step, the memory probe) need a GPU and are not run here.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, QUICKSTART_TINY, KeepingReporter, read_jsonl, tiny_base, write_spec

from lbs_tune.checkpoints import load_checkpoint
from lbs_tune.compiled import largest_fitting, micro_batch_candidates, resolve_compile
from lbs_tune.config import OptimizerConfig, TrialConfig
from lbs_tune.experiment import run_checkpoints
from lbs_tune.optim import build_optimizer, load_optimizer_state
from lbs_tune.training import train

# The reports' figures that must agree across modes (timing aside).
FIGURES = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss", "test/accuracy")


def run(config: dict, resume: dict | None = None) -> KeepingReporter:
    reporter = KeepingReporter()
    train(TrialConfig.model_validate(config), reporter, resume)
    return reporter


def assert_close(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in FIGURES:
        assert a[key] == pytest.approx(b[key], abs=1e-4), key


# ---------------------------------------------------------------------------- compile: default


def test_default_compile_matches_eager_and_checkpoints_resume_in_either_mode(
    cli, tmp_path, data_dir
):
    # 45 steps an epoch at batch 32: reports and checkpoints at steps 50 and 100.
    every = 50 / 45
    base = tiny_base(steps=100, eval_every=every, checkpoint_every=every)
    spec = write_spec(tmp_path / "tiny.yaml", base)
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    assert cli("train", spec, "--out", eager_out)[0] == 0
    code, _, stderr = cli("train", spec, "--out", compiled_out, "--set", "compile=default")
    assert code == 0 and "warning" not in stderr
    eager, compiled = (
        read_jsonl(eager_out / "metrics.jsonl"),
        read_jsonl(compiled_out / "metrics.jsonl"),
    )
    assert [r["step"] for r in compiled] == [50, 100]
    for a, b in zip(compiled, eager, strict=True):
        assert_close(a, b)

    checkpoints = {
        name: {step: load_checkpoint(path) for step, path in run_checkpoints(out)}
        for name, out in (("eager", eager_out), ("compiled", compiled_out))
    }
    # The compiled module's checkpoint has the model's own keys (no `_orig_mod.` prefix).
    assert list(checkpoints["compiled"][50]["model"]) == list(checkpoints["eager"][50]["model"])
    # Either mode resumes from the other's checkpoint and ends where the eager run ended.
    eager_after_compiled = run(base, checkpoints["compiled"][50])
    compiled_after_eager = run({**base, "compile": "default"}, checkpoints["eager"][50])
    for resumed in (eager_after_compiled, compiled_after_eager):
        (row,) = resumed.rows
        assert_close(row, eager[-1])


# ---------------------------------------------------------------------------- compile: graphs


def test_graphs_on_the_cpu_runs_eagerly_with_one_warning_line(capsys, data_dir):
    base = tiny_base(steps=20, eval_every=0.25)
    capsys.readouterr()
    graphs = run({**base, "compile": "graphs"})
    err = capsys.readouterr().err
    assert err == (
        "lbs-tune: warning: compile: graphs runs this trial eagerly: CUDA graphs need a CUDA "
        "device and this trial runs on the CPU\n"
    )
    eager = run(base)
    assert capsys.readouterr().err == ""
    timing = ("images_per_s", "time_s")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in graphs.rows]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in eager.rows]


CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


@pytest.mark.parametrize(
    ("changes", "precision", "why"),
    [
        ({}, "fp16", "fp16's GradScaler reads its overflow check on the host every step"),
        ({"optimizer": {"name": "lamb"}}, "bf16", "LAMB's bias correction uses a step count"),
        (
            {"model": "lstm", "dataset": "wikitext2"},
            "bf16",
            "the language model carries its hidden state from step to step on the host",
        ),
    ],
)
def test_what_cannot_be_captured_runs_eagerly_and_says_why(changes, precision, why):
    config = TrialConfig.model_validate({**tiny_base(compile="graphs"), **changes})
    mode, line = resolve_compile(config, CUDA, precision)
    assert mode == "off"
    assert line.startswith("compile: graphs runs this trial eagerly: " + why)
    assert "\n" not in line


def test_what_can_be_captured_is_captured_and_auto_is_off_until_measured():
    # Accumulation, ghost batch norm, clipping, LARS and AdamW all run inside the graph.
    capturable = tiny_base(
        compile="graphs",
        model="resnet20",
        dataset="synthetic",
        batch_size=32,
        max_device_batch=16,
        ghost_batch_size=8,
        clip_grad_norm=1.0,
    )
    for optimizer in ("sgd", "adamw", "lars"):
        config = TrialConfig.model_validate({**capturable, "optimizer": {"name": optimizer}})
        assert resolve_compile(config, CUDA, "bf16") == ("graphs", None)
    for asked, device, mode in (("auto", CUDA, "off"), ("default", CUDA, "default")):
        config = TrialConfig.model_validate(tiny_base(compile=asked))
        assert resolve_compile(config, device, "bf16") == (mode, None)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_capturable_optimizers_step_as_the_eager_ones_and_load_either_state(name):
    """The captured step's optimizers (SGD's fused kernel, LARS), with the learning rate a
    tensor, make the eager update; each loads the other's state and keeps its own kernels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    config = OptimizerConfig(name=name, weight_decay=5e-4)
    eager, captured = build_optimizer(model, config), build_optimizer(twin, config, True)
    lr = torch.tensor(0.0)
    for group in captured.param_groups:
        group["lr"] = lr
    x = torch.randn(8, 5)
    for rate in (0.1, 0.05, 0.2):
        lr.fill_(rate)
        for group in eager.param_groups:
            group["lr"] = rate
        for net, optimizer in ((model, eager), (twin, captured)):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    eager_state, captured_state = eager.state_dict(), captured.state_dict()
    load_optimizer_state(eager, copy.deepcopy(captured_state))
    load_optimizer_state(captured, copy.deepcopy(eager_state))
    if name == "sgd":
        assert [(g["foreach"], g["fused"]) for g in eager.param_groups] == [(True, False)] * 2
        assert [(g["foreach"], g["fused"]) for g in captured.param_groups] == [(False, True)] * 2
    buffers = [s["momentum_buffer"] for s in eager.state.values()]
    for mine, theirs in zip(buffers, captured_state["state"].values(), strict=True):
        assert torch.equal(mine, theirs["momentum_buffer"])


# ---------------------------------------------------------------------------- micro-batch


def test_micro_batch_candidates_are_the_divisors_that_ghost_batches_divide():
    assert micro_batch_candidates(12) == [1, 2, 3, 4, 6, 12]
    assert micro_batch_candidates(96, multiple_of=8) == [8, 16, 24, 32, 48, 96]
    assert micro_batch_candidates(7) == [1, 7]


@pytest.mark.parametrize("batch", [8192, 768, 1000, 7, 96])
def test_largest_fitting_micro_batch_by_doubling_then_bisecting(batch):
    candidates = micro_batch_candidates(batch)
    for limit in range(0, batch + 2, max(1, batch // 97)):
        tried = []

        def fits(n, limit=limit, tried=tried):
            tried.append(n)
            return n <= limit

        found = largest_fitting(candidates, fits)
        expected = max((n for n in candidates if n <= limit), default=None)
        assert found == expected, (batch, limit, tried)
        assert tried[0] == batch  # the whole batch first: one try when it fits
        assert len(tried) == len(set(tried))  # no size tried twice
        assert len(tried) <= 2 * math.ceil(math.log2(batch + 1)) + 2


def test_largest_fitting_tries_only_the_whole_batch_when_it_fits():
    tried = []
    assert largest_fitting([1, 2, 4, 8], lambda n: tried.append(n) or True) == 8
    assert tried == [8]


def test_auto_micro_batch_on_the_cpu_is_the_whole_batch_and_is_reported(data_dir):
    base = tiny_base(batch_size=64, steps=10, eval_every=0.25, checkpoint_every=0.25)
    auto = run({**base, "max_device_batch": "auto"})
    plain = run(base)
    assert [r["micro_batch"] for r in auto.rows] == [64] * len(auto.rows)
    assert [r["micro_batch"] for r in plain.rows] == [64] * len(plain.rows)
    assert [r["train/loss"] for r in auto.rows] == [r["train/loss"] for r in plain.rows]
    assert all(state["micro_batch"] == 64 for state in auto.states.values())
    accumulated = run({**base, "max_device_batch": 16})
    assert [r["micro_batch"] for r in accumulated.rows] == [16] * len(accumulated.rows)


# ---------------------------------------------------------------------------- a sweep


@pytest.mark.ray
def test_a_sweep_runs_compiled(ray_cluster, tmp_path: Path, data_dir):
    from lbs_tune.runner import run as run_sweep

    overrides = [
        *QUICKSTART_TINY,
        "name=compiled",
        "grid.batch_size=[64]",
        "grid.lr.scaling=[none]",
        "grid.seed=[0]",
        "max_concurrent=1",
        "base.compile=default",
    ]
    assert run_sweep(QUICKSTART, overrides, storage=str(tmp_path), address=ray_cluster.address) == 0
    (result,) = (tmp_path / "compiled").glob("*/result.json")
    rows = read_jsonl(result)
    assert rows[-1]["step"] == rows[-1]["total_steps"] == 90  # 5760 examples / 64
    assert rows[-1]["config"]["compile"] == "default" and rows[-1]["diverged"] is False
    assert rows[-1]["val/accuracy"] > 0.2  # chance is 0.1
