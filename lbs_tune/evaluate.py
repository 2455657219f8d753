"""`lbs-tune evaluate`: every checkpoint of every trial, on the chosen splits, into Parquet.

Each checkpoint is evaluated with its trial's own model and dataset config (from params.json)
and written to `<experiment>/evaluation.parquet`: trial_id, step, split, loss, accuracy.
Checkpoints already in that table are skipped, so running it again only adds what is new.
"""

from __future__ import annotations

import io
import json
import re
import sys
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lbs_tune.checkpoints import CHECKPOINT_FILE, load_checkpoint
from lbs_tune.data import DeviceData, load_dataset
from lbs_tune.errors import UserError
from lbs_tune.models import build_model
from lbs_tune.spec import TrialConfig
from lbs_tune.storage import Location
from lbs_tune.training import evaluate, resolve_device, resolve_precision

EVALUATION_FILE = "evaluation.parquet"
SPLITS = ("train", "val", "test")
SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("step", pa.int64()),
        ("split", pa.string()),
        ("loss", pa.float64()),
        ("accuracy", pa.float64()),
    ]
)
CHECKPOINT_DIR = re.compile(r"^checkpoint_\d+$")


def parse_splits(text: str) -> tuple[str, ...]:
    """'train,test' -> ('train', 'test'); unknown names are a UserError."""
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--splits {text}: choose among {', '.join(SPLITS)} (comma-separated)")
    return splits


def read_evaluation(experiment: Location) -> pa.Table:
    """The evaluation table of an experiment (empty if none was written yet)."""
    target = experiment.join(EVALUATION_FILE)
    if not target.exists():
        return SCHEMA.empty_table()
    with experiment.fs.open_input_file(target.path) as f:
        return pq.ParquetFile(f).read().cast(SCHEMA)


def _checkpoints(experiment: Location, folder: str) -> list[Location]:
    trial = experiment.join(folder)
    try:
        infos = experiment.fs.get_file_info(pafs.FileSelector(trial.path))
    except (FileNotFoundError, OSError):
        return []
    names = sorted(i.base_name for i in infos if CHECKPOINT_DIR.match(i.base_name))
    return [trial.join(name, CHECKPOINT_FILE) for name in names]


def _load(location: Location) -> dict[str, Any]:
    with location.fs.open_input_stream(location.path) as f:
        return load_checkpoint(location.uri, io.BytesIO(f.readall()))


def evaluate_experiment(source: str, splits: tuple[str, ...] = SPLITS, device: str = "auto") -> str:
    """Evaluate every not yet evaluated checkpoint; return the URI of evaluation.parquet."""
    from analysis import load
    from analysis.load import experiment_location

    experiment = experiment_location(source)
    done = read_evaluation(experiment)
    seen = set(zip(*(done[c].to_pylist() for c in ("trial_id", "step", "split")), strict=True))
    torch_device = resolve_device(device)
    datasets: dict[str, DeviceData] = {}
    rows = []
    for trial in load(source).trials.to_pylist():
        params = experiment.join(trial["folder"], "params.json")
        if not params.exists():
            continue
        config = TrialConfig.model_validate(json.loads(params.read_text()))
        for checkpoint in _checkpoints(experiment, trial["folder"]):
            try:
                state = _load(checkpoint)
            except UserError as exc:
                print(f"lbs-tune: warning: {exc}; skipped it", file=sys.stderr)
                continue
            todo = [s for s in splits if (trial["trial_id"], state["step"], s) not in seen]
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
                rows.append((trial["trial_id"], state["step"], split, loss, accuracy))
    new = pa.Table.from_pylist([dict(zip(SCHEMA.names, r, strict=True)) for r in rows], SCHEMA)
    table = pa.concat_tables([done, new]).sort_by(
        [("trial_id", "ascending"), ("step", "ascending")]
    )
    target = experiment.join(EVALUATION_FILE)
    temp = target.path + ".tmp" if target.is_local else target.path
    pq.write_table(table, temp, filesystem=experiment.fs)
    if temp != target.path:
        experiment.fs.move(temp, target.path)
    print(f"evaluated {len(rows)} checkpoint splits ({len(done)} were done before) -> {target.uri}")
    return target.uri
