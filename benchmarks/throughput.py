"""Training throughput of lbs-tune's loop in each `compile` mode beside a bare PyTorch loop,
per model x batch size.

The protocol of ANCHORS.md: synthetic CIFAR-10-shaped uint8 data kept on the device, random crop
(pad 4) and flip as batched tensor ops, SGD with Nesterov momentum and weight decay, warm-up
steps, then timed steps that end with a device synchronisation. Each case prints one JSON line
on stdout: images/s of the loop in each compile mode (`images_per_s_<mode>`; null, with
`fallback_<mode>` saying why, where the mode would run eagerly), `loop_images_per_s` the first
mode's (what `lbs_tune.schedule.read_throughput` reads; `--field images_per_s_graphs` reads
another), the bare eager loop and the first mode's overhead over it, and the model FLOP
utilisation (`mfu_<mode>`) where the card's peak is known. A last line says, per case, whether
the overhead is within its target and, with --anchors on CUDA, whether ANCHORS.md's targets
are met (ResNet-20 at least the CUDA-graph column, WRN-28-10 at least 40% of the card's peak).

    python benchmarks/throughput.py --device cpu --models resnet20 --batch-sizes 32,128 \
        --threads 1 --repeats 3 --samples 10000 --compile off,default
    python benchmarks/throughput.py --anchors    # on a GPU: ANCHORS.md's cases, every mode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from lbs_tune.build import model_for, resolve_device, resolve_precision
from lbs_tune.compiled import resolve_compile
from lbs_tune.config import DataConfig, TrialConfig, epoch_steps
from lbs_tune.data import DeviceData, load_dataset, random_crop, random_flip
from lbs_tune.datasets import DATASETS
from lbs_tune.errors import UserError
from lbs_tune.optim import build_optimizer
from lbs_tune.training import ListReporter, train

TARGET_OVERHEAD_PCT = 10.0
CIFAR_SHAPE = (3, 32, 32)
# MNIST-1D-shaped inputs for the models built for 1-D data.
FLAT_SHAPE = (40,)
FLAT_MODELS = ("mlp", "cnn1d")
# Constant and small, so that no short run on random labels diverges; the rate costs no time.
LR = 0.01

COMPILE_MODES = ("off", "default", "graphs")

# ANCHORS.md, images/s on one H200: (device-resident, bf16, channels_last eager; the whole step
# in one CUDA graph), None where it has no figure.
ANCHORS = {
    ("resnet20", 32): (3_480, 18_638),
    ("resnet20", 128): (10_930, 51_063),
    ("resnet20", 512): (41_890, 104_048),
    ("resnet20", 2048): (113_590, 117_576),
    ("resnet20", 8192): (123_695, None),
    ("wrn28_10", 128): (8_974, 9_560),
    ("wrn28_10", 512): (10_187, 10_354),
    ("wrn28_10", 2048): (10_693, None),
}
ANCHOR_SOURCE = "ANCHORS.md, NVIDIA H200, torch 2.11"
# The cases that --anchors runs (issue 13): every batch with a CUDA-graph figure.
ANCHOR_CASES = {"resnet20": [32, 128, 512, 2048], "wrn28_10": [128, 512]}
# ANCHORS.md's targets: a loop at least as fast as the CUDA-graph column, and the MFU of
# WRN-28-10 (compute-bound) at least this share of the card's peak.
TARGET_ANCHOR_RATIO = 1.0
TARGET_WRN_MFU = 0.40
# Training FLOPs per 32x32 image (forward and backward), ANCHORS.md.
TRAIN_FLOPS = {"resnet20": 0.244e9, "wrn28_10": 31.5e9}
# Dense bf16 peaks (FLOP/s) by a part of the device's name, the most specific first.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; the defaults suit a GPU run."""

    def ints(text: str) -> list[int]:
        return [int(part) for part in text.split(",")]

    def modes(text: str) -> list[str]:
        chosen = text.split(",")
        unknown = [m for m in chosen if m not in COMPILE_MODES]
        if unknown or len(set(chosen)) < len(chosen):
            raise argparse.ArgumentTypeError(f"modes among {', '.join(COMPILE_MODES)}, once each")
        return chosen

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", help="comma-separated (default: resnet20,wrn28_10, or --anchors' cases)"
    )
    parser.add_argument("--batch-sizes", type=ints, help="default: 128,512,2048")
    parser.add_argument(
        "--compile",
        type=modes,
        default=list(COMPILE_MODES),
        help="the loop's compile modes, comma-separated; the first is loop_images_per_s's",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument(
        "--channels-last", choices=("auto", "on", "off"), default="auto", help="auto: on CUDA"
    )
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; medians count")
    parser.add_argument("--samples", type=int, default=50_000, help="training examples")
    parser.add_argument("--shape", type=ints, help="input shape, e.g. 3,32,32 (default: by model)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--anchors",
        action="store_true",
        help="ANCHORS.md's cases (unless --models or --batch-sizes), and on CUDA its figures, "
        "the ratios to its CUDA-graph column and its targets",
    )
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else None
    if args.anchors and not models and not args.batch_sizes:
        args.cases = [(m, b) for m, sizes in ANCHOR_CASES.items() for b in sizes]
    else:
        sizes = args.batch_sizes or [128, 512, 2048]
        args.cases = [(m, b) for m in models or ["resnet20", "wrn28_10"] for b in sizes]
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return args


def trial_config(
    args: argparse.Namespace, model: str, batch_size: int, mode: str = "off"
) -> TrialConfig:
    """The lbs-tune config of one case in compile mode `mode`: its first report comes after
    exactly the warm-up steps."""
    shape = args.shape or (FLAT_SHAPE if model in FLAT_MODELS else CIFAR_SHAPE)
    # No validation split: evaluation has nothing to do, and is outside the timing anyway.
    data = {
        "samples": args.samples,
        "shape": shape,
        "classes": 10,
        "val_fraction": 0.0,
        "crop_padding": 4,
        "flip": True,
    }
    config = {
        "dataset": "synthetic",
        "data": data,
        "model": model,
        "batch_size": batch_size,
        "steps": args.warmup + args.steps,
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "lr": {"base": LR, "base_batch_size": batch_size},
        "precision": args.precision,
        "channels_last": {"auto": None, "on": True, "off": False}[args.channels_last],
        "device": args.device,
        "compile": mode,
    }
    train_size = DATASETS["synthetic"].train_size(DataConfig(**data))
    # eval_every is in epochs; the loop rounds it back to `warmup` steps.
    eval_every = args.warmup / epoch_steps(train_size, batch_size)
    return TrialConfig.model_validate({**config, "eval_every": eval_every})


def loop_images_per_s(config: TrialConfig, warmup: int) -> float:
    """Images/s of `lbs_tune.training.train` over the steps after the first `warmup`."""
    capture = ListReporter()
    train(config, capture)
    first, *timed = capture.rows
    if first["step"] != warmup or timed[-1]["step"] != config.steps:
        raise RuntimeError(f"reports at steps {[r['step'] for r in capture.rows]}")
    if timed[-1]["diverged"]:
        raise RuntimeError(f"{config.model} at batch {config.batch_size} diverged")
    # Each report's images/s covers the steps since the one before; their seconds add up.
    seconds, previous = 0.0, warmup
    for report in timed:
        seconds += (report["step"] - previous) * config.batch_size / report["images_per_s"]
        previous = report["step"]
    return (config.steps - warmup) * config.batch_size / seconds


def bare_images_per_s(
    config: TrialConfig, data: DeviceData, precision: str, warmup: int, steps: int
) -> float:
    """Images/s of a plain PyTorch loop of the same model, batch, data, augmentation, optimizer."""
    device = data.train.x.device
    model = model_for(config, data).to(device)
    if data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optimizer)
    for group in optimizer.param_groups:
        group["lr"] = LR
    generator = torch.Generator(device=device).manual_seed(0)
    x_all, y_all = data.train.x, data.train.y

    def step() -> None:
        index = torch.randint(len(y_all), (config.batch_size,), device=device, generator=generator)
        x = x_all[index]
        if data.crop_padding:
            x = random_crop(x, data.crop_padding, generator)
        if data.flip:
            x = random_flip(x, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(data.normalise(x)), y_all[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * config.batch_size / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock reads the end of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    args: argparse.Namespace, case: TrialConfig, data: DeviceData, device: torch.device
) -> dict[str, Any]:
    """The figures of one case: `args.repeats` runs of the loop in each compile mode that runs
    as asked on `device` and of the bare loop, alternating which goes first; medians count."""
    precision = resolve_precision(case, device)
    configs, fallbacks = {}, {}
    for mode in args.compile:
        config = case.model_copy(update={"compile": mode})
        ran, why = resolve_compile(config, device, precision)
        if ran == mode:
            configs[mode] = config
        else:
            fallbacks[mode] = why
    if not configs:
        raise UserError(f"--compile {','.join(args.compile)}: no mode runs on {device.type}")
    runs: dict[str, list[float]] = {side: [] for side in [*configs, "bare"]}
    for repeat in range(args.repeats):
        # Alternating the order keeps frequency and thermal drift from favouring one side.
        for side in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
            if side == "bare":
                runs[side].append(bare_images_per_s(case, data, precision, args.warmup, args.steps))
            else:
                runs[side].append(loop_images_per_s(configs[side], args.warmup))
    medians = {side: statistics.median(values) for side, values in runs.items()}
    first = next(iter(configs))
    line: dict[str, Any] = {
        "model": case.model,
        "batch_size": case.batch_size,
        "compile": first,
        "loop_images_per_s": round(medians[first], 1),
        "bare_images_per_s": round(medians["bare"], 1),
        "overhead_pct": round((medians["bare"] / medians[first] - 1) * 100, 2),
        "device": device.type,
    }
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if gpu:
        line["gpu"] = gpu
    peak = peak_flops(gpu)
    anchor = ANCHORS.get((case.model, case.batch_size)) if device.type == "cuda" else None
    for mode in args.compile:
        speed = medians.get(mode)
        line[f"images_per_s_{mode}"] = None if speed is None else round(speed, 1)
        if speed is not None:
            line[f"runs_{mode}"] = [round(v, 1) for v in runs[mode]]
        if mode in fallbacks:
            line[f"fallback_{mode}"] = fallbacks[mode]
        if speed is not None and peak and case.model in TRAIN_FLOPS:
            line[f"mfu_{mode}"] = round(speed * TRAIN_FLOPS[case.model] / peak, 4)
        if speed is not None and args.anchors and anchor and anchor[1]:
            line[f"ratio_to_anchor_{mode}"] = round(speed / anchor[1], 3)
    line |= {
        "precision": precision,
        "channels_last": data.channels_last,
        "shape": list(case.data.shape),
        "samples": args.samples,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "loop_runs": [round(v, 1) for v in runs[first]],
        "bare_runs": [round(v, 1) for v in runs["bare"]],
    }
    if args.anchors and anchor:
        line["anchor_images_per_s"], line["anchor_graph_images_per_s"] = anchor
        line["anchor_source"] = ANCHOR_SOURCE
    return line


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak (FLOP/s) of a card by its name (`PEAK_BF16`), None if unknown."""
    for part, peak in PEAK_BF16:
        if device_name and part in device_name:
            return peak
    return None


def anchor_verdict(line: dict[str, Any]) -> dict[str, Any] | None:
    """Whether a case meets ANCHORS.md's target: ResNet-20 at least the CUDA-graph column in its
    fastest mode, WRN-28-10 at least TARGET_WRN_MFU of the card's peak; None without one."""
    ratios = [v for k, v in line.items() if k.startswith("ratio_to_anchor_")]
    mfus = [v for k, v in line.items() if k.startswith("mfu_")]
    if line["model"] == "resnet20" and ratios:
        return {"target": f"ratio >= {TARGET_ANCHOR_RATIO:g}", "best": max(ratios)}
    if line["model"] == "wrn28_10" and mfus and "anchor_source" in line:
        return {"target": f"mfu >= {TARGET_WRN_MFU:g}", "best": max(mfus)}
    return None


def main(argv: list[str] | None = None) -> int:
    """Run every case; print one JSON line each, then the summary line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # As the training loop does, so that both loops run the same autotuned kernels.
        torch.backends.cudnn.benchmark = True
    datasets: dict[tuple[int, ...], DeviceData] = {}
    verdicts = []
    for model, batch_size in args.cases:
        config = trial_config(args, model, batch_size)
        channels_last = (
            config.channels_last if config.channels_last is not None else device.type == "cuda"
        )
        shape = config.data.shape
        if shape not in datasets:
            datasets[shape] = load_dataset(config, device, channels_last)
        line = run_case(args, config, datasets[shape], device)
        print(json.dumps(line), flush=True)
        verdict = {
            "model": model,
            "batch_size": batch_size,
            "overhead_pct": line["overhead_pct"],
            "within_target": line["overhead_pct"] <= TARGET_OVERHEAD_PCT,
        }
        target = anchor_verdict(line)
        if target:
            floor = TARGET_ANCHOR_RATIO if model == "resnet20" else TARGET_WRN_MFU
            verdict |= {"anchor": target, "anchor_met": target["best"] >= floor}
        verdicts.append(verdict)
    summary = {
        "summary": f"loop overhead over the bare loop at most {TARGET_OVERHEAD_PCT:g}%",
        "device": device.type,
        "all_within_target": all(v["within_target"] for v in verdicts),
        "cases": verdicts,
    }
    anchored = [v["anchor_met"] for v in verdicts if "anchor_met" in v]
    if anchored:
        summary["all_anchor_targets_met"] = all(anchored)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"error: {error}")
