"""The training loop: one trial from a `TrialConfig`, reporting to a `Reporter`; no Ray here.

The loop keeps every split on the device, runs each step without host-device synchronisation
(losses and accuracies accumulate on the device) and synchronises only at evaluation time,
every `eval_every` epochs, where it reports the metrics of `lbs_tune.names.METRICS` and, every
`checkpoint_every` epochs, a checkpoint that lets a resumed run continue exactly. What differs
between classification, segmentation and language modelling (batches, loss, scores,
evaluation) is asked of a `lbs_tune.tasks.Task`; how the step runs (eagerly, compiled, or
captured in a CUDA graph) and the micro-batch that fits the GPU come from `lbs_tune.compiled`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Protocol

import torch

from lbs_tune.branching import batch_at, examples_after
from lbs_tune.build import build_trial, task_for
from lbs_tune.checkpoints import read_state, rng_states, set_rng_states
from lbs_tune.compiled import WARMUP_STEPS, CapturedStep, fitting_micro_batch, resolve_compile
from lbs_tune.config import TrialConfig, epoch_steps, every_steps
from lbs_tune.data import TokenStreams
from lbs_tune.measure import NoiseScale, noise_moments
from lbs_tune.measuring import trainable_params
from lbs_tune.names import direction, meets
from lbs_tune.optim import build_optimizer, load_optimizer_state, set_hyperparameters
from lbs_tune.rules import lr_at, moved_optimizer, peak_lr
from lbs_tune.sharpness import adam_preconditioner, top_hessian_eigenvalue
from lbs_tune.storage import locate
from lbs_tune.tasks import Task, autocast, budget_steps

# A non-finite loss is looked for every this many steps (one host sync), so a diverged trial
# stops within that many steps of it, not at its next evaluation thousands of steps later.
DIVERGENCE_CHECK_STEPS = 25


class Reporter(Protocol):
    """Where the loop's results go: JSON lines for `lbs-tune train`, `tune.report` under Ray."""

    def step(self, step: int, total: int) -> None:
        """Called after every optimizer step; must be cheap (progress bars)."""

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        """Called at every evaluation with the metrics and, every checkpoint_every, the state."""


class ListReporter:
    """A Reporter that keeps the metrics of every report in `rows` and drops the checkpoints:
    for a trial run from Python (benchmarks, tests, a notebook)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def step(self, step: int, total: int) -> None:
        """Nothing per step."""

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        self.rows.append(metrics)


def finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf become None (JSON null): a diverged run's loss is 'no value', not NaN."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()
    }


def train(
    config: TrialConfig, reporter: Reporter, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one trial to the end of its budget (or its divergence); return the last metrics.

    `resume` is a checkpoint state written by an earlier run of the same config; the run then
    continues exactly where that one stopped (bit for bit on the CPU). A finished state (its
    budget done, or diverged) returns at once, with no report. Without `resume`, a config with
    `start_from` takes that checkpoint's model and optimizer state and starts at step 0.
    With a `batch_schedule` each step trains on the schedule's batch at the examples seen
    before it, the LR (and under sde the optimizer) moved to that batch by the LR rule, and
    evaluations, checkpoints and measurements (noise-scale windows, the sharpness) fall every
    `eval_every`, `checkpoint_every` and their own `every` epochs of examples.
    """
    if resume is not None and resume["finished"]:
        return {}
    # ---------------------------------------------------------------- Setup
    device, precision, data, model, task = build_trial(config)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if config.max_device_batch == "auto":
        micro = _auto_micro_batch(config, model, task, device, precision, resume)
        config = config.model_copy(update={"max_device_batch": micro})
        task = task_for(config, data, precision)  # split by it
    # The config at the batch trained now (a batch schedule switches it): its micro-batch and
    # batch-norm batch are the config's own rules, not retyped here.
    now = config
    batch_size, micro = now.batch_size, now.micro_batch_size
    mode, why = resolve_compile(config, device, precision)
    if why:
        print(f"lbs-tune: warning: {why}", file=sys.stderr, flush=True)
    # The optimizer as this batch size trains with it (the SDE rule moves Adam's betas and eps).
    moved = moved_optimizer(config.optimizer, config.lr, config.batch_size)
    optimizer = build_optimizer(model, moved, capturable=mode == "graphs")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    per_epoch = epoch_steps(task.epoch_examples, task.examples_per_step)
    budget = budget_steps(config, task)
    # Examples one row of a batch counts: tokens for a language model (a row is bptt tokens).
    per_row = task.examples_per_step // batch_size
    schedule = config.batch_schedule
    # With a schedule the intervals are in examples: a switch changes a step's, not an epoch's.
    eval_examples = config.eval_every * task.epoch_examples
    checkpoint_examples = eval_examples * max(1, round(config.checkpoint_every / config.eval_every))
    eval_interval = every_steps(config.eval_every, per_epoch)
    # Checkpoints fall on evaluations, so every checkpoint has a report of the same step.
    checkpoint_interval = eval_interval * max(
        1, round(config.checkpoint_every * per_epoch / eval_interval)
    )

    def loss_fn(outputs: Any, y: torch.Tensor) -> torch.Tensor:
        """The loss being optimised (with label smoothing, if any) of the model's outputs."""
        return task.loss(task.logits(outputs), y, config.label_smoothing)

    # Measurements (off by default) leave the trajectory exactly as it would have been.
    noise = None
    if config.noise_scale:
        window, interval = config.noise_scale.window, _interval(config.noise_scale, per_epoch)
        noise = NoiseScale(interval, window, budget, config.seed, device, schedule is not None)
        noise_examples = config.noise_scale.every * task.epoch_examples
    sharp_interval = _interval(config.sharpness, per_epoch)
    sharp_examples = config.sharpness.every * task.epoch_examples if config.sharpness else 0
    if config.sharpness:
        probe = task.probe(config.sharpness.batch)
    measured: dict[str, float] = {}

    step, elapsed, reached = 0, 0.0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        load_optimizer_state(optimizer, resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        task.load_state_dict(resume)
        set_rng_states(resume["rng"])
        step, elapsed = resume["step"], resume["elapsed"]
        reached = resume.get("target_step")
        if noise and resume.get("noise_scale"):
            noise.load_state_dict(resume["noise_scale"])
    elif config.start_from is not None:
        start = read_state(locate(config.start_from))
        model.load_state_dict(start["model"])
        load_optimizer_state(optimizer, start["optimizer"])
        set_hyperparameters(optimizer, moved)  # the start's own batch may have moved them

    def state(finished: bool) -> dict[str, Any]:
        return {
            "step": step,
            "finished": finished,
            "elapsed": elapsed,
            "micro_batch": micro,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            **task.state_dict(),
            "rng": rng_states(),
            "noise_scale": noise.state_dict() if noise else None,
            "target_step": reached,
        }

    # ---------------------------------------------------------------- Training
    model.train()
    smoothing = config.label_smoothing > 0
    loss_sum = torch.zeros((), device=device)  # the plain cross-entropy, as for val and test
    smoothed_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    scored = torch.zeros((), device=device, dtype=torch.int64)  # examples, pixels or tokens
    non_finite = torch.zeros((), device=device, dtype=torch.bool)
    # The model and the loss through torch.compile ("default"); the model itself stays eager
    # for checkpoints (its own keys), evaluation and the measurements.
    compiled = mode == "default"
    net = torch.compile(model) if compiled else model
    loss_of = torch.compile(task.loss) if compiled else task.loss

    def train_step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One optimizer step on a batch, with no host sync: forward and backward (over its
        micro-batches), the running loss and accuracy, the update; the gradients end as None."""
        # Micro-batches of one step share one augmentation draw: accumulation changes nothing.
        chunks = (
            [(inputs, targets)]
            if micro == batch_size
            else zip(inputs.split(micro), targets.split(micro), strict=True)
        )
        for chunk, (x, y) in enumerate(chunks):
            with autocast(device, precision, cache=mode != "graphs"):
                logits = task.forward(net, x, chunk)
                loss = loss_of(logits, y, config.label_smoothing)
            scaler.scale(loss if micro == batch_size else loss * (len(y) / batch_size)).backward()
            plain = loss_of(logits.detach(), y) if smoothing else loss.detach()
            loss_sum.add_(plain, alpha=len(y))
            smoothed_sum.add_(loss.detach(), alpha=len(y))
            right, count = task.scores(logits, y)
            correct.add_(right)
            scored.add_(count)
        non_finite.logical_or_(~torch.isfinite(loss_sum))
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the gradient itself, not fp16's scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def eager_step(inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_step(inputs, targets)

    run_step = eager_step
    if mode == "graphs":
        lr_tensor = torch.zeros((), device=device)  # what the captured update reads
        for group in optimizer.param_groups:
            group["lr"] = lr_tensor
        run_step = CapturedStep(train_step, lr_tensor, WARMUP_STEPS)

    def due(interval: int, interval_examples: float, before: int) -> bool:
        """Whether the step just made ends an interval of steps, or with a schedule one of
        examples (a multiple of `interval_examples` lies in (before, examples])."""
        if schedule is None:
            return step % interval == 0
        return examples // interval_examples > before // interval_examples

    seen, metrics = 0, {}
    # Examples seen before the next step (a resumed run's too).
    examples = (
        step * task.examples_per_step
        if schedule is None
        else examples_after(schedule, step, per_row)
    )
    started = time.perf_counter()
    while step < budget:
        if schedule is not None and batch_at(schedule, examples) != batch_size:
            # A switch (or a resumed run after one): the batch, its micro-batch and optimizer.
            now = config.model_copy(update={"batch_size": batch_at(schedule, examples)})
            batch_size, micro = now.batch_size, now.micro_batch_size
            moved = moved_optimizer(config.optimizer, config.lr, batch_size)
            set_hyperparameters(optimizer, moved)
        lr = lr_at(step, config.lr, batch_size, budget, per_epoch)
        inputs, targets = task.batch(step, examples // per_row, batch_size)
        if noise and noise.due(step):
            paused = time.perf_counter()
            size, hessian = config.noise_scale.batch, config.noise_scale.hessian_examples
            draws = [
                _measurement_batch(data, task, size, noise.generator, config.data.bptt)
                for _ in range(2 if hessian else 1)
            ]
            # In fp32, as the sharpness: its Hessian-vector products need it.
            moments = noise_moments(
                model,
                *draws[0],
                loss_fn,
                config.noise_scale.micro_batch,
                noise.seed(),
                draws[1] if hessian else None,
                hessian,
                generators=task.generators,
            )
            estimate = noise.add(step, moments)
            measured.update(estimate.metrics() if estimate else {})
            started += time.perf_counter() - paused  # images/s stays a training figure
        run_step(inputs, targets, lr)
        step += 1
        seen += batch_size
        before, examples = examples, examples + batch_size * per_row
        reporter.step(step, budget)
        if noise and schedule is not None and due(interval, noise_examples, before):
            # The next step starts past a multiple of the interval's examples: a window opens
            # there (one still open ends: with larger batches, an interval has fewer steps).
            cut = noise.open()
            measured.update(cut.metrics() if cut else {})
        if sharp_interval and due(sharp_interval, sharp_examples, before):
            paused = time.perf_counter()
            # The Hessian's top eigenvalue, and for AdamW also that of P^-1 H (its preconditioned
            # sharpness). In fp32: Hessian-vector products in bf16 are too noisy for either.
            kinds = [("sharpness/top_eig", None)]
            if config.optimizer.name == "adamw":
                # None before the first step (no second moment yet)
                preconditioner = adam_preconditioner(optimizer, trainable_params(model))
                if preconditioner is not None:
                    kinds.append(("sharpness/precond_top_eig", preconditioner))
            for key, preconditioner in kinds:
                measured[key] = top_hessian_eigenvalue(
                    model,
                    task.inputs(probe[0]),
                    probe[1],
                    loss_fn,
                    config.sharpness.iterations,
                    seed=config.seed,
                    max_batch=micro,
                    generators=task.generators,
                    preconditioner=preconditioner,
                )
            started += time.perf_counter() - paused
        blown = step % DIVERGENCE_CHECK_STEPS == 0 and bool(non_finite)
        if not due(eval_interval, eval_examples, before) and step != budget and not blown:
            continue

        # ------------------------------------------------------------ Evaluation
        train_loss = loss_sum.item() / seen
        right, count = correct.item(), scored.item()  # count 0: a task without classes (NQM)
        train_time = time.perf_counter() - started
        diverged = not math.isfinite(train_loss) or (
            config.divergence_loss is not None and train_loss > config.divergence_loss
        )
        metrics = {
            "step": step,
            "epoch": round(examples / task.epoch_examples, 6),
            "examples": examples,
            "total_steps": budget,
            "lr": lr,
            "peak_lr": peak_lr(config.lr, batch_size),
            "bn_batch": now.bn_batch,
            "micro_batch": micro,
            "train/loss": train_loss,
            "train/accuracy": right / count if count else None,
        }
        if moved is not config.optimizer:  # the SDE rule's moved Adam hyper-parameters
            metrics.update(
                {"optimizer/beta1": moved.betas[0], "optimizer/beta2": moved.betas[1]}
                | {"optimizer/eps": moved.eps}
            )
        if schedule is not None:
            metrics["batch"] = batch_size  # the batch of the step just made
        if smoothing:
            metrics["train/smoothed_loss"] = smoothed_sum.item() / seen
        for split in ("val", "test"):
            scores = task.evaluate(model, split, config.eval_batch_size)
            metrics.update({f"{split}/{name}": value for name, value in (scores or {}).items()})
        reached = reached or _reached(config, metrics, step)
        if config.target:
            metrics["target/step"] = reached
        metrics.update(measured)
        measured.clear()
        elapsed += time.perf_counter() - started
        # Examples per second: tokens for a language model (a row of a batch is bptt tokens).
        metrics.update(
            images_per_s=seen * per_row / train_time, diverged=diverged, time_s=round(elapsed, 3)
        )
        metrics = finite_or_none(metrics)
        stop = reached is not None and config.target.stop
        finished = diverged or stop or step == budget
        checkpoint = finished or due(checkpoint_interval, checkpoint_examples, before)
        reporter.report(metrics, state(finished) if checkpoint else None)
        loss_sum.zero_()
        smoothed_sum.zero_()
        correct.zero_()
        scored.zero_()
        seen = 0
        started = time.perf_counter()
        if diverged or stop:
            break
    return metrics


def _auto_micro_batch(
    config: TrialConfig,
    model: torch.nn.Module,
    task: Task,
    device: torch.device,
    precision: str,
    resume: dict[str, Any] | None,
) -> int:
    """The micro-batch of `max_device_batch: auto`: the whole batch on the CPU; on a GPU the
    largest that fits, probed once per trial (a resumed trial keeps the one it started with,
    so its batch-norm batch and accumulation stay the same)."""
    if resume is not None and resume.get("micro_batch"):
        return resume["micro_batch"]
    if device.type != "cuda":
        return config.batch_size
    return fitting_micro_batch(model, task, config, precision)


def _measurement_batch(
    data: Any, task: Task, n: int, generator: torch.Generator, bptt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` training examples drawn with replacement by a measurement's own `generator`, which
    also draws their augmentation (as a step's), as (model inputs, targets); for a language
    model `n` windows of `bptt` tokens at random offsets."""
    device = generator.device
    if isinstance(data, TokenStreams):
        starts = torch.randint(len(data.train) - bptt, (n, 1), generator=generator, device=device)
        window = data.train[starts + torch.arange(bptt + 1, device=device)]
        x, y = window[:, :-1], window[:, 1:]
    else:
        index = torch.randint(len(data.train), (n,), generator=generator, device=device)
        x, y = data.train_batch(index, generator)
    return task.inputs(x), y


def _interval(block, per_epoch: float) -> int:
    """Steps between measurements of a block with `every` epochs; 0 for no block."""
    return every_steps(block.every, per_epoch) if block else 0


def _reached(config: TrialConfig, metrics: dict[str, Any], step: int) -> int | None:
    """`step` if this evaluation reaches the trial's target, else None."""
    if config.target is None or metrics.get(config.target.metric) is None:
        return None
    target = config.target
    return step if meets(metrics[target.metric], target.value, direction(target.metric)) else None
