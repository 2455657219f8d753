"""Device-resident data: splits, augmentation as tensor ops, seeded data order, real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_jsonl, tiny_base, write_spec
from fixtures_formats import write_cifar10, write_mnist

from lbs_tune.config import TrialConfig
from lbs_tune.data import (
    BatchSampler,
    DeviceData,
    Split,
    load_dataset,
    random_crop,
    random_flip,
)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).reshape(2, 3, 5, 5)
    generator = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, generator)
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        dy, dx = offsets[0, i], offsets[1, i]
        assert torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 5])
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_random_flip_flips_about_half_left_right():
    x = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 1, 1, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == x[:, 0, 0, 3]).sum().item()
    kept = (out[:, 0, 0, 0] == x[:, 0, 0, 0]).sum().item()
    assert flipped + kept == 1000 and 400 < flipped < 600


def test_a_mask_is_cropped_and_flipped_with_its_image():
    # Channel 0 of each image holds its mask (as value mod 5), and is never 0 but in padding: a
    # mask moved as its image was is 255 exactly where the crop shifted padding in.
    images = torch.randint(1, 251, (64, 3, 6, 7), dtype=torch.uint8)
    data = DeviceData(
        train=Split(images, images[:, 0] % 5), val=None, test=None, num_classes=5,
        input_shape=(3, 6, 7), mean=None, std=None, crop_padding=2, flip=True,
    )  # fmt: skip
    x, y = data.train_batch(torch.arange(64), torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8 and y.shape == (64, 6, 7)
    assert torch.equal(y, torch.where(x[:, 0] == 0, 255, x[:, 0] % 5).to(torch.uint8))
    assert (y == 255).any() and (y != 255).any()
    # The same draws as an image alone: a crop, then a flip.
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(x, random_flip(random_crop(images, 2, generator), generator))


def test_sampler_reads_epoch_permutations_as_one_stream_and_resumes_exactly():
    sampler = BatchSampler(10, 3, seed=7, device=torch.device("cpu"))
    # 10 steps of 3 are exactly 3 epochs of 10: each epoch is a permutation, no tail dropped
    # (step 3 holds the last example of epoch 0 and the first two of epoch 1).
    stream = torch.cat([sampler.batch(s) for s in range(10)])
    for epoch in range(3):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    assert all(len(sampler.batch(s)) == 3 for s in range(10, 12))

    fresh = BatchSampler(10, 3, seed=7, device=torch.device("cpu"))
    first = [fresh.batch(s) for s in range(3)]
    state = fresh.state_dict()
    rest = [fresh.batch(s) for s in range(3, 8)]
    again = BatchSampler(10, 3, seed=7, device=torch.device("cpu"))
    again.load_state_dict(state)
    assert all(torch.equal(a, again.batch(s)) for s, a in zip(range(3, 8), rest, strict=True))
    assert torch.equal(torch.cat(first + rest), stream[:24])
    other = BatchSampler(10, 3, seed=8, device=torch.device("cpu"))
    assert not torch.equal(torch.cat([other.batch(s) for s in range(3)]), stream[:9])


def test_val_split_is_seeded_and_disjoint(data_dir):
    config = TrialConfig(dataset="mnist1d", data={"samples": 2000}, epochs=1, device="cpu")
    data = load_dataset(config, torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (1440, 160, 400)
    again = load_dataset(config.model_copy(update={"seed": 5}), torch.device("cpu"))
    assert torch.equal(data.val.x, again.val.x), "the split does not depend on the trial seed"
    train_rows = {tuple(r) for r in data.train.x.tolist()}
    assert not any(tuple(r) in train_rows for r in data.val.x.tolist())


def test_cifar10_files_train_through_the_real_path(cli, tmp_path):
    write_cifar10(tmp_path / "data", n_train=40, n_test=10)
    base = tiny_base(dataset="cifar10", model="resnet20", batch_size=8, steps=4, eval_every=100)
    base["data"] = {"dir": str(tmp_path / "data"), "val_fraction": 0.2}
    spec = write_spec(tmp_path / "cifar.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["step"] == 4 and 0 <= row["test/accuracy"] <= 1
    config = TrialConfig.model_validate(base)
    data = load_dataset(config, torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 10)
    assert data.input_shape == (3, 32, 32) and (data.crop_padding, data.flip) == (4, True)


def test_mnist_files_train_through_the_real_path(cli, tmp_path):
    write_mnist(tmp_path / "data", n_train=30, n_test=10)
    base = tiny_base(dataset="mnist", model="lenet", batch_size=10, steps=3, eval_every=100)
    base["data"] = {"dir": str(tmp_path / "data"), "val_fraction": 0.0}
    spec = write_spec(tmp_path / "mnist.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert "val/accuracy" not in row and "test/accuracy" in row


def test_missing_torchvision_data_is_one_line_exit_2(cli, tmp_path):
    base = tiny_base(dataset="cifar10", model="resnet20", steps=1)
    base["data"] = {"dir": str(tmp_path / "empty")}
    spec = write_spec(tmp_path / "cifar.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in err and "download: true" in err


def test_batch_larger_than_the_files_is_refused(cli, tmp_path):
    write_mnist(tmp_path / "data", n_train=30, n_test=10)
    base = tiny_base(dataset="mnist", model="lenet", batch_size=64, steps=1)
    base["data"] = {"dir": str(tmp_path / "data")}
    spec = write_spec(tmp_path / "mnist.yaml", base)
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 2 and "batch_size 64 is larger than the 27 training examples" in err


def test_cuda_without_gpu_is_a_user_error(cli, tmp_path, data_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = write_spec(tmp_path / "t.yaml", tiny_base(steps=1))
    code, _, err = cli("train", spec, "--out", tmp_path / "run", "--device", "cuda")
    assert code == 2 and "use --device cpu" in err


def test_channel_stats_equal_numpy():
    from lbs_tune.data import channel_stats

    images = np.random.default_rng(0).integers(0, 256, (50, 3, 4, 5), dtype=np.uint8)
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, images.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, images.std(axis=(0, 2, 3)), rtol=1e-12)
