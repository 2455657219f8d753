"""The checks of a trial config that need the dataset and model zoos, run once per grid point.

`lbs_tune.config` validates types, ranges and consistency without importing torch; these checks
ask the zoos (is the model known, does it serve the dataset's task and take its inputs, does the
batch fit the training split) before anything starts: in `lbs-tune run`, `run --dry-run` and
`train`.
"""

from __future__ import annotations

from lbs_tune.config import KeyedError, TrialConfig, TrialTarget
from lbs_tune.datasets import DATASETS, batch_too_large, dataset_info
from lbs_tune.errors import did_you_mean
from lbs_tune.models import (
    TASK_MODELS,
    check_model_fits,
    model_options,
    model_task,
    models_that_fit,
    validate_model_name,
)
from lbs_tune.rules import moved_optimizer
from lbs_tune.segmentation import IGNORE_INDEX
from lbs_tune.sweep import Target


def check_trial(config: TrialConfig) -> None:
    """None if the zoos can run `config`, else KeyedError(key, one-line message with the fix)."""
    if config.dataset not in DATASETS:
        raise KeyedError(
            "dataset", f"unknown dataset '{config.dataset}'{did_you_mean(config.dataset, DATASETS)}"
        )
    info = dataset_info(config)
    if info.check is not None:
        info.check(config)
    for name in ("noise_scale", "sharpness"):
        block = getattr(config, name)
        if block is not None and block.every < config.eval_every:
            # A report carries one value per key: a second measurement before it would replace
            # the first, unseen. (Checked for new sweeps: a stored trial config still loads.)
            raise KeyedError(
                f"{name}.every",
                f"{name}.every {block.every:g} is less than eval_every {config.eval_every:g}: "
                f"each report carries one measurement, the others would be lost; set "
                f"{name}.every to at least {config.eval_every:g}, or eval_every to at most "
                f"{block.every:g}",
            )
    if info.task == "segmentation" and config.noise_scale is not None:
        # Its loss is the mean over the batch's scored pixels (ignored ones left out), which no
        # example's own gradient is a term of: units of the estimators are not defined yet.
        raise KeyedError(
            "noise_scale",
            "a segmentation loss is the mean over the batch's scored pixels, not over its "
            "examples, so the noise scale's per-example estimators do not apply: remove "
            "noise_scale (sharpness is measured)",
        )
    if config.data.nqm is not None and config.dataset != "nqm":
        raise KeyedError("data.nqm", "only dataset nqm reads data.nqm; remove it or use nqm")
    try:
        validate_model_name(config.model)
    except ValueError as exc:
        raise KeyedError("model", str(exc)) from None
    known = model_options(config.model)
    unknown = sorted(set(config.model_options) - set(known))
    if unknown:
        raise KeyedError(
            "model_options",
            f"model {config.model} has no option {', '.join(unknown)}; its options: "
            f"{', '.join(f'{k} (default {v})' for k, v in known.items()) or 'none'}",
        )
    # The SDE rule moves Adam's betas with the batch size: refused where one leaves (0, 1).
    for batch in [config.batch_size, *(b for _, b in (config.batch_schedule or ())[1:])]:
        moved_optimizer(config.optimizer, config.lr, batch)
    max_batch = info.max_batch(config.data)
    problem = batch_too_large(config, max_batch, task=info.task)
    if problem:
        raise KeyedError("batch_size", problem)
    if config.sharpness is not None and config.sharpness.batch > max_batch:
        unit = "rows of data.bptt + 1 tokens" if info.task == "language_model" else "examples"
        raise KeyedError(
            "sharpness.batch",
            f"sharpness.batch {config.sharpness.batch} is larger than the {max_batch} training "
            f"{unit} of {config.dataset}; use at most {max_batch}",
        )
    shape, classes = info.input_shape(config.data), info.num_classes(config.data)
    if info.task == "segmentation" and classes >= IGNORE_INDEX:
        raise KeyedError(
            "data.classes",
            f"{classes} classes for segmentation: masks are uint8 with {IGNORE_INDEX} for "
            f"ignored pixels; use at most {IGNORE_INDEX - 1}",
        )
    served = model_task(config.model)
    if config.batch_schedule is not None and served == "language_model":
        raise KeyedError(
            "batch_schedule",
            f"{config.model} reads the corpus as batch_size parallel rows, which a batch schedule "
            "would re-cut at every switch; use a constant batch_size for a language model",
        )
    for _, batch in (config.batch_schedule or ())[1:]:
        problem = batch_too_large(
            config.model_copy(update={"batch_size": batch}), max_batch, task=info.task
        )
        if problem:
            raise KeyedError("batch_schedule", problem)
    problem = None
    if served != info.task:
        needed = TASK_MODELS[info.task]
        problem = f"{config.model} is {TASK_MODELS[served]}; {config.dataset} needs {needed}"
    else:
        try:
            check_model_fits(config.model, classes, shape, info.task)
        except ValueError as exc:
            problem = f"{config.model} cannot take {config.dataset} inputs of shape {shape} ({exc})"
    if problem:
        fitting = ", ".join(models_that_fit(classes, shape, info.task)) or "none of the zoo"
        raise KeyedError("model", f"{problem}; models that can: {fitting}")
    if config.model_options:
        try:
            check_model_fits(config.model, classes, shape, info.task, **config.model_options)
        except ValueError as exc:
            raise KeyedError("model_options", f"{config.model}: {exc}") from None


def check_sweep_target(target: Target | None, trials: list[TrialConfig]) -> tuple[str, str] | None:
    """(key, message) if a sweep's `target` cannot be reached on the dataset of one of its
    trials (its own check, as a trial target of the same metric and value), else None; the key
    is the sweep file's (`target.value`, `target.metric`)."""
    if target is None:
        return None
    as_trial = TrialTarget(metric=target.metric, value=target.value)
    for config in trials:
        info = dataset_info(config)
        if info.check is None:
            continue
        try:
            info.check(config.model_copy(update={"target": as_trial}))
        except KeyedError as exc:
            if exc.key.startswith("target."):
                return exc.key, str(exc)
    return None
