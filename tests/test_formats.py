"""On-disk formats (torchvision's, WikiText-2, Cityscapes): tiny real files read back exactly,
one-line errors, and the same errors from the registry's check before a sweep starts."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets
from fixtures_formats import (
    WRITERS,
    cityscapes_name,
    pattern_images,
    pattern_labels,
    save_png,
    write_cifar10,
    write_cityscapes,
    write_idx,
    write_mnist,
    write_svhn,
    write_wikitext2,
)

from lbs_tune.cityscapes import LABEL_TO_TRAIN_ID, read_cityscapes
from lbs_tune.config import DataConfig
from lbs_tune.datasets import DATASETS
from lbs_tune.errors import UserError
from lbs_tune.formats import DATASET_NAMES, read_torchvision
from lbs_tune.wikitext import read_wikitext2

FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
    "svhn": "",
}
SHAPES = {
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "svhn": (3, 32, 32),
}
CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10, "svhn": 10}


def _one_line_error(name: str, root: Path, *needles: str) -> str:
    """Read `name` from `root`, expect a one-line UserError containing every needle, return it."""
    with pytest.raises(UserError) as info:
        read_torchvision(name, root, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: ")
    for needle in needles:
        assert needle in message
    return message


def test_names_match_writers() -> None:
    assert set(DATASET_NAMES) == set(WRITERS) == set(FOLDERS)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_reads_back_exactly(name: str, tmp_path: Path) -> None:
    expected = WRITERS[name](tmp_path, n_train=20, n_test=10)
    data = read_torchvision(name, tmp_path, download=False)
    shape = SHAPES[name]
    assert data.num_classes == CLASSES[name]
    for split, n in (("train", 20), ("test", 10)):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        assert x.shape == (n, *shape) and x.dtype == np.uint8 and x.flags.c_contiguous
        assert y.shape == (n,) and y.dtype == np.int64
        np.testing.assert_array_equal(x, getattr(expected, f"{split}_x"))
        np.testing.assert_array_equal(y, getattr(expected, f"{split}_y"))
    # Pixel [i, c, h, w] of pattern_images is (37 i + 101 c + 7 h + 3 w) mod 256; test images
    # continue the numbering after the 20 train images.
    c = shape[0] - 1
    assert data.train_x[3, c, 5, 9] == (37 * 3 + 101 * c + 7 * 5 + 3 * 9) % 256
    assert data.train_x[19, 0, 27, 1] == (37 * 19 + 7 * 27 + 3 * 1) % 256
    assert data.test_x[0, c, 2, 20] == (37 * 20 + 101 * c + 7 * 2 + 3 * 20) % 256
    assert data.train_y[:4].tolist() == [0, 7, 14 % CLASSES[name], 21 % CLASSES[name]]


def test_cifar_rows_are_r_then_g_then_b_planes(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    data = read_torchvision("cifar10", tmp_path, download=False)
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][2]
    for channel in range(3):
        plane = row[1024 * channel : 1024 * (channel + 1)].reshape(32, 32)
        np.testing.assert_array_equal(data.train_x[2, channel], plane)
    assert data.train_x[2, 1, 4, 6] == row[1024 + 32 * 4 + 6]


def test_cifar_fixture_is_a_python2_pickle(tmp_path: Path) -> None:
    # Like the real files: Python 2 byte-string keys and array bytes that only latin1 decodes.
    write_cifar10(tmp_path)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct" in raw
    assert set(pickle.loads(raw, encoding="bytes")) >= {b"data", b"labels"}
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)


def test_cifar10_batches_concatenate_in_order(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=7, n_test=3)
    data = read_torchvision("cifar10", tmp_path, download=False)
    np.testing.assert_array_equal(data.train_x, pattern_images(0, 7, (3, 32, 32)))


def test_mnist_idx_layout(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    data = read_torchvision("mnist", tmp_path, download=False)
    raw = (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    assert raw[:16] == bytes.fromhex("00000803 00000014 0000001c 0000001c")
    assert data.train_x[4, 0, 10, 3] == raw[16 + 4 * 784 + 10 * 28 + 3]
    labels = (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    assert labels[:8] == bytes.fromhex("00000801 0000000a")
    assert data.test_y.tolist() == list(labels[8:])


def test_svhn_layout_and_ten_means_zero(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    data = read_torchvision("svhn", tmp_path, download=False)
    mat = scipy.io.loadmat(tmp_path / "train_32x32.mat")
    assert mat["X"].shape == (32, 32, 3, 20) and mat["y"].shape == (20, 1)
    assert data.train_x[6, 2, 1, 30] == mat["X"][1, 30, 2, 6]
    assert mat["y"][0, 0] == 10 and data.train_y[0] == 0
    assert 0 not in mat["y"]


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_missing_folder_names_path_and_fix(name: str, tmp_path: Path) -> None:
    folder = tmp_path / FOLDERS[name]
    _one_line_error(name, tmp_path, f"{folder}:", "data.dir or LBS_DATA_DIR", "data.download")


def test_missing_one_file_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    message = _one_line_error("cifar10", tmp_path, "data_batch_4")
    assert "data_batch_3" not in message


def test_gzipped_mnist_says_gunzip(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    images.rename(raw / "train-images-idx3-ubyte.gz")
    _one_line_error("mnist", tmp_path, "train-images-idx3-ubyte (only its .gz is there: gunzip")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("name", "file", "damage"),
    [
        ("cifar10", "cifar-10-batches-py/data_batch_3", _truncate),
        ("cifar10", "cifar-10-batches-py/batches.meta", lambda p: p.write_bytes(b"junk")),
        ("cifar100", "cifar-100-python/test", _truncate),
        ("mnist", "MNIST/raw/train-images-idx3-ubyte", _truncate),
        ("mnist", "MNIST/raw/t10k-labels-idx1-ubyte", lambda p: p.write_bytes(b"\0\0\x08\x03")),
        ("fashion_mnist", "FashionMNIST/raw/t10k-images-idx3-ubyte", lambda p: p.write_bytes(b"")),
        ("svhn", "test_32x32.mat", lambda p: p.write_bytes(b"not a MATLAB file" * 20)),
        ("svhn", "train_32x32.mat", _truncate),
    ],
)
def test_corrupted_file_is_named(name: str, file: str, damage, tmp_path: Path) -> None:
    WRITERS[name](tmp_path)
    path = tmp_path / file
    damage(path)
    _one_line_error(name, tmp_path, f"{path} is corrupted", "delete it")
    assert path.exists()


def test_label_count_mismatch_is_corrupt(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "train-labels-idx1-ubyte"
    write_idx(labels, pattern_labels(0, 19, 10).astype(np.uint8))
    _one_line_error("mnist", tmp_path, f"{labels} is corrupted", "19 labels for 20 images")


def test_cifar_batch_without_labels_is_corrupt(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with path.open("wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)
    _one_line_error("cifar10", tmp_path, f"{path} is corrupted", "labels")


def test_labels_out_of_range_are_corrupt(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    path = tmp_path / "test_32x32.mat"
    mat = scipy.io.loadmat(path)
    mat["y"][3] = 11
    scipy.io.savemat(path, {"X": mat["X"], "y": mat["y"]})
    _one_line_error("svhn", tmp_path, f"{path} is corrupted", "0..9")


def test_unknown_name_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="imagenet"):
        read_torchvision("imagenet", tmp_path, download=False)


def test_download_skipped_when_files_are_there(tmp_path: Path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded although the files were there")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    write_cifar10(tmp_path)
    assert read_torchvision("cifar10", tmp_path, download=True).train_x.shape[0] == 20


def test_download_uses_torchvision_then_reads(tmp_path: Path, monkeypatch) -> None:
    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            write_mnist(Path(root))

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    data = read_torchvision("mnist", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert data.train_x.shape == (20, 1, 28, 28)


def test_svhn_downloads_only_the_missing_split(tmp_path: Path, monkeypatch) -> None:
    splits = []

    class FakeSVHN:
        def __init__(self, root: str, split: str, download: bool) -> None:
            splits.append(split)
            write_svhn(Path(root))

    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    read_torchvision("svhn", tmp_path, download=True)
    assert splits == ["test"]


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(UserError, match=r"^cifar100: downloading CIFAR-100 into .* failed"):
        read_torchvision("cifar100", tmp_path, download=True)


# ---------------------------------------------------------------------------- WikiText-2


def _one_line(reader, *needles: str) -> str:
    """Call `reader`, expect a one-line UserError containing every needle, return it."""
    with pytest.raises(UserError) as info:
        reader()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_wikitext2_ids_as_pytorch_example_numbers_them(tmp_path: Path) -> None:
    write_wikitext2(tmp_path)
    data = read_wikitext2(tmp_path)
    # Words numbered in order of first appearance in train, <eos> closing every line: the
    # first line is blank (" "), so <eos> is 0; "<unk>" is a word of the file like any other.
    assert data.vocab == (
        "<eos>", "=", "Valkyria", "Chronicles", "The", "game", "'s", "<unk>", "@-@",
        "system", "is", "new", ".",
    )  # fmt: skip
    assert data.vocab_size == 13
    assert data.train.dtype == data.valid.dtype == data.test.dtype == np.int64
    assert data.train.tolist() == [
        0,
        1, 2, 3, 1, 0,
        0,
        4, 5, 6, 7, 8, 9, 10, 11, 12, 0,
        4, 5, 10, 11, 12, 0,
    ]  # fmt: skip
    # "old" is not in the training vocabulary: <unk> (7).
    assert data.valid.tolist() == [0, 1, 3, 1, 0, 4, 9, 10, 7, 12, 0]
    assert data.test.tolist() == [4, 7, 5, 0]


def test_wikitext2_without_unk_in_train_appends_it(tmp_path: Path) -> None:
    write_wikitext2(tmp_path, train=(" a b ",), valid=(" b c ",), test=(" a ",))
    data = read_wikitext2(tmp_path)
    assert data.vocab == ("a", "b", "<eos>", "<unk>")
    assert data.valid.tolist() == [1, 3, 2]


def test_wikitext2_keeps_non_ascii_words(tmp_path: Path) -> None:
    write_wikitext2(tmp_path, train=(" Senjō no Valkyria ", " Senjō "))
    data = read_wikitext2(tmp_path)
    assert data.vocab[0] == "Senjō" and data.train.tolist() == [0, 1, 2, 3, 0, 3]


@pytest.mark.parametrize("file", ["wiki.train.tokens", "wiki.test.tokens"])
def test_wikitext2_missing_file_is_named_with_its_source(file: str, tmp_path: Path) -> None:
    folder = write_wikitext2(tmp_path)
    (folder / file).unlink()
    message = _one_line(
        lambda: read_wikitext2(tmp_path),
        f"wikitext2: WikiText-2 files missing from {folder}: {file};",
        "wikitext-2-v1.zip",
        "data.dir or LBS_DATA_DIR",
    )
    assert "wiki.valid.tokens" not in message
    _one_line(lambda: files_before_start("wikitext2", tmp_path), file)


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"caf\xe9 au lait\n", "UnicodeDecodeError"), (b" \n \n", "it holds no words")],
)
def test_wikitext2_corrupt_file_is_named(content: bytes, why: str, tmp_path: Path) -> None:
    folder = write_wikitext2(tmp_path)
    path = folder / "wiki.valid.tokens"
    path.write_bytes(content)
    _one_line(lambda: read_wikitext2(tmp_path), f"wikitext2: {path} is corrupted ({why}", "delete")


# ---------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_table_is_cityscapesscripts(tmp_path: Path) -> None:
    # torchvision keeps its own copy of cityscapesscripts' table; every id not in it is ignored.
    table = {c.id: c.train_id for c in torchvision.datasets.Cityscapes.classes if c.id >= 0}
    assert sorted(table) == list(range(34))
    for label_id in range(256):
        assert LABEL_TO_TRAIN_ID[label_id] == table.get(label_id, 255), label_id
    assert sorted(set(table.values()) - {255}) == list(range(19))


def test_cityscapes_reads_back_exactly_at_its_size(tmp_path: Path) -> None:
    images, labels = write_cityscapes(tmp_path, n_train=3, n_val=2, shape=(8, 12))
    data = read_cityscapes(tmp_path, (8, 12))
    assert data.num_classes == 19
    for split, x, y in (("train", data.train_x, data.train_y), ("val", data.test_x, data.test_y)):
        assert x.dtype == y.dtype == np.uint8
        assert x.shape == (len(images[split]), 3, 8, 12) and y.shape == (len(x), 8, 12)
        np.testing.assert_array_equal(x, images[split])
        np.testing.assert_array_equal(y, LABEL_TO_TRAIN_ID[labels[split]])
    # Sorted by path: aachen's images (0, 2) before bochum's (1).
    assert [cityscapes_name("train", i)[0] for i in (0, 2, 1)] == ["aachen", "aachen", "bochum"]
    assert data.train_x[1, 2, 3, 4] == (37 * 2 + 101 * 2 + 7 * 3 + 3 * 4) % 256
    assert labels["train"][0, 2, 5] == 11 and data.train_y[0, 2, 5] == 2  # building
    assert labels["train"][0, 0, 7] == 7 and data.train_y[0, 0, 7] == 0  # road
    assert labels["train"][0, 0, 0] == 0 and data.train_y[0, 0, 0] == 255  # unlabeled
    assert set(np.unique(data.train_y)) == set(range(19)) | {255}


def test_cityscapes_resizes_images_smoothly_and_masks_by_nearest(tmp_path: Path) -> None:
    _, labels = write_cityscapes(tmp_path, n_train=1, n_val=1, shape=(8, 12))
    # Stripes of 0 and 200 one column wide: shrinking by 2 blends each pair of columns to 100
    # where a nearest pick would give 0 or 200. Channels scaled by 1, 1/2, 1/4.
    stripes = 200 * (np.arange(12) % 2)
    image = np.stack([np.broadcast_to(stripes // k, (8, 12)) for k in (1, 2, 4)]).astype(np.uint8)
    save_png(
        tmp_path / "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", image
    )
    data = read_cityscapes(tmp_path, (4, 6))
    assert data.train_x.shape == (1, 3, 4, 6) and data.train_y.shape == (1, 4, 6)
    # Away from the border (where the filter is cut off) every pixel is the stripes' mean.
    inner = data.train_x[0, :, :, 1:-1].astype(int)
    np.testing.assert_allclose(
        inner, np.broadcast_to([[[100]], [[50]], [[25]]], inner.shape), atol=1
    )
    # Halving by nearest (pixel centres) takes the pixel at (2i + 1, 2j + 1): ids are
    # picked, never averaged into another class.
    np.testing.assert_array_equal(
        data.train_y[0], LABEL_TO_TRAIN_ID[labels["train"][0, 1::2, 1::2]]
    )
    np.testing.assert_array_equal(data.test_y[0], LABEL_TO_TRAIN_ID[labels["val"][0, 1::2, 1::2]])


def test_cityscapes_missing_folder_and_missing_label_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "cityscapes"
    _one_line(
        lambda: read_cityscapes(tmp_path, (8, 12)),
        f"cityscapes: no <city>/*_leftImg8bit.png images in {folder}/leftImg8bit/train;",
        "gtFine_trainvaltest.zip",
        "cityscapes-dataset.com",
        "data.dir or LBS_DATA_DIR",
    )
    write_cityscapes(tmp_path, n_train=3, n_val=2)
    label = folder / "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png"
    label.unlink()
    message = _one_line(
        lambda: read_cityscapes(tmp_path, (8, 12)), f"cityscapes: label file {label} missing;"
    )
    assert "more" not in message
    _one_line(lambda: files_before_start("cityscapes", tmp_path), str(label))


def _truncate_png(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("file", "damage", "why"),
    [
        (
            "leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png",
            _truncate_png,
            "not a PNG Pillow can decode",
        ),
        (
            "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png",
            lambda p: p.write_bytes(b"not a PNG at all"),
            "not a PNG Pillow can decode",
        ),
        (
            "gtFine/train/aachen/aachen_000002_000019_gtFine_labelIds.png",
            lambda p: save_png(p, np.zeros((3, 8, 12), np.uint8)),
            "mode RGB, expected L: one 8-bit channel of label ids",
        ),
        (
            "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
            lambda p: save_png(p, np.zeros((4, 12), np.uint8)),
            "labels 4x12 for an image of 8x12",
        ),
    ],
)
def test_cityscapes_corrupt_file_is_named(file: str, damage, why: str, tmp_path: Path) -> None:
    write_cityscapes(tmp_path, n_train=3, n_val=2)
    path = tmp_path / "cityscapes" / file
    damage(path)
    message = _one_line(
        lambda: read_cityscapes(tmp_path, (8, 12)),
        f"cityscapes: {path} is corrupted ({why}",
        "delete it and unzip it again from leftImg8bit_trainvaltest.zip",
    )
    assert ".cpp" not in message


def files_before_start(name: str, root: Path, download: bool = False) -> None:
    """The registry's check of dataset `name`'s files under `root`, as a sweep runs it."""
    DATASETS[name].files(DataConfig(dir=str(root), download=download))


def test_local_datasets_are_checked_even_with_download_on(tmp_path: Path) -> None:
    # WikiText-2 and Cityscapes are never downloaded: their files must be there.
    for name in ("wikitext2", "cityscapes"):
        with pytest.raises(UserError, match=f"^{name}: "):
            files_before_start(name, tmp_path, download=True)
    # A torchvision dataset to download may be missing: the trial downloads it.
    for name in DATASET_NAMES:
        files_before_start(name, tmp_path, download=True)
        with pytest.raises(UserError, match="files missing"):
            files_before_start(name, tmp_path)
