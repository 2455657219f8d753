"""The model zoo: parameter counts against the papers and reference code, shapes, names, tasks,
two training steps of every new family, ghost batch norm, and the segmentation scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.models
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

from lbs_tune.models import (
    MODEL_NAMES,
    TASKS,
    GhostBatchNorm,
    build_model,
    check_model_fits,
    detach_hidden,
    model_options,
    model_task,
    models_that_fit,
    use_ghost_batch_norm,
    validate_model_name,
)
from lbs_tune.models.drn import drn_d_backbone
from lbs_tune.segmentation import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

CIFAR, MNIST, MNIST1D = (3, 32, 32), (1, 28, 28), (40,)
SEGMENTATION, TOKENS = (3, 64, 64), (8,)  # DRN images; windows of bptt = 8 token ids
FLAT_MODELS = ("mlp", "cnn1d")
CLASSIFIERS = [name for name in MODEL_NAMES if model_task(name) == "classification"]
# Every classifier but cnn1d takes images; WRN-28-10 is only counted (a forward pass is slow on a
# CPU); alexnet needs at least 29x29 pixels, so it takes CIFAR's images but not MNIST's.
IMAGE_MODELS = [name for name in CLASSIFIERS if name not in ("cnn1d", "wrn28_10")]
IMAGE_CASES = [
    (name, shape)
    for name in IMAGE_MODELS
    for shape in (CIFAR, MNIST)
    if (name, shape) != ("alexnet", MNIST)
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batches of 2 gain nothing from threads, and OpenMP spin-waits stall on a busy 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_parameters(name: str, input_shape: tuple[int, ...], num_classes: int = 10) -> int:
    # The meta device allocates and initialises nothing: WRN-28-10 is counted in milliseconds.
    with torch.device("meta"):
        return count(build_model(name, num_classes, input_shape))


@pytest.mark.parametrize(
    ("name", "input_shape", "expected"),
    [
        # stem: conv 3*16*9 = 432 + BN 2*16 = 32                                    ->     464
        # stage 1: 3 blocks * (2 convs 16*16*9 = 2304 + 2 BN 32)  = 3 * 4672        ->  14,016
        # stage 2: 16*32*9 + 32*32*9 + 2*64 = 13,952; 2 * (2*9216 + 128) = 37,120   ->  51,072
        # stage 3: 32*64*9 + 64*64*9 + 2*128 = 55,552; 2 * (2*36,864 + 256) = 147,968 -> 203,520
        # fc: 64*10 + 10                                                            ->     650
        # option-A shortcuts have no parameters; total 269,722 (the paper's 0.27M).
        ("resnet20", CIFAR, 269_722),
        # Zagoruyko & Komodakis (2016), table 1: 36.5M.
        ("wrn28_10", CIFAR, 36_479_194),
        # The CIFAR ResNet-18: 11.17M, with 1x1 conv + BN projection shortcuts.
        ("resnet18", CIFAR, 11_173_962),
        # 40*256 + 256 = 10,496; 256*256 + 256 = 65,792; 256*10 + 10 = 2,570 -> 78,858.
        ("mlp", MNIST1D, 78_858),
        # 1*25*5 + 25 = 150; 2 * (25*25*3 + 25) = 3,800; length 40 -> 19 -> 10 -> 5, so the
        # linear layer is 25*5*10 + 10 = 1,260 -> 5,210.
        ("cnn1d", MNIST1D, 5_210),
        # conv 1*6*25 + 6 = 156; conv 6*16*25 + 16 = 2,416; fc 400*120 + 120 = 48,120;
        # fc 120*84 + 84 = 10,164; fc 84*10 + 10 = 850 -> 61,706 (LeNet-5 on padded MNIST).
        ("lenet", MNIST, 61_706),
        # Three input channels add 2*6*25 = 300 to the first conv; CIFAR also reaches 16x5x5.
        ("lenet", CIFAR, 62_006),
        # torchvision's ResNet-34, 21,797,672, less its 7x7 stem 3*64*49 = 9,408 and 1000-way fc
        # 512*1000 + 1000 = 513,000, plus the 3x3 stem 1,728 and a 10-way fc 5,130: 21.28M,
        # as kuangliu/pytorch-cifar's ResNet34.
        ("resnet34", CIFAR, 21_282_122),
        # torchvision's ResNet-50, 25,557,032 - 9,408 - (2048*1000 + 1000) + 1,728 + 20,490:
        # 23.52M, as kuangliu's ResNet50.
        ("resnet50", CIFAR, 23_520_842),
        # torchvision's DenseNet-121, 7,978,856 - 9,408 - (1024*1000 + 1000) + 1,728 + 10,250;
        # kuangliu's DenseNet121 (6,956,298) has no stem batch norm (2*64 = 128).
        ("densenet121", CIFAR, 6_956_426),
        # torchvision's MobileNetV2, 3,504,872 - (1280*1000 + 1000) + (1280*10 + 10): strides
        # and a 3x3 stem of the same size change no count.
        ("mobilenet_v2", CIFAR, 2_236_682),
        # convs 3*64*121 + 64 = 23,296; 64*192*25 + 192 = 307,392; 192*384*9 + 384 = 663,936;
        # 384*256*9 + 256 = 884,992; 256*256*9 + 256 = 590,080; fc 256*10 + 10 = 2,570
        # -> 2,472,266 (bearpaw/pytorch-classification's CIFAR AlexNet: 2.47M).
        ("alexnet", CIFAR, 2_472_266),
    ],
)
def test_parameter_counts(name, input_shape, expected):
    assert count_parameters(name, input_shape) == expected


@pytest.mark.parametrize(
    ("name", "builder", "stem_change"),
    [
        # 7x7 -> 3x3 stem of 64 channels: 3 * 64 * (9 - 49) = -7,680 parameters.
        ("resnet34", torchvision.models.resnet34, -7_680),
        ("resnet50", torchvision.models.resnet50, -7_680),
        ("densenet121", torchvision.models.densenet121, -7_680),
        # The stem is 3x3 already (stride 2 -> 1); no layer is added or removed.
        ("mobilenet_v2", torchvision.models.mobilenet_v2, 0),
    ],
)
def test_cifar_variants_count_as_torchvision_models_less_the_stem(name, builder, stem_change):
    with torch.device("meta"):
        reference = count(builder(weights=None, num_classes=10))
    assert count_parameters(name, CIFAR) == reference + stem_change


def test_drn_d_22_counts_as_the_reference():
    # Levels 0-2: 3*16*49 + 32 = 2,384; 16*16*9 + 32 = 2,336; 16*32*9 + 64 = 4,672.
    # Residual levels of two basic blocks (in -> out, 1x1 conv + BN shortcut in the first):
    #   32 -> 64: 57,728 + 73,984 = 131,712;   64 -> 128: 230,144 + 295,424 = 525,568;
    #   128 -> 256: 919,040 + 1,180,672 = 2,099,712; 256 -> 512: 3,673,088 + 4,720,640 = 8,393,728.
    # Levels 7-8: 2 * (512*512*9 + 1,024) = 4,720,640.  Backbone: 15,880,752.
    with torch.device("meta"):
        backbone = count(drn_d_backbone(3))
    assert backbone == 15_880_752
    # fyu/drn's ImageNet DRN-D-22 adds a 1x1 conv to 1000 classes: its table's 16.4M.
    assert round((backbone + 512 * 1000 + 1000) / 1e6, 1) == 16.4
    # The segmentation head: a 1x1 conv to 19 Cityscapes classes, 512*19 + 19 = 9,747.
    assert count_parameters("drn_d_22", SEGMENTATION, 19) == 15_880_752 + 9_747


def test_lstm_counts_as_the_example():
    # WikiText-2's 33,278 words, emsize = nhid = 200 (the example's defaults), tied:
    # embedding 33,278*200 = 6,655,600; each LSTM layer 4*200*(200 + 200) + 2*4*200 = 321,600;
    # the decoder adds only its bias, 33,278 -> 7,332,078.
    assert count_parameters("lstm", (35,), 33_278) == 7_332_078
    with torch.device("meta"):
        untied = count(build_model("lstm", 33_278, (35,), tied=False))
    assert untied == 7_332_078 + 33_278 * 200


@pytest.mark.parametrize(
    ("name", "millions"),
    # He et al. (2016), table 6.
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85)],
)
def test_cifar_resnet_sizes_match_the_paper(name, millions):
    assert round(count_parameters(name, CIFAR) / 1e6, 2) == millions


def test_resnet110_size_matches_the_paper():
    assert round(count_parameters("resnet110", CIFAR) / 1e6, 1) == 1.7


def test_every_listed_name_builds():
    shapes = {"classification": CIFAR, "segmentation": SEGMENTATION, "language_model": TOKENS}
    shapes["nqm"] = (100,)  # the noisy quadratic: theta of d = 100
    for name in MODEL_NAMES:
        shape = MNIST1D if name in FLAT_MODELS else shapes[model_task(name)]
        assert count_parameters(name, shape) > 0


def run(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, *input_shape))


@pytest.mark.parametrize(("name", "input_shape"), IMAGE_CASES)
def test_image_models_output_shape(name, input_shape):
    model = build_model(name, 7, input_shape)
    assert run(model, input_shape).shape == (2, 7)


@pytest.mark.parametrize("name", FLAT_MODELS)
@pytest.mark.parametrize("input_shape", [MNIST1D, (2, 40), (60,)])
def test_flat_models_output_shape(name, input_shape):
    assert run(build_model(name, 10, input_shape), input_shape).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [("resnet20", MNIST1D), ("cnn1d", CIFAR), ("drn_d_22", TOKENS), ("lstm", CIFAR)],
)
def test_wrong_kind_of_input_shape_is_a_value_error(name, input_shape):
    with pytest.raises(ValueError, match="input shape"):
        build_model(name, 10, input_shape)


def test_alexnet_needs_29_pixels():
    with pytest.raises(ValueError, match=r"alexnet needs images of at least 29x29, got \(1, 28"):
        build_model("alexnet", 10, MNIST)
    # A 64x64 image reaches 2x2 features: the linear layer takes 256*2*2.
    model = build_model("alexnet", 10, (3, 64, 64))
    assert model.classifier.in_features == 1024
    assert run(model, (3, 64, 64)).shape == (2, 10)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError) as raised:
        validate_model_name("resnt20")
    assert str(raised.value) == "unknown model 'resnt20' (did you mean 'resnet20'?)"
    with pytest.raises(
        ValueError, match=r"^unknown model 'resnet21' \(did you mean 'resnet\d+'\?\)$"
    ):
        build_model("resnet21", 10, CIFAR)


def test_unknown_name_far_from_all_lists_them():
    with pytest.raises(ValueError, match="; known: alexnet, cnn1d, densenet121, drn_d_22, lenet"):
        validate_model_name("mamba")


def test_any_valid_wide_resnet_name():
    validate_model_name("wrn22_2")
    model = build_model("wrn10_1", 10, (3, 8, 8))
    assert run(model, (3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"unknown model 'wrn27_10': .*6n \+ 4"):
        validate_model_name("wrn27_10")


def test_model_names_validate():
    for name in MODEL_NAMES:
        validate_model_name(name)


# Tasks: which datasets a model serves.


def test_each_model_serves_one_task():
    assert model_task("drn_d_22") == "segmentation"
    assert model_task("lstm") == "language_model"
    assert {model_task(name) for name in CLASSIFIERS} == {"classification"}
    assert {model_task(name) for name in MODEL_NAMES} == set(TASKS)
    assert model_task("wrn22_2") == "classification"


@pytest.mark.parametrize(
    ("name", "task", "input_shape", "served", "needed"),
    [
        ("drn_d_22", "classification", CIFAR, "a segmentation model", "a classifier"),
        ("lstm", "classification", MNIST1D, "a language model", "a classifier"),
        ("resnet20", "segmentation", SEGMENTATION, "a classifier", "a segmentation model"),
        ("mlp", "language_model", TOKENS, "a classifier", "a language model"),
        ("drn_d_22", "language_model", TOKENS, "a segmentation model", "a language model"),
    ],
)
def test_a_model_is_refused_for_another_task(name, task, input_shape, served, needed):
    # Each of these would build for the shape: the task alone refuses it.
    with pytest.raises(ValueError, match=f"^{name} is {served}; the dataset needs {needed}$"):
        check_model_fits(name, 10, input_shape, task)


def test_models_that_fit_are_of_the_task():
    assert models_that_fit(19, SEGMENTATION, "segmentation") == ["drn_d_22"]
    assert models_that_fit(50, TOKENS, "language_model") == ["lstm"]
    assert models_that_fit(10, CIFAR) == ["mlp", "lenet", "resnet20", "wrn16_4"]
    check_model_fits("drn_d_22", 19, SEGMENTATION, "segmentation")
    check_model_fits("lstm", 50, TOKENS, "language_model", emsize=16, nhid=16)


def test_options_are_the_builders_keywords():
    assert model_options("lstm") == {
        "emsize": 200, "nhid": 200, "nlayers": 2, "dropout": 0.2, "tied": True
    }  # fmt: skip
    assert model_options("resnet50") == model_options("wrn22_2") == {}
    with pytest.raises(
        ValueError, match=r"^model resnet20 has no option nhid \(its options: none\)"
    ):
        build_model("resnet20", 10, CIFAR, nhid=3)
    with pytest.raises(
        ValueError, match=r"^model lstm has no option nhidden \(its options: emsize,"
    ):
        build_model("lstm", 10, TOKENS, nhidden=3)
    with pytest.raises(
        ValueError, match="tied weights need emsize == nhid, got emsize 200, nhid 3"
    ):
        check_model_fits("lstm", 10, TOKENS, "language_model", nhid=3)


# The new families: shapes, structure, and two SGD steps on synthetic data of their input kind.


def sgd_steps(model: nn.Module, batches, loss_of) -> list[float]:
    """Forward, backward and an SGD step for each batch; the losses. Checks every parameter
    got a finite gradient and changed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = loss_of(model, *batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for parameter, old in zip(model.parameters(), before, strict=True):
        assert parameter.grad is not None and parameter.grad.isfinite().all()
        assert not torch.equal(parameter.detach(), old)
    assert all(math.isfinite(loss) for loss in losses)
    return losses


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "densenet121", "mobilenet_v2", "alexnet"])
def test_classifiers_train_two_steps(name):
    torch.manual_seed(0)
    model = build_model(name, 10, CIFAR)
    batches = [(torch.randn(2, *CIFAR), torch.randint(0, 10, (2,))) for _ in range(2)]
    sgd_steps(model, batches, lambda m, x, y: F.cross_entropy(m(x), y))


def test_cifar_stems_keep_the_resolution():
    # No strided stem, no max-pool: 32x32 reaches the last stage at 4x4 in all four.
    x = torch.randn(1, *CIFAR)
    with torch.no_grad():
        for name in ("resnet34", "resnet50"):
            model = build_model(name, 10, CIFAR).eval()
            stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            features = model.layer4(model.layer3(model.layer2(model.layer1(stem))))
            assert features.shape[-2:] == (4, 4), name
        for name in ("densenet121", "mobilenet_v2"):
            model = build_model(name, 10, CIFAR).eval()
            assert model.features(x).shape[-2:] == (4, 4), name


def test_drn_d_22_segments_any_size_at_output_stride_8():
    torch.manual_seed(0)
    model = build_model("drn_d_22", 19, SEGMENTATION).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *SEGMENTATION)).shape == (2, 19, 64, 64)
        assert model.base(torch.randn(1, 3, 64, 64)).shape == (1, 512, 8, 8)
        # Sizes that are not multiples of 8: features round up, logits match the input.
        assert model(torch.randn(1, 3, 20, 28)).shape == (1, 19, 20, 28)


def test_drn_d_22_levels_are_the_d_variant():
    with torch.device("meta"):
        base = build_model("drn_d_22", 19, SEGMENTATION).base
    dilations = {
        name: sorted({m.dilation[0] for m in level.modules() if isinstance(m, nn.Conv2d)})
        for name, level in base.named_children()
    }
    assert dilations == {f"layer{i}": [1] for i in (0, 1, 2, 3, 4, 8)} | {
        "layer5": [1, 2],  # the 1x1 shortcut conv has no dilation
        "layer6": [1, 4],
        "layer7": [2],
    }
    strides = [
        max(m.stride[0] for m in level.modules() if isinstance(m, nn.Conv2d))
        for level in base.children()
    ]
    assert strides == [1, 1, 2, 2, 2, 1, 1, 1, 1]
    # Levels 7 and 8 are plain conv-BN-ReLU: no residual connection to remove the gridding.
    assert [type(m) for m in base.layer7] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert not any(isinstance(m, nn.MaxPool2d) for m in base.modules())


def reference_upsampling(classes: int) -> nn.ConvTranspose2d:
    """fyu/drn segment.py's head upsampling: a fixed depthwise bilinear transposed conv."""
    up = nn.ConvTranspose2d(classes, classes, 16, stride=8, padding=4, groups=classes, bias=False)
    f = math.ceil(up.weight.shape[2] / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    with torch.no_grad():
        for i in range(16):
            for j in range(16):
                up.weight[:, 0, i, j] = (1 - abs(i / f - c)) * (1 - abs(j / f - c))
    return up


def test_drn_upsampling_is_the_reference_bilinear_kernel_away_from_the_border():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 6, 7)
    with torch.no_grad():
        reference = reference_upsampling(19)(logits)
    ours = F.interpolate(logits, scale_factor=8, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape == (2, 19, 48, 56)
    # The transposed conv sees zeros past the border, interpolation clamps: they differ only
    # within 8 pixels of it.
    torch.testing.assert_close(ours[..., 8:-8, 8:-8], reference[..., 8:-8, 8:-8])


def test_drn_d_22_trains_two_steps_ignoring_255():
    torch.manual_seed(0)
    model = build_model("drn_d_22", 19, SEGMENTATION)

    def batch():
        masks = torch.randint(0, 19, (2, 64, 64), dtype=torch.uint8)
        masks[:, :10] = 255  # ignored rows, as Cityscapes' unlabeled pixels
        return torch.randn(2, *SEGMENTATION), masks

    def loss_of(m, x, masks):
        return F.cross_entropy(m(x), masks.long(), ignore_index=255)

    sgd_steps(model, [batch(), batch()], loss_of)


def test_lstm_logits_and_hidden_state():
    torch.manual_seed(0)
    model = build_model("lstm", 50, TOKENS, emsize=16, nhid=16, nlayers=2, dropout=0.0).eval()
    assert model.decoder.weight is model.encoder.weight
    tokens = torch.randint(0, 50, (3, 8))
    hidden = model.init_hidden(3)
    assert [h.shape for h in hidden] == [(2, 3, 16), (2, 3, 16)]
    assert not any(h.any() for h in hidden)
    with torch.no_grad():
        logits, new_hidden = model(tokens, hidden)
        assert logits.shape == (3, 8, 50)
        # A missing state is the zero state; carrying the state equals one longer window.
        torch.testing.assert_close(model(tokens)[0], logits)
        first, carried = model(tokens[:, :5])
        second, last = model(tokens[:, 5:], carried)
        torch.testing.assert_close(torch.cat([first, second], 1), logits)
        torch.testing.assert_close(last, new_hidden)


def test_lstm_trains_two_truncated_bptt_steps():
    torch.manual_seed(0)
    model = build_model("lstm", 50, TOKENS, emsize=16, nhid=16)
    stream = torch.randint(0, 50, (2, 2 * 8 + 1))  # two sequences, two windows of bptt 8
    hidden = model.init_hidden(2)

    def loss_of(m, x, y):
        nonlocal hidden
        # Without the detach the second backward would run into the first step's freed graph.
        hidden = detach_hidden(hidden)
        logits, hidden = m(x, hidden)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    windows = [(stream[:, i : i + 8], stream[:, i + 1 : i + 9]) for i in (0, 8)]
    losses = sgd_steps(model, windows, loss_of)
    # An untrained model predicts about uniformly: the loss starts near log(50).
    assert abs(losses[0] - math.log(50)) < 0.1
    assert not any(h.requires_grad for h in detach_hidden(hidden))


# Segmentation scores, worked by hand.


def test_confusion_and_scores_by_hand():
    # Pixels (target, prediction): (0, 0), (0, 1), (1, 1), (1, 1), (2, 0); the ignored pixel
    # (255) predicted as 2 counts nowhere, and class 3 is in neither.
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]], dtype=torch.uint8)
    prediction = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    confusion = confusion_matrix(prediction, target, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # IoU_k = TP / (row + column - TP): 1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 0 / (1 + 0 - 0), 0 / 0.
    iou = iou_per_class(confusion)
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert iou[3].isnan()
    # Class 3 is left out of the mean: (1/3 + 2/3 + 0) / 3; 3 of 5 scored pixels are right.
    assert mean_iou(confusion) == pytest.approx(1 / 3)
    assert pixel_accuracy(confusion) == pytest.approx(3 / 5)


def test_a_class_only_predicted_counts_with_iou_zero():
    target = torch.tensor([[0, 0, 0, 1]])
    prediction = torch.tensor([[0, 0, 3, 1]])
    # IoU: class 0 2 / 3, class 1 1 / 1, class 3 0 / 1 (predicted, never true); class 2 absent.
    assert mean_iou(confusion_matrix(prediction, target, 4)) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_scores_pool_pixels_over_images_not_images():
    # Image A: 3 road pixels right. Image B: 1 car pixel called road. Pooled, road's IoU is
    # 3 / 4 and car's 0 / 1: mIoU 3 / 8, where averaging per-image mIoUs would give (1 + 0) / 2.
    target = torch.tensor([[0, 0, 0], [1, 255, 255]])
    prediction = torch.tensor([[0, 0, 0], [0, 1, 1]])
    pooled = confusion_matrix(prediction[:1], target[:1], 19) + confusion_matrix(
        prediction[1:], target[1:], 19
    )
    assert torch.equal(pooled, confusion_matrix(prediction, target, 19))
    assert mean_iou(pooled) == pytest.approx(3 / 8)
    assert pixel_accuracy(pooled) == pytest.approx(3 / 4)


def test_scores_of_nothing_scored_are_nan():
    confusion = confusion_matrix(torch.zeros(2, 2, dtype=torch.int64), torch.full((2, 2), 255), 19)
    assert confusion.sum() == 0
    assert math.isnan(mean_iou(confusion)) and math.isnan(pixel_accuracy(confusion))


# Ghost batch norm.


def output_and_grad(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layer(x) and the gradient with respect to x of a fixed weighted sum of it."""
    x = x.detach().requires_grad_()
    out = layer(x)
    out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad


def chunk_by_chunk(bn: _BatchNorm, ghost: int):
    """A layer that feeds the chunks of its input through `bn` one after the other."""
    return lambda x: torch.cat([bn(chunk) for chunk in x.split(ghost)])


@pytest.mark.parametrize(("batch", "ghost"), [(12, 4), (10, 4), (3, 4), (4, 4), (8, 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batch_norm_equals_chunked_batch_norm(batch, ghost, momentum):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5, momentum=momentum)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    ghost_bn = use_ghost_batch_norm(nn.BatchNorm2d(5, momentum=momentum), ghost)
    ghost_bn.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 5, 3, 2) * 3 + 1
    for _ in range(2):
        expected, expected_grad = output_and_grad(chunk_by_chunk(plain, ghost), x)
        got, got_grad = output_and_grad(ghost_bn, x)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got_grad, expected_grad)
    torch.testing.assert_close(ghost_bn.weight.grad, plain.weight.grad)
    torch.testing.assert_close(ghost_bn.bias.grad, plain.bias.grad)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ghost_bn.state_dict()[key], value, msg=key)


@pytest.mark.parametrize(("batch", "ghost"), [(12, 4), (10, 4)])
def test_ghost_batch_norm_on_features_without_spatial_dims(batch, ghost):
    torch.manual_seed(0)
    plain = nn.BatchNorm1d(6)
    ghost_bn = use_ghost_batch_norm(nn.BatchNorm1d(6), ghost)
    x = torch.randn(batch, 6)
    torch.testing.assert_close(ghost_bn(x), chunk_by_chunk(plain, ghost)(x))
    torch.testing.assert_close(ghost_bn.running_var, plain.running_var)


def test_ghost_batch_norm_eval_uses_running_stats():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    plain.running_mean.normal_()
    plain.running_var.uniform_(0.5, 2)
    ghost_bn = use_ghost_batch_norm(nn.BatchNorm2d(4), 2)
    ghost_bn.load_state_dict(plain.state_dict())
    plain.eval()
    ghost_bn.eval()
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(ghost_bn(x), plain(x))
    assert ghost_bn.num_batches_tracked.item() == 0


def test_ghost_batch_norm_keeps_channels_last_and_autocast_dtype():
    torch.manual_seed(0)
    ghost_bn = GhostBatchNorm(8, 4)
    x = torch.randn(8, 8, 5, 5)
    expected = ghost_bn(x)
    out = ghost_bn(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ghost_bn(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=0.05, rtol=0.05)


def test_ghost_batch_norm_running_stats_stay_float32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 5, 5) * 3 + 1
    full, mixed = GhostBatchNorm(8, 4), GhostBatchNorm(8, 4)
    full(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed(x)
    torch.testing.assert_close(mixed.running_mean, full.running_mean)
    torch.testing.assert_close(mixed.running_var, full.running_var)


class ScalarReads(TorchDispatchMode):
    """Counts tensor-to-Python-scalar reads: on a GPU each one is a host-device sync."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batch_norm_reads_no_scalars(momentum):
    ghost_bn = GhostBatchNorm(4, 2, momentum=momentum)
    x = torch.randn(7, 4, 3, 3, requires_grad=True)
    with ScalarReads() as reads:
        ghost_bn(x).sum().backward()
    assert reads.reads == 0


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


@pytest.mark.parametrize(
    "name",
    [
        "resnet20",
        "resnet18",
        "wrn16_4",
        "vgg11",
        "resnet50",
        "densenet121",
        "mobilenet_v2",
        "drn_d_22",
    ],
)
def test_ghost_models_have_the_plain_state_dict_keys(name):
    with torch.device("meta"):
        plain = build_model(name, 10, CIFAR)
        ghost = build_model(name, 10, CIFAR, ghost_batch_size=8)
    assert list(ghost.state_dict()) == list(plain.state_dict())
    assert len(batch_norms(ghost)) == len(batch_norms(plain)) > 0
    assert all(isinstance(module, GhostBatchNorm) for module in batch_norms(ghost))


def test_ghost_resnet_equals_plain_resnet_on_each_chunk():
    torch.manual_seed(0)
    shape, ghost_size = (3, 12, 12), 4
    plain = build_model("resnet20", 10, shape)
    ghost = build_model("resnet20", 10, shape, ghost_batch_size=ghost_size)
    ghost.load_state_dict(plain.state_dict())
    x = torch.randn(3 * ghost_size, *shape)
    with torch.no_grad():
        expected = torch.cat([plain(chunk) for chunk in x.split(ghost_size)])
        torch.testing.assert_close(ghost(x), expected)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, msg=key)
    plain.eval()
    ghost.eval()
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), plain(x))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn16_4", "vgg11", "lenet"])
def test_models_train_in_channels_last_under_autocast_with_ghost_batch_norm(name):
    torch.manual_seed(0)
    shape = (3, 12, 12)
    model = build_model(name, 10, shape, ghost_batch_size=2)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-3, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().logsumexp(1).mean().backward()
    assert logits.shape == (4, 10)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
