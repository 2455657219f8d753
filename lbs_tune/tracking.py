"""MLflow and W&B through Ray Tune's own MLflowLoggerCallback and WandbLoggerCallback: each gets
only the trial's own metrics (lbs_tune.names.own_metrics), each step once; MLflow's step is the
optimizer step, W&B counts its own and logs `step` as a metric.

Imported only for a sweep whose `loggers` section names one of them (importing W&B takes
seconds). The classes live at module level: the Tuner pickles its callbacks (tuner.pkl).
"""

from __future__ import annotations

import os
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback

from lbs_tune.environ import environ
from lbs_tune.names import own_metrics
from lbs_tune.storage import Location
from lbs_tune.sweep import SweepSpec


class _OwnSteps:
    """Hands a Ray logger callback's `_log` only the trial's own metrics, each step once (the
    last step logged per trial in this run of the sweep; a resumed trial sends earlier reports
    again)."""

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        step = result.get("step")
        logged = self.__dict__.setdefault("_logged_step", {})
        if not isinstance(step, int) or isinstance(step, bool) or step <= logged.get(trial, -1):
            return
        logged[trial] = step
        self._log(trial, own_metrics(result), step)

    def _log(self, trial, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError


class MLflow(_OwnSteps, MLflowLoggerCallback):
    """Ray's MLflowLoggerCallback (one MLflow run per trial and run of the sweep, its config as
    params) with the optimizer step as MLflow's step."""

    def _log(self, trial, metrics: dict[str, float], step: int) -> None:
        run = self._trial_runs[trial]
        self.mlflow_util.log_metrics(run_id=run, metrics_to_log=metrics, step=step)


class Wandb(_OwnSteps, WandbLoggerCallback):
    """Ray's WandbLoggerCallback (one W&B run per trial, its config as the run's config)."""

    def setup(self, *args, **kwargs) -> None:
        # Ray asks for an API key unless $WANDB_MODE says offline or disabled: a `mode` of the
        # sweep file says so too.
        mode = self.kwargs.get("mode")
        if mode not in ("offline", "disabled") or os.environ.get("WANDB_MODE") == mode:
            super().setup(*args, **kwargs)
            return
        with environ({"WANDB_MODE": mode}):
            super().setup(*args, **kwargs)

    def _log(self, trial, metrics: dict[str, float], step: int) -> None:
        WandbLoggerCallback.log_trial_result(self, 0, trial, {**metrics, "step": step})


def mlflow_callback(spec: SweepSpec) -> MLflow:
    """The MLflow logger of a sweep's `loggers.mlflow` (experiment: the sweep's name unless
    given; every run tagged with the sweep's name)."""
    settings = spec.loggers.mlflow
    return MLflow(
        tracking_uri=settings.tracking_uri,
        experiment_name=settings.experiment_name or spec.name,
        tags={"lbs_tune.sweep": spec.name},
    )


def wandb_callback(spec: SweepSpec, experiment: Location) -> Wandb:
    """The W&B logger of a sweep's `loggers.wandb` (project: as given, else $WANDB_PROJECT, else
    the sweep's name; group: the sweep's name unless given). Offline runs of a sweep on a local
    or shared folder are written to `<experiment>/wandb/` (else in each trial's folder, which
    Ray may copy to the storage before W&B has finished writing)."""
    settings = spec.loggers.wandb
    options: dict[str, Any] = {"mode": settings.mode} if settings.mode else {}
    if settings.mode == "offline" and experiment.is_local:
        options["dir"] = experiment.path
    return Wandb(
        project=settings.project or os.environ.get("WANDB_PROJECT") or spec.name,
        group=settings.group or spec.name,
        **options,
    )
