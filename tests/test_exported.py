"""`lbs-tune export`: the grid keys on every history row, no column of a metric never reported,
and types that let two sweeps' exports concatenate in pandas and polars (the committed real
sweep folders: a classification sweep, and one whose grid spans datasets and sets data.dir)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_EXPERIMENTS

from analysis import export
from analysis.exported import declared_type
from lbs_tune.names import METRICS


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict[str, pa.Table]]:
    """Sweep name -> table name -> the exported table, of copies of the committed sweeps."""
    found = {}
    for name in ("quickstart", "broken"):
        folder = tmp_path_factory.mktemp("export")
        shutil.copytree(TINY_EXPERIMENTS / name, folder / name)
        export(str(folder / name), str(folder / "out"))
        found[name] = {t: pq.read_table(folder / "out" / f"{t}.parquet") for t in TABLES}
    return found


TABLES = ("trials", "history")


def _params(name: str) -> dict[str, dict]:
    """Ray's trial_id -> the params.json of that trial of a committed sweep."""
    found = {}
    for params in (TINY_EXPERIMENTS / name).glob("*/params.json"):
        lines = (params.parent / "result.json").read_text().splitlines()
        if lines:
            found[json.loads(lines[0])["trial_id"]] = json.loads(params.read_text())
    return found


def test_every_history_row_carries_the_grid_keys(exported):
    history = exported["quickstart"]["history"]
    assert history.column_names[:4] == ["trial_id", "batch_size", "lr.scaling", "seed"]
    params = _params("quickstart")
    for row in history.select(["trial_id", "batch_size", "lr.scaling", "seed"]).to_pylist():
        config = params[row["trial_id"]]
        assert (row["batch_size"], row["lr.scaling"], row["seed"]) == (
            config["batch_size"],
            config["lr"]["scaling"],
            config["seed"],
        )
    broken = exported["broken"]["history"]
    assert broken.column_names[:6] == [
        "trial_id",
        "batch_size",
        "lr.scaling",
        "seed",
        "dataset",
        "step",
    ]


def test_metrics_never_reported_are_left_out(exported):
    for tables in exported.values():
        history, trials = tables["history"], tables["trials"]
        for metric in METRICS:
            for table, column in ((history, metric), (trials, f"final/{metric}")):
                if column in table.column_names:
                    assert table[column].null_count < table.num_rows, column
        assert not {"val/miou", "val/perplexity"} & set(history.column_names)
        assert "best/val/perplexity" not in trials.column_names
        assert "val/accuracy" in history.column_names and "best/val/accuracy" in trials.column_names


def test_two_sweeps_exports_concatenate_in_pandas_and_polars(exported):
    quickstart, broken = exported["quickstart"], exported["broken"]
    assert quickstart["trials"]["data.dir"].null_count == quickstart["trials"].num_rows
    assert broken["trials"]["data.dir"].null_count == 0
    for table in TABLES:
        a, b = quickstart[table], broken[table]
        for field in a.schema:
            if field.name in b.schema.names:
                assert b.schema.field(field.name).type == field.type, (table, field.name)
        both = pl.concat([pl.from_arrow(a), pl.from_arrow(b)], how="diagonal")
        assert both.height == a.num_rows + b.num_rows
        frame = pd.concat([a.to_pandas(), b.to_pandas()], ignore_index=True)
        assert len(frame) == a.num_rows + b.num_rows
    both = pl.concat(
        [pl.from_arrow(quickstart["trials"]), pl.from_arrow(broken["trials"])], how="diagonal"
    )
    assert both["data.dir"].dtype == pl.String and both["batch_size"].dtype == pl.Int64


def test_config_columns_have_the_type_the_config_declares():
    assert declared_type("data.dir") == pa.string()
    assert declared_type("batch_size") == pa.int64()
    assert declared_type("lr.base") == pa.float64()
    assert declared_type("data.flip") == pa.bool_()
    assert declared_type("noise_scale.every") == pa.float64()
    assert declared_type("max_device_batch") == pa.string()  # 64 or auto
    assert declared_type("lr.scaling") == pa.string()
    assert declared_type("optimizer.betas") is None  # a list
    assert declared_type("model_options.nhid") is None
    assert declared_type("search.number") is None
