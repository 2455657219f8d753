"""Training throughput of lbs-tune's loop beside a bare PyTorch loop, per model x batch size.

The protocol of ANCHORS.md: synthetic CIFAR-10-shaped uint8 data kept on the device, random crop
(pad 4) and flip as batched tensor ops, SGD with Nesterov momentum and weight decay, warm-up
steps, then timed steps that end with a device synchronisation. Each case prints one JSON line
on stdout with both figures and the loop's overhead; a last line says, per case, whether that
overhead is within the target.

    python benchmarks/throughput.py --device cpu --models resnet20 --batch-sizes 32,128 \
        --warmup 5 --steps 20
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

from lbs_tune.config import DataConfig, TrialConfig, epoch_steps
from lbs_tune.data import DATASETS, DeviceData, load_dataset, random_crop, random_flip
from lbs_tune.errors import UserError
from lbs_tune.models import build_model
from lbs_tune.optim import build_optimizer
from lbs_tune.training import ListReporter, resolve_device, resolve_precision, train

TARGET_OVERHEAD_PCT = 10.0
CIFAR_SHAPE = (3, 32, 32)
# MNIST-1D-shaped inputs for the models built for 1-D data.
FLAT_SHAPE = (40,)
FLAT_MODELS = ("mlp", "cnn1d")
# Constant and small, so that no short run on random labels diverges; the rate costs no time.
LR = 0.01

# ANCHORS.md, column "device-resident, bf16, channels_last": images/s on one H200, eager.
ANCHORS = {
    ("resnet20", 32): 3_480,
    ("resnet20", 128): 10_930,
    ("resnet20", 512): 41_890,
    ("resnet20", 2048): 113_590,
    ("resnet20", 8192): 123_695,
    ("wrn28_10", 128): 8_974,
    ("wrn28_10", 512): 10_187,
    ("wrn28_10", 2048): 10_693,
}
ANCHOR_SOURCE = "ANCHORS.md device-resident bf16 channels_last, NVIDIA H200, torch 2.11"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; the defaults suit a GPU run."""

    def ints(text: str) -> list[int]:
        return [int(part) for part in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,wrn28_10", help="comma-separated")
    parser.add_argument("--batch-sizes", type=ints, default=[128, 512, 2048])
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
        "--anchors", action="store_true", help="on CUDA, add the ANCHORS.md figure to each line"
    )
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return args


def trial_config(args: argparse.Namespace, model: str, batch_size: int) -> TrialConfig:
    """The lbs-tune config of one case: its first report comes after exactly the warm-up steps."""
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
    model = build_model(config.model, data.num_classes, data.input_shape).to(device)
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
    args: argparse.Namespace, config: TrialConfig, data: DeviceData, device: torch.device
) -> dict[str, Any]:
    """Both figures of one case, from `args.repeats` runs of each, alternating which goes first."""
    precision = resolve_precision(config, device)
    loop: list[float] = []
    bare: list[float] = []
    for repeat in range(args.repeats):
        # Alternating the order keeps frequency and thermal drift from favouring one side.
        for side in ("loop", "bare") if repeat % 2 == 0 else ("bare", "loop"):
            if side == "loop":
                loop.append(loop_images_per_s(config, args.warmup))
            else:
                bare.append(bare_images_per_s(config, data, precision, args.warmup, args.steps))
    loop_median, bare_median = statistics.median(loop), statistics.median(bare)
    line: dict[str, Any] = {
        "model": config.model,
        "batch_size": config.batch_size,
        "loop_images_per_s": round(loop_median, 1),
        "bare_images_per_s": round(bare_median, 1),
        "overhead_pct": round((bare_median / loop_median - 1) * 100, 2),
        "device": device.type,
    }
    if device.type == "cuda":
        line["gpu"] = torch.cuda.get_device_name(device)
    line |= {
        "precision": precision,
        "channels_last": data.channels_last,
        "shape": list(config.data.shape),
        "samples": args.samples,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "loop_runs": [round(v, 1) for v in loop],
        "bare_runs": [round(v, 1) for v in bare],
    }
    if args.anchors and device.type == "cuda":
        line["anchor_images_per_s"] = ANCHORS.get((config.model, config.batch_size))
        line["anchor_source"] = ANCHOR_SOURCE
    return line


def main(argv: list[str] | None = None) -> int:
    """Run every model x batch size case; print one JSON line each, then the summary line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # As the training loop does, so that both loops run the same autotuned kernels.
        torch.backends.cudnn.benchmark = True
    datasets: dict[tuple[int, ...], DeviceData] = {}
    verdicts = []
    for model in args.models:
        for batch_size in args.batch_sizes:
            config = trial_config(args, model, batch_size)
            channels_last = (
                config.channels_last if config.channels_last is not None else device.type == "cuda"
            )
            shape = config.data.shape
            if shape not in datasets:
                datasets[shape] = load_dataset(config, device, channels_last)
            line = run_case(args, config, datasets[shape], device)
            print(json.dumps(line), flush=True)
            verdicts.append(
                {
                    "model": model,
                    "batch_size": batch_size,
                    "overhead_pct": line["overhead_pct"],
                    "within_target": line["overhead_pct"] <= TARGET_OVERHEAD_PCT,
                }
            )
    summary = {
        "summary": f"loop overhead over the bare loop at most {TARGET_OVERHEAD_PCT:g}%",
        "device": device.type,
        "all_within_target": all(v["within_target"] for v in verdicts),
        "cases": verdicts,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"error: {error}")
