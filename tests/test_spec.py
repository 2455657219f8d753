"""Sweep files and trial configs: validation, line numbers, did-you-mean, grid expansion."""

from __future__ import annotations

import pytest
from conftest import tiny_base, write_spec

from lbs_tune.config import TrialConfig, total_steps
from lbs_tune.errors import UserError
from lbs_tune.spec import load_spec, trial_from_spec
from lbs_tune.sweep import Resources


def error_of(path) -> str:
    with pytest.raises(UserError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\nbase:\n  model: mlp\n  epochs: 1\n  optimiser:\n    name: sgd\n")
    assert error_of(path) == (
        f"{path}:5: optimiser: unknown key 'optimiser' (did you mean 'optimizer'?)"
    )


def test_nested_unknown_key(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text("name: n\nbase:\n  epochs: 1\n  lr:\n    scalling: linear\n")
    assert (
        error_of(path) == f"{path}:5: lr.scalling: unknown key 'scalling' (did you mean 'scaling'?)"
    )


def test_unknown_model_and_dataset(tmp_path):
    path = write_spec(tmp_path / "m.yaml", tiny_base(model="resnet21"))
    assert "unknown model 'resnet21' (did you mean 'resnet20'?)" in error_of(path)
    path = write_spec(tmp_path / "d.yaml", tiny_base(dataset="cifar"))
    assert "unknown dataset 'cifar' (did you mean 'cifar10'?)" in error_of(path)


def test_bad_value_in_the_grid_points_at_the_grid_line(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: g\nbase:\n  epochs: 1\n  data: {samples: 2000}\n"
        "grid:\n  batch_size: [16, 999999]\n  lr.scaling: [none, sqrt]\n"
    )
    message = error_of(path)
    assert message.startswith(f"{path}:6: batch_size: batch_size 999999 is larger than the 1440")
    assert "(grid point batch_size=999999, lr.scaling=none)" in message


@pytest.mark.parametrize(
    ("dataset", "model", "fits"),
    [("mnist1d", "resnet20", "mlp, cnn1d"), ("mnist1d", "lenet", "mlp, cnn1d"),
     ("cifar10", "cnn1d", "mlp, lenet, resnet20, wrn16_4")],
)  # fmt: skip
def test_a_model_that_cannot_take_the_dataset_is_refused_before_anything_runs(
    tmp_path, dataset, model, fits
):
    path = write_spec(tmp_path / "fit.yaml", tiny_base(), {"model": ["mlp", model]})
    if dataset != "mnist1d":
        path.write_text(path.read_text().replace("dataset: mnist1d", f"dataset: {dataset}"))
    message = error_of(path)
    assert message.startswith(f"{path}:")
    assert f"model: {model} cannot take {dataset} inputs of shape" in message
    assert message.endswith(f"models that can: {fits} (grid point model={model})")


def test_literal_error_suggests_the_closest_choice(tmp_path):
    path = write_spec(tmp_path / "opt.yaml", tiny_base(optimizer__name="lasr"))
    message = error_of(path)
    assert "optimizer.name: got 'lasr'" in message and "(did you mean 'lars'?)" in message


def test_grid_key_under_a_base_value_is_a_clear_error(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("name: v\nbase:\n  epochs: 1\n  data: 5\ngrid:\n  data.samples: [100]\n")
    assert error_of(path) == (
        f"{path}:6: grid.data.samples: 'data' of 'data.samples' is a value, not a section; "
        "make base.data a section or change grid.data.samples"
    )


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: t\nbase:\n  epochs: 1\n  lr: {base: 0.1, base: 0.2}\n")
    assert error_of(path) == f"{path}:4: base.lr.base: given twice (first on line 4); keep one"
    path.write_text("name: t\nbase:\n  epochs: 1\nbase:\n  epochs: 2\n")
    assert error_of(path) == f"{path}:4: base: given twice (first on line 2); keep one"


def test_a_grid_value_listed_twice_is_refused(tmp_path):
    path = write_spec(tmp_path / "dup.yaml", tiny_base(), {"seed": [0, 1, 1]})
    assert error_of(path).startswith(f"{path}:") and "grid.seed: 1 listed twice" in error_of(path)


def test_literal_error_lists_choices(tmp_path):
    path = tmp_path / "lit.yaml"
    path.write_text("name: l\nbase:\n  epochs: 1\ngrid:\n  lr.scaling: [quadratic]\n")
    message = error_of(path)
    assert message.startswith(f"{path}:5: lr.scaling: got 'quadratic'")
    assert "'none', 'linear', 'sqrt' or 'sde'" in message


def test_malformed_yaml_gives_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nbase:\n  model: mlp\n  lr: {base: 0.1\n")
    message = error_of(path)
    assert message.startswith(f"{path}:") and "malformed YAML" in message


def test_empty_grid_value_list(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: e\nbase:\n  epochs: 1\ngrid:\n  batch_size: []\n")
    assert error_of(path) == (
        f"{path}:5: grid.batch_size: no values; list at least one or remove the key"
    )


def test_budget_must_be_one(tmp_path):
    path = write_spec(tmp_path / "b.yaml", {**tiny_base(), "steps": 10, "epochs": 1})
    assert "give one budget, not epochs and steps" in error_of(path)
    path = write_spec(tmp_path / "n.yaml", {"model": "mlp"})
    assert "no budget" in error_of(path)


def test_missing_file(tmp_path):
    assert "cannot read the sweep file" in error_of(tmp_path / "nope.yaml")


def test_grid_points_and_first_point_for_train(tmp_path):
    path = write_spec(
        tmp_path / "s.yaml", tiny_base(), {"batch_size": [16, 64], "lr.scaling": ["none", "linear"]}
    )
    spec = load_spec(path)
    assert spec.points() == [
        {"batch_size": 16, "lr.scaling": "none"},
        {"batch_size": 16, "lr.scaling": "linear"},
        {"batch_size": 64, "lr.scaling": "none"},
        {"batch_size": 64, "lr.scaling": "linear"},
    ]
    _, config = trial_from_spec(path, ["lr.scaling=sqrt", "epochs=3"])
    assert (config.batch_size, config.lr.scaling, config.epochs) == (16, "sqrt", 3)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        trial_from_spec(path, ["batch_size"])


def test_budget_in_steps():
    config = TrialConfig(batch_size=1024, examples=400_000)
    assert total_steps(config, 40_000) == 390  # the ANCHORS table's 390 steps
    config = TrialConfig(batch_size=16, epochs=10)
    assert total_steps(config, 40_000) == 25_000
    # 8 epochs of 36,000 at batch 2048: 140.625 steps, rounded to 141 = 288,768 examples, within
    # one batch of 8 x 36,000 = 288,000 (the last partial batch of an epoch is not dropped).
    assert total_steps(TrialConfig(batch_size=2048, epochs=8), 36_000) == 141


def test_gpu_fraction_by_batch_size():
    resources = Resources(cpu=2, gpu={"16": 0.25, "128": 0.5, "default": 1})
    assert [resources.for_batch(b)[1] for b in (8, 16, 32, 128, 256, 4096)] == [
        0.25,
        0.25,
        0.5,
        0.5,
        1,
        1,
    ]
    assert resources.for_batch(64)[0] == 2


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"noise_scale": {"every": 1, "micro_batch": 5}}, "noise_scale.micro_batch", "divide"),
        (
            {"noise_scale": {"every": 1, "batch": 8, "hessian_examples": 9}},
            "noise_scale.hessian_examples",
            "at most 8",
        ),
        ({"noise_scale": {"every": 0, "micro_batch": 4}}, "noise_scale.every", "greater than 0"),
        (
            {"sharpness": {"every": 1, "iterations": 0}},
            "sharpness.iterations",
            "greater than or equal to 1",
        ),
        ({"sharpness": {"every": -1}}, "sharpness.every", "greater than 0"),
        ({"sharpness": {"every": 1, "batch": 5000}}, "sharpness.batch", "1440 training"),
        ({"max_device_batch": 8, "ghost_batch_size": 16}, "ghost_batch_size", "at most 8"),
        # A report carries one measurement of each: two before it, and one would be lost.
        ({"noise_scale": {"every": 0.25}}, "noise_scale.every", "less than eval_every 0.5"),
        ({"sharpness": {"every": 0.25}}, "sharpness.every", "or eval_every to at most 0.25"),
    ],
)
def test_measurement_blocks_and_batch_norm_sizes_are_checked_before_anything_runs(
    tmp_path, changes, key, words
):
    path = write_spec(tmp_path / "m.yaml", {**tiny_base(), **changes})
    message = error_of(path)
    assert f"{path}:" in message and f"{key}:" in message and words in message, message


def test_a_stored_trial_config_measuring_between_evaluations_still_loads():
    """The check of `every` against `eval_every` refuses new sweeps only (`check_trial`): the
    trial configs of an experiment run before it still load, for evaluate and the report."""
    stored = {**tiny_base(), "noise_scale": {"every": 0.25}, "sharpness": {"every": 0.25}}
    assert TrialConfig.model_validate(stored).noise_scale.every == 0.25


def test_the_sweep_metric_takes_its_own_direction(tmp_path):
    path = write_spec(tmp_path / "loss.yaml", tiny_base(), metric={"name": "val/loss"})
    assert load_spec(path).metric.mode == "min"
    path = write_spec(
        tmp_path / "wrong.yaml", tiny_base(), metric={"name": "val/loss", "mode": "max"}
    )
    assert error_of(path).endswith(
        "metric.mode: val/loss is better lower; use mode: min or leave mode out"
    )
    path = write_spec(tmp_path / "speed.yaml", tiny_base(), metric={"name": "images_per_s"})
    assert "metric.mode" in error_of(path)
    given = write_spec(
        tmp_path / "given.yaml", tiny_base(), metric={"name": "images_per_s", "mode": "max"}
    )
    assert load_spec(given).metric.mode == "max"


def test_a_sweep_target_needs_a_metric_with_a_direction(tmp_path):
    path = write_spec(tmp_path / "t.yaml", tiny_base(), target={"metric": "lr", "value": 0.1})
    assert error_of(path).endswith("target.metric: lr has no better direction to reach")


def test_an_error_in_a_set_override_names_the_override_not_the_files_line(tmp_path):
    path = write_spec(tmp_path / "s.yaml", tiny_base(), {"batch_size": [16, 32]})
    with pytest.raises(UserError) as info:
        load_spec(path, ["base.lr.base=nan"])
    assert str(info.value).startswith("--set base.lr.base=nan: lr.base: Input should be a finite")
    with pytest.raises(UserError) as info:
        load_spec(path, ["grid.batch_size=[16, 0]"])
    assert str(info.value).startswith("--set grid.batch_size=[16, 0]: batch_size: ")
    with pytest.raises(UserError) as info:
        load_spec(path, ["base.lr.base=0.1", "base.lr.scaling=linnear"])
    assert str(info.value).startswith("--set base.lr.scaling=linnear: lr.scaling: ")
    # A key no override touched is still placed at its line of the file.
    bad = write_spec(tmp_path / "b.yaml", tiny_base(lr={"base": 0.1, "scaling": "linnear"}))
    with pytest.raises(UserError) as info:
        load_spec(bad, ["base.lr.base=0.2"])
    assert str(info.value).startswith(f"{bad}:") and ": lr.scaling: " in str(info.value)
