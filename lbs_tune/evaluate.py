"""`lbs-tune evaluate`: every checkpoint of every trial, on the chosen splits, into Parquet.

Each checkpoint is evaluated with its trial's own model, dataset and task (from params.json,
built as in training) and written to the experiment's evaluation table
(`lbs_tune.experiment.EVALUATION_FILE`): trial_id, step, split and the task's scores (loss,
accuracy, perplexity, miou, pixel_accuracy; null where the task has none, and a value that is NaN
or inf is null, as in the reports).
Checkpoints already in that table are skipped without being read (their step comes from the
trial's reports), so running it again only adds what is new.
"""

from __future__ import annotations

import json
import math
import sys

import pyarrow as pa

from lbs_tune.build import build_trial, resolve_device
from lbs_tune.checkpoints import read_state
from lbs_tune.config import trial_config
from lbs_tune.data import DeviceData, TokenStreams
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    EVALUATION_FILE,
    EVALUATION_SCHEMA,
    EVALUATION_SCORES,
    PARAMS_FILE,
    read_evaluation,
    reported_checkpoints,
    trial_checkpoints,
    trial_folders,
    write_parquet,
)
from lbs_tune.storage import locate

SPLITS = ("train", "val", "test")


def parse_splits(text: str) -> tuple[str, ...]:
    """'train,test' -> ('train', 'test'); unknown names are a UserError."""
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--splits {text}: choose among {', '.join(SPLITS)} (comma-separated)")
    return splits


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def evaluate_experiment(source: str, splits: tuple[str, ...] = SPLITS, device: str = "auto") -> str:
    """Evaluate every not yet evaluated checkpoint; return the URI of the evaluation table.

    Each trial's model and task come from `lbs_tune.build.build_trial` (its model options, ghost
    batch size and dataset, as in training), and each split is scored by the task's own
    evaluation: loss and accuracy, plus perplexity for a language model, mean IoU and pixel
    accuracy for segmentation."""
    experiment = locate(source)
    earlier = read_evaluation(experiment)
    done = EVALUATION_SCHEMA.empty_table() if earlier is None else earlier
    seen = set(zip(*(done[c].to_pylist() for c in ("trial_id", "step", "split")), strict=True))
    torch_device = resolve_device(device)
    datasets: dict[str, DeviceData | TokenStreams] = {}
    rows = []
    for trial in trial_folders(experiment):
        trial_id, step_of = reported_checkpoints(trial)
        params = trial.join(PARAMS_FILE)
        try:
            config = trial_config(json.loads(params.read_text()))
        except ValueError as exc:  # not JSON, or not a trial config of this version
            reason = str(exc).splitlines()[0]
            raise UserError(
                f"{params.uri}: damaged trial config ({reason}); restore it from the sweep's "
                "lbs_sweep.json or move the trial folder aside"
            ) from None
        trial_id = trial_id or trial.name
        for checkpoint in trial_checkpoints(trial):
            step = step_of.get(checkpoint.parent().name)
            if step is not None and all((trial_id, step, s) in seen for s in splits):
                continue
            try:
                state = read_state(checkpoint)
            except UserError as exc:
                print(f"lbs-tune: warning: {exc}; skipped it", file=sys.stderr)
                continue
            todo = [s for s in splits if (trial_id, state["step"], s) not in seen]
            if not todo:
                continue
            key = json.dumps([config.dataset, config.model, config.data.model_dump(mode="json")])
            built = build_trial(config, torch_device, datasets.get(key))
            datasets[key] = built.data
            built.model.load_state_dict(state["model"])
            for split in todo:
                scores = built.task.evaluate(built.model, split, config.eval_batch_size)
                if scores is None:  # the dataset has no such split
                    continue
                row = {"trial_id": trial_id, "step": state["step"], "split": split}
                rows.append(row | {k: _finite(scores.get(k)) for k in EVALUATION_SCORES})
    target = experiment.join(EVALUATION_FILE)
    print(f"evaluated {len(rows)} checkpoint splits ({len(done)} were done before) -> {target.uri}")
    if not rows and earlier is not None:
        return target.uri
    new = pa.Table.from_pylist(rows, EVALUATION_SCHEMA)
    table = pa.concat_tables([done, new]).sort_by(
        [("trial_id", "ascending"), ("step", "ascending")]
    )
    write_parquet(target, table)
    return target.uri
