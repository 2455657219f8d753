"""`lbs-tune evaluate`: every checkpoint of every trial, on the chosen splits, into Parquet.

Each checkpoint is evaluated with its trial's own model and dataset config (from params.json)
and written to the experiment's evaluation table (`lbs_tune.experiment.EVALUATION_FILE`):
trial_id, step, split, loss, accuracy (a loss that is NaN or inf is null, as in the reports).
Checkpoints already in that table are skipped without being read (their step comes from the
trial's reports), so running it again only adds what is new.
"""

from __future__ import annotations

import io
import json
import math
import sys
from typing import Any

import pyarrow as pa

from lbs_tune.checkpoints import load_checkpoint
from lbs_tune.config import TrialConfig
from lbs_tune.data import DeviceData, load_dataset
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    EVALUATION_FILE,
    EVALUATION_SCHEMA,
    PARAMS_FILE,
    read_evaluation,
    reported_checkpoints,
    trial_checkpoints,
    trial_folders,
    write_parquet,
)
from lbs_tune.models import build_model
from lbs_tune.storage import Location, locate
from lbs_tune.training import evaluate, resolve_device, resolve_precision

SPLITS = ("train", "val", "test")


def parse_splits(text: str) -> tuple[str, ...]:
    """'train,test' -> ('train', 'test'); unknown names are a UserError."""
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--splits {text}: choose among {', '.join(SPLITS)} (comma-separated)")
    return splits


def _load(location: Location) -> dict[str, Any]:
    with location.fs.open_input_stream(location.path) as f:
        return load_checkpoint(location.uri, io.BytesIO(f.readall()))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate_experiment(source: str, splits: tuple[str, ...] = SPLITS, device: str = "auto") -> str:
    """Evaluate every not yet evaluated checkpoint; return the URI of the evaluation table."""
    experiment = locate(source)
    earlier = read_evaluation(experiment)
    done = EVALUATION_SCHEMA.empty_table() if earlier is None else earlier
    seen = set(zip(*(done[c].to_pylist() for c in ("trial_id", "step", "split")), strict=True))
    torch_device = resolve_device(device)
    datasets: dict[str, DeviceData] = {}
    rows = []
    for trial in trial_folders(experiment):
        trial_id, step_of = reported_checkpoints(trial)
        params = trial.join(PARAMS_FILE)
        try:
            config = TrialConfig.model_validate(json.loads(params.read_text()))
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
                state = _load(checkpoint)
            except UserError as exc:
                print(f"lbs-tune: warning: {exc}; skipped it", file=sys.stderr)
                continue
            todo = [s for s in splits if (trial_id, state["step"], s) not in seen]
            if not todo:
                continue
            key = json.dumps([config.dataset, config.data.model_dump(mode="json")])
            if key not in datasets:
                datasets[key] = load_dataset(config, torch_device)
            data = datasets[key]
            model = build_model(
                config.model, data.num_classes, data.input_shape, config.ghost_batch_size
            )
            model.load_state_dict(state["model"])
            model.to(torch_device)
            precision = resolve_precision(config, torch_device)
            for split in todo:
                part = getattr(data, split)
                if part is None:
                    continue
                loss, accuracy = evaluate(model, data, part, config.eval_batch_size, precision)
                rows.append((trial_id, state["step"], split, _finite(loss), accuracy))
    target = experiment.join(EVALUATION_FILE)
    print(f"evaluated {len(rows)} checkpoint splits ({len(done)} were done before) -> {target.uri}")
    if not rows and earlier is not None:
        return target.uri
    new = pa.Table.from_pylist(
        [dict(zip(EVALUATION_SCHEMA.names, r, strict=True)) for r in rows], EVALUATION_SCHEMA
    )
    table = pa.concat_tables([done, new]).sort_by(
        [("trial_id", "ascending"), ("step", "ascending")]
    )
    write_parquet(target, table)
    return target.uri
