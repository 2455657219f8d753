"""The zoo of issue 12 wired into the loop: every new model trains through `lbs-tune train` on
the synthetic data of its input kind; the language model's stream layout, evaluation (against
PyTorch's word_language_model example) and resume; segmentation's loss and mIoU; WikiText-2 and
Cityscapes in their real layouts; gradient clipping; the two sweep files at tiny size."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import histories, read_jsonl, same_results, tiny_base, write_spec
from fixtures_formats import WIKITEXT2_TRAIN, write_cityscapes, write_wikitext2

import lbs_tune.cityscapes
from lbs_tune.checkpoints import load_checkpoint
from lbs_tune.checks import check_trial
from lbs_tune.config import KeyedError, TrialConfig
from lbs_tune.data import DeviceData, Split, TokenStreams, load_dataset
from lbs_tune.evaluate import evaluate_experiment
from lbs_tune.experiment import run_checkpoints
from lbs_tune.models import build_model
from lbs_tune.names import set_dotted
from lbs_tune.runner import run
from lbs_tune.segmentation import IGNORE_INDEX
from lbs_tune.spec import load_spec
from lbs_tune.studies import Objective, read_studies
from lbs_tune.tasks import LanguageModel, Segmentation

SWEEPS = Path(__file__).parent.parent / "sweeps"
TINY_LSTM = {"emsize": 8, "nhid": 8}


def synthetic(model: str, **changes) -> dict:
    """A two-step trial of `model` on the synthetic data of its kind, tiny sizes."""
    base = tiny_base(
        dataset="synthetic", model=model, batch_size=2, steps=2, eval_every=100,
        eval_batch_size=4, data={"samples": 12, "shape": [3, 32, 32], "classes": 5},
    )  # fmt: skip
    for key, value in changes.items():
        set_dotted(base, key.replace("__", "."), value)
    return base


# ---------------------------------------------------------------------------- Two steps each


# One model of each kind through `lbs-tune train`: the classifiers differ only in the network,
# and test_models.py trains each of them two steps on its own.
@pytest.mark.parametrize(
    ("model", "changes", "metric"),
    [
        ("mobilenet_v2", {}, "val/accuracy"),
        ("drn_d_22", {"data__shape": [3, 16, 24]}, "val/miou"),
        ("lstm", {"data__samples": 200, "data__bptt": 5, "model_options": TINY_LSTM},
         "val/perplexity"),
    ],
)  # fmt: skip
def test_every_new_model_trains_two_steps_on_synthetic_data_of_its_kind(
    cli, tmp_path, model, changes, metric
):
    spec = write_spec(tmp_path / f"{model}.yaml", synthetic(model, **changes))
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["step"] == 2 and math.isfinite(row["train/loss"]) and row[metric] is not None
    # A language model's examples are tokens: 2 steps x 2 rows x bptt 5.
    assert row["examples"] == (2 * 2 * 5 if model == "lstm" else 2 * 2)


# ---------------------------------------------------------------------------- Language model


def streams(tokens: torch.Tensor, vocab: int, val: torch.Tensor | None = None) -> TokenStreams:
    return TokenStreams(tokens, val, None, vocab, (4,))


def lm_config(**changes) -> TrialConfig:
    base = synthetic("lstm", data__bptt=4, model_options=TINY_LSTM, **changes)
    return TrialConfig.model_validate(base)


def test_language_model_reads_rows_of_the_stream_window_by_window():
    # 50 tokens as 3 rows of 16 (2 dropped); (16 - 1) // 4 = 3 windows of 4 make an epoch.
    task = LanguageModel(lm_config(batch_size=3), streams(torch.arange(50), 50), "fp32")
    assert (task.epoch_steps, task.examples_per_step, task.epoch_examples) == (3, 12, 36)
    rows = torch.arange(48).view(3, 16)
    for step in range(7):
        start = step % 3 * 4
        x, y = task.batch(step, step * task.examples_per_step, 3)
        assert torch.equal(x, rows[:, start : start + 4]), step
        assert torch.equal(y, rows[:, start + 1 : start + 5]), step


def test_language_model_carries_the_hidden_state_and_restarts_it_each_epoch():
    torch.manual_seed(0)
    config = lm_config(batch_size=4, max_device_batch=2)
    task = LanguageModel(config, streams(torch.randint(0, 20, (60,)), 20), "fp32")
    model = build_model("lstm", 20, (4,), **TINY_LSTM)
    for step in range(task.epoch_steps + 1):
        x, _ = task.batch(step, step * task.examples_per_step, 4)
        if step % task.epoch_steps == 0:
            assert task.hidden == [None, None], "an epoch starts from the zero state"
        for chunk, rows in enumerate(x.split(2)):
            task.forward(model, rows, chunk)
        # Each micro-batch has the state of its own rows, cut from the graph.
        assert all(h[0].shape == (2, 2, 8) and not h[0].requires_grad for h in task.hidden)


def example_evaluate(model, tokens: torch.Tensor, rows: int, bptt: int) -> float:
    """PyTorch's word_language_model example (main.py: batchify, get_batch, evaluate) as it is
    written there: the mean loss per token of `tokens`."""
    nbatch = tokens.size(0) // rows
    data = tokens.narrow(0, 0, nbatch * rows).view(rows, -1).t().contiguous()
    model.eval()
    total_loss = 0.0
    hidden = None
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            seq_len = min(bptt, len(data) - 1 - i)
            source, target = data[i : i + seq_len], data[i + 1 : i + 1 + seq_len].reshape(-1)
            # The example's model is sequence-first; ours is batch-first.
            output, hidden = model(source.t(), hidden)
            output = output.transpose(0, 1).reshape(-1, output.shape[-1])
            total_loss += len(source) * F.cross_entropy(output, target).item()
    return total_loss / (len(data) - 1)


def test_language_model_evaluation_is_the_examples():
    torch.manual_seed(0)
    model = build_model("lstm", 20, (4,), **TINY_LSTM)
    val = torch.randint(0, 20, (103,))
    task = LanguageModel(lm_config(), streams(torch.randint(0, 20, (60,)), 20, val), "fp32")
    scores = task.evaluate(model, "val", batch_size=5)
    assert scores["loss"] == pytest.approx(example_evaluate(model, val, 5, 4), rel=1e-6)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    assert task.evaluate(model, "test", batch_size=5) is None
    # All-zero weights predict uniformly: loss log V, perplexity V, exactly.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    scores = task.evaluate(model, "val", batch_size=5)
    assert scores["perplexity"] == pytest.approx(20, rel=1e-6)


def test_language_model_resumes_mid_epoch_bit_for_bit(cli, tmp_path):
    # 400 tokens, 40 for val: 4 rows of 90, (90 - 1) // 4 = 22 steps an epoch; a checkpoint every
    # 3 steps, so the one rolled back to (step 9) is mid-epoch with a state carried.
    base = synthetic(
        "lstm", data__samples=400, data__bptt=4, data__val_fraction=0.1, model_options=TINY_LSTM,
        batch_size=4, max_device_batch=2, steps=30, eval_every=3 / 22, checkpoint_every=3 / 22,
        clip_grad_norm=0.5,
    )  # fmt: skip
    spec = write_spec(tmp_path / "lm.yaml", base)
    assert cli("train", spec, "--out", tmp_path / "whole")[0] == 0
    expected = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in expected][:4] == [3, 6, 9, 12]

    out = tmp_path / "resumed"
    assert cli("train", spec, "--out", out)[0] == 0
    files = dict(run_checkpoints(out))
    assert all(h is not None for h in load_checkpoint(files[9])["sampler"]["hidden"])
    for step, path in files.items():
        if step > 9:
            path.unlink()
    code, stdout, _ = cli("train", spec, "--out", out)
    assert code == 0 and "resuming from the checkpoint of step 9" in stdout
    assert same_results(read_jsonl(out / "metrics.jsonl"), expected)


# ---------------------------------------------------------------------------- Segmentation


def segmentation_task(images: torch.Tensor, masks: torch.Tensor, classes: int) -> Segmentation:
    data = DeviceData(
        train=Split(images, masks), val=Split(images, masks), test=None, num_classes=classes,
        input_shape=tuple(images.shape[1:]), mean=torch.zeros(1, 3, 1, 1),
        std=torch.ones(1, 3, 1, 1), crop_padding=0, flip=False,
    )  # fmt: skip
    config = TrialConfig.model_validate(synthetic("drn_d_22", batch_size=2))
    return Segmentation(config, data, "fp32", order_seed=0, augment_seed=0)


def test_segmentation_loss_is_per_scored_pixel_and_zero_for_none():
    torch.manual_seed(0)
    masks = torch.randint(0, 4, (2, 5, 6), dtype=torch.uint8)
    masks[0, :2] = IGNORE_INDEX
    task = segmentation_task(torch.zeros(2, 3, 5, 6, dtype=torch.uint8), masks, 4)
    logits = torch.randn(2, 4, 5, 6)
    scored = masks != IGNORE_INDEX
    per_pixel = F.cross_entropy(logits, masks.long().clamp_max(3), reduction="none")
    assert task.loss(logits, masks).item() == pytest.approx(per_pixel[scored].mean().item())
    right, count = task.scores(logits, masks)
    assert count.item() == scored.sum().item()
    assert right.item() == ((logits.argmax(1) == masks) & scored).sum().item()
    nothing = torch.full_like(masks, IGNORE_INDEX)
    assert task.loss(logits, nothing).item() == 0.0, "not 0 / 0, which would read as divergence"


def test_a_segmentation_trial_with_a_noise_scale_is_refused_in_one_line(cli, tmp_path):
    """Its loss averages the batch's scored pixels: an example's own gradient is no unit of
    the noise scale's estimators (B_simple came out 4x too large on a 1x1 conv with half the
    images scoring one pixel). The sharpness is that of the loss as it is: measured."""
    changes = {"data__shape": [3, 16, 24], "eval_every": 1}
    spec = write_spec(
        tmp_path / "drn.yaml", synthetic("drn_d_22", noise_scale={"every": 1}, **changes)
    )
    code, out, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"{spec}:" in err and "noise_scale: a segmentation loss is the mean over" in err
    assert "remove noise_scale" in err and not (tmp_path / "run").exists()
    sharp = synthetic("drn_d_22", sharpness={"every": 1, "batch": 4, "iterations": 2}, **changes)
    code, _, err = cli("train", write_spec(tmp_path / "s.yaml", sharp), "--out", tmp_path / "s")
    assert code == 0, err


def test_segmentation_evaluation_pools_pixels_over_the_split():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    masks = torch.randint(0, 4, (5, 16, 16), dtype=torch.uint8)
    masks[:, :3] = IGNORE_INDEX
    task = segmentation_task(images, masks, 4)
    model = build_model("drn_d_22", 4, (3, 16, 16)).eval()
    scores = task.evaluate(model, "val", batch_size=2)  # batches of 2, 2 and 1
    with torch.no_grad():
        prediction = model(images.float()).argmax(1).numpy()
    target, scored = masks.numpy(), masks.numpy() != IGNORE_INDEX
    ious = []
    for k in range(4):
        hits = np.sum((prediction == k) & (target == k) & scored)
        union = np.sum(((prediction == k) | (target == k)) & scored)
        if union:
            ious.append(hits / union)
    assert scores["miou"] == pytest.approx(np.mean(ious))
    accuracy = np.sum((prediction == target) & scored) / scored.sum()
    assert scores["pixel_accuracy"] == scores["accuracy"] == pytest.approx(accuracy)


# ---------------------------------------------------------------------------- Real layouts


def test_wikitext2_files_train_through_the_real_path(cli, tmp_path):
    write_wikitext2(tmp_path / "data", train=WIKITEXT2_TRAIN * 8)
    base = tiny_base(
        dataset="wikitext2", model="lstm", model_options=TINY_LSTM, batch_size=2, steps=6,
        eval_every=100, eval_batch_size=2, data={"dir": str(tmp_path / "data"), "bptt": 5},
    )  # fmt: skip
    spec = write_spec(tmp_path / "wt2.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # 184 training tokens, 2 rows of 92: (92 - 1) // 5 = 18 steps an epoch of 10 tokens each.
    assert row["examples"] == 6 * 10 and row["epoch"] == round(6 / 18, 6)
    assert row["val/perplexity"] == pytest.approx(math.exp(row["val/loss"]))
    assert row["test/perplexity"] == pytest.approx(math.exp(row["test/loss"]))
    data = load_dataset(TrialConfig.model_validate(base), torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (184, 11, 4)
    assert data.num_classes == 13 and data.input_shape == (5,)  # the words of WIKITEXT2_TRAIN

    base["batch_size"] = 40  # 40 rows of 6 tokens: more than 184
    spec = write_spec(tmp_path / "wt2.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "big")
    assert code == 2 and "use at most 30, or a smaller data.bptt" in err


def test_cityscapes_files_train_through_the_real_path_and_are_cached(cli, tmp_path, monkeypatch):
    images, _ = write_cityscapes(tmp_path / "data", n_train=6, n_val=2, shape=(16, 32))
    base = tiny_base(
        dataset="cityscapes", model="drn_d_22", batch_size=2, steps=2, eval_every=100,
        eval_batch_size=2,
        data={"dir": str(tmp_path / "data"), "image_size": [16, 32], "val_fraction": 0.34,
              "crop_padding": 4},
    )  # fmt: skip
    spec = write_spec(tmp_path / "city.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert 0 <= row["val/miou"] <= 1 and 0 <= row["test/miou"] <= 1
    (cache,) = (tmp_path / "data" / "cityscapes").glob("lbs_resized_16x32_*.npz")

    # Read again from the cache alone, the same arrays: train and the official val as test.
    def no_png(*args):
        raise AssertionError("read the PNGs although the cache is there")

    monkeypatch.setattr(lbs_tune.cityscapes, "read_cityscapes", no_png)
    data = load_dataset(TrialConfig.model_validate(base), torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)
    assert data.train.y.dtype == torch.uint8 and data.input_shape == (3, 16, 32)
    assert torch.equal(data.test.x, torch.from_numpy(images["val"]))
    assert set(torch.unique(data.test.y).tolist()) == set(range(19)) | {IGNORE_INDEX}
    # Other files (here: one rewritten) make another cache, never a stale read.
    monkeypatch.undo()
    label = next((tmp_path / "data" / "cityscapes" / "gtFine" / "train").glob("*/*.png"))
    label.write_bytes(label.read_bytes())
    load_dataset(TrialConfig.model_validate(base), torch.device("cpu"))
    assert len(list(cache.parent.glob("lbs_resized_16x32_*.npz"))) == 2


# ---------------------------------------------------------------------------- Checks


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"dataset": "cifar10", "model": "lstm"}, "model",
         "^lstm is a language model; cifar10 needs a classifier; models that can: mlp, lenet,"),
        ({"dataset": "wikitext2", "model": "drn_d_22"}, "model", "models that can: lstm"),
        ({"dataset": "wikitext2", "model": "lstm", "batch_size": 60_000}, "batch_size",
         "use at most 58017"),
        ({"dataset": "wikitext2", "model": "lstm", "model_options": {"hidden": 3}},
         "model_options", r"lstm has no option hidden; its options: emsize \(default 200\)"),
        ({"dataset": "wikitext2", "model": "lstm", "model_options": {"nhid": 3}},
         "model_options", "tied weights need emsize == nhid"),
        ({"dataset": "synthetic", "model": "drn_d_22", "data": {"classes": 300}},
         "data.classes", "use at most 254"),
        ({"dataset": "synthetic", "model": "drn_d_22", "data": {"shape": [40]}}, "model",
         "models that can: none of the zoo"),
    ],
)  # fmt: skip
def test_zoo_checks_name_the_key_and_the_fix(changes, key, message):
    config = TrialConfig.model_validate({"steps": 1, **changes})
    with pytest.raises(KeyedError, match=message) as info:
        check_trial(config)
    assert info.value.key == key


def test_synthetic_data_is_of_the_models_kind():
    segmentation = TrialConfig.model_validate(synthetic("drn_d_22"))
    check_trial(segmentation)
    seg = load_dataset(segmentation, torch.device("cpu"))
    assert seg.train.y.shape[1:] == (32, 32) and seg.train.y.dtype == torch.uint8
    assert set(torch.unique(seg.train.y).tolist()) == {0, 1, 2, 3, 4, IGNORE_INDEX}
    tokens = synthetic("lstm", data__samples=200, data__bptt=5, model_options=TINY_LSTM)
    check_trial(TrialConfig.model_validate(tokens))
    lm = load_dataset(TrialConfig.model_validate(tokens), torch.device("cpu"))
    # One stream of 200 tokens: the last 10% is the validation split; no test split.
    assert (len(lm.train), len(lm.val), lm.test) == (180, 20, None)
    assert lm.num_classes == 5 and lm.input_shape == (5,) and int(lm.train.max()) < 5


# ---------------------------------------------------------------------------- Clipping


def test_clipping_bounds_each_update_to_lr_times_the_norm(cli, tmp_path, data_dir):
    # Plain SGD: an update is -lr x the clipped gradient, so its norm is lr x 1e-3 exactly (an
    # unclipped update at this LR would be thousands of times larger).
    base = tiny_base(
        lr={"base": 100, "base_batch_size": 32},
        steps=3, eval_every=1 / 45, checkpoint_every=1 / 45, clip_grad_norm=1e-3,
        optimizer={"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    )  # fmt: skip
    spec = write_spec(tmp_path / "clip.yaml", base)
    assert cli("train", spec, "--out", tmp_path / "run")[0] == 0
    states = [
        load_checkpoint(path)["model"] for _, path in sorted(run_checkpoints(tmp_path / "run"))
    ]
    assert len(states) == 3
    for before, after in itertools.pairwise(states):
        update = torch.cat([(after[k] - before[k]).flatten() for k in before])
        assert update.norm().item() == pytest.approx(100 * 1e-3, rel=1e-4)


# ---------------------------------------------------------------------------- Sweep files


@pytest.mark.ray
def test_wikitext2_file_runs_tiny_tuned_to_a_perplexity_target_on_real_files(ray_cluster, tmp_path):
    # Tuned to a val/perplexity target (the search refused a perplexity target once).
    write_wikitext2(tmp_path / "data", train=WIKITEXT2_TRAIN * 8)
    overrides = [
        f"base.data.dir={tmp_path / 'data'}",
        "base.data.bptt=5",
        "base.model_options.emsize=8",
        "base.model_options.nhid=8",
        "base.steps=2",
        "base.eval_batch_size=2",
        "grid.batch_size=[2]",
        "grid.seed=[0]",
        "grid.lr.scaling=[none]",
        "search={space: {lr.base: {log_uniform: [1, 20]}}, trials_per_point: 1, sampler: qmc}",
        "target={metric: val/perplexity, value: 1000}",
        "resources.cpu=1",
    ]
    spec = SWEEPS / "wikitext2_lstm.yaml"
    assert run(spec, overrides, storage=str(tmp_path / "results"), address=ray_cluster.address) == 0
    experiment = tmp_path / "results" / load_spec(spec, overrides).name
    (rows,) = histories(experiment).values()
    assert rows[-1]["step"] == 2 and rows[-1]["val/perplexity"] > 1
    assert rows[-1]["examples"] == 2 * 2 * 5 and rows[-1]["gpu_ids"] != ""
    ((study,),) = [read_studies(experiment)]
    (trial,) = study.trials
    assert study.objective == Objective("steps_to_target", "val/perplexity", "min", 1000)
    assert (trial["state"], trial["value"]) == ("COMPLETE", 2)  # reached at its one evaluation
    # `lbs-tune evaluate` builds the trial's own LSTM (its model options) and scores perplexity.
    evaluate_experiment(str(experiment), ("val",), device="cpu")
    (row,) = pq.read_table(experiment / "evaluation.parquet").to_pylist()
    assert (row["step"], row["split"], row["miou"]) == (2, "val", None)
    assert row["perplexity"] == pytest.approx(rows[-1]["val/perplexity"], rel=1e-5)


@pytest.mark.ray
def test_cityscapes_file_runs_tiny_on_real_files(ray_cluster, tmp_path):
    write_cityscapes(tmp_path / "data", n_train=6, n_val=2, shape=(16, 32))
    overrides = [
        f"base.data.dir={tmp_path / 'data'}",
        "base.data.image_size=[16, 32]",
        "base.data.val_fraction=0.34",
        "base.data.crop_padding=4",
        "base.steps=1",
        "base.eval_batch_size=2",
        "grid.batch_size=[2]",
        "grid.lr.scaling=[linear]",
        "resources.cpu=1",
    ]
    spec = SWEEPS / "cityscapes_drn.yaml"
    assert run(spec, overrides, storage=str(tmp_path / "results"), address=ray_cluster.address) == 0
    experiment = tmp_path / "results" / load_spec(spec, overrides).name
    (rows,) = histories(experiment).values()
    assert rows[-1]["step"] == 1 and rows[-1]["val/miou"] is not None
    assert rows[-1]["test/miou"] is not None and rows[-1]["gpu_ids"] != ""
    # `lbs-tune evaluate` scores a segmentation checkpoint by the task's own evaluation.
    evaluate_experiment(str(experiment), ("val",), device="cpu")
    (row,) = pq.read_table(experiment / "evaluation.parquet").to_pylist()
    assert (row["step"], row["split"], row["perplexity"]) == (1, "val", None)
    assert row["miou"] == pytest.approx(rows[-1]["val/miou"], rel=1e-5)
    assert row["pixel_accuracy"] == pytest.approx(rows[-1]["val/pixel_accuracy"], rel=1e-5)
