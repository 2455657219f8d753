"""The model zoo: parameter counts against the papers, shapes, names and ghost batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

from lbs_tune.models import (
    MODEL_NAMES,
    GhostBatchNorm,
    build_model,
    use_ghost_batch_norm,
    validate_model_name,
)

CIFAR, MNIST, MNIST1D = (3, 32, 32), (1, 28, 28), (40,)
FLAT_MODELS = ("mlp", "cnn1d")
# Every model but cnn1d takes images; WRN-28-10 is only counted (a forward pass is slow on a CPU).
IMAGE_MODELS = [name for name in MODEL_NAMES if name not in ("cnn1d", "wrn28_10")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batches of 2 gain nothing from threads, and OpenMP spin-waits stall on a busy 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_parameters(name: str, input_shape: tuple[int, ...], num_classes: int = 10) -> int:
    # The meta device allocates and initialises nothing: WRN-28-10 is counted in milliseconds.
    with torch.device("meta"):
        model = build_model(name, num_classes, input_shape)
    return sum(parameter.numel() for parameter in model.parameters())


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
    ],
)
def test_parameter_counts(name, input_shape, expected):
    assert count_parameters(name, input_shape) == expected


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
    for name in MODEL_NAMES:
        shape = MNIST1D if name in FLAT_MODELS else CIFAR
        assert count_parameters(name, shape) > 0


def run(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, *input_shape))


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("input_shape", [CIFAR, MNIST])
def test_image_models_output_shape(name, input_shape):
    model = build_model(name, 7, input_shape)
    assert run(model, input_shape).shape == (2, 7)


@pytest.mark.parametrize("name", FLAT_MODELS)
@pytest.mark.parametrize("input_shape", [MNIST1D, (2, 40), (60,)])
def test_flat_models_output_shape(name, input_shape):
    assert run(build_model(name, 10, input_shape), input_shape).shape == (2, 10)


@pytest.mark.parametrize(("name", "input_shape"), [("resnet20", MNIST1D), ("cnn1d", CIFAR)])
def test_wrong_kind_of_input_shape_is_a_value_error(name, input_shape):
    with pytest.raises(ValueError, match="input shape"):
        build_model(name, 10, input_shape)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError) as raised:
        validate_model_name("resnt20")
    assert str(raised.value) == "unknown model 'resnt20' (did you mean 'resnet20'?)"
    with pytest.raises(
        ValueError, match=r"^unknown model 'resnet21' \(did you mean 'resnet\d+'\?\)$"
    ):
        build_model("resnet21", 10, CIFAR)


def test_unknown_name_far_from_all_lists_them():
    with pytest.raises(ValueError, match="; known: cnn1d, lenet, mlp"):
        validate_model_name("transformer")


def test_any_valid_wide_resnet_name():
    validate_model_name("wrn22_2")
    model = build_model("wrn10_1", 10, (3, 8, 8))
    assert run(model, (3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"unknown model 'wrn27_10': .*6n \+ 4"):
        validate_model_name("wrn27_10")


def test_model_names_validate():
    for name in MODEL_NAMES:
        validate_model_name(name)


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


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn16_4", "vgg11"])
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
