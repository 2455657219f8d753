"""The checks of a trial config that need the dataset and model zoos, run once per grid point.

`lbs_tune.config` validates types, ranges and consistency without importing torch; these checks
ask the zoos (is the model known, does it take the dataset's inputs, does the batch fit the
training split) before anything starts: in `lbs-tune run`, `run --dry-run` and `train`.
"""

from __future__ import annotations

from lbs_tune.config import KeyedError, TrialConfig
from lbs_tune.data import DATASETS, batch_too_large
from lbs_tune.errors import did_you_mean
from lbs_tune.models import check_model_fits, models_that_fit, validate_model_name


def check_trial(config: TrialConfig) -> None:
    """None if the zoos can run `config`, else KeyedError(key, one-line message with the fix)."""
    if config.dataset not in DATASETS:
        raise KeyedError(
            "dataset", f"unknown dataset '{config.dataset}'{did_you_mean(config.dataset, DATASETS)}"
        )
    try:
        validate_model_name(config.model)
    except ValueError as exc:
        raise KeyedError("model", str(exc)) from None
    info = DATASETS[config.dataset]
    train_size = info.train_size(config.data)
    problem = batch_too_large(config, train_size)
    if problem:
        raise KeyedError("batch_size", problem)
    if config.sharpness is not None and config.sharpness.batch > train_size:
        raise KeyedError(
            "sharpness.batch",
            f"sharpness.batch {config.sharpness.batch} is larger than the {train_size} training "
            f"examples of {config.dataset}; use at most {train_size}",
        )
    shape, classes = info.input_shape(config.data), info.num_classes(config.data)
    try:
        check_model_fits(config.model, classes, shape)
    except ValueError as exc:
        fitting = ", ".join(models_that_fit(classes, shape)) or "none of the zoo"
        raise KeyedError(
            "model",
            f"{config.model} cannot take {config.dataset} inputs of shape {shape} ({exc}); "
            f"models that can: {fitting}",
        ) from None
