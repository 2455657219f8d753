"""Optimizers: weight-decay groups, hand-worked LARS/LAMB steps, checkpoint round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lbs_tune.config import LRConfig, OptimizerConfig
from lbs_tune.optim import LAMB, LARS, build_optimizer, param_groups, set_hyperparameters
from lbs_tune.rules import moved_optimizer, peak_lr

NAMES = ("sgd", "adamw", "lars", "lamb")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _tiny(weight: list[float], bias: float) -> nn.Linear:
    """A 2 -> 1 linear layer with the given weight row and bias."""
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


def _step(
    optimizer: torch.optim.Optimizer, lr: float, grads: dict[nn.Parameter, list | torch.Tensor]
) -> None:
    """Write `lr` into every group, set the gradients by hand and take one step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for param, grad in grads.items():
        param.grad = torch.as_tensor(grad, dtype=param.dtype).reshape(param.shape)
    optimizer.step()


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_norm_and_bias_decay(name, decay_norm_and_bias):
    net = _net()
    config = OptimizerConfig(name=name, weight_decay=0.01, decay_norm_and_bias=decay_norm_and_bias)
    groups = {g["name"]: g for g in build_optimizer(net, config).param_groups}
    matrices = {id(net[0].weight), id(net[3].weight)}
    if decay_norm_and_bias:
        assert list(groups) == ["decay"]
        assert len(groups["decay"]["params"]) == len(list(net.parameters()))
    else:
        assert list(groups) == ["decay", "no_decay"]
        assert {id(p) for p in groups["decay"]["params"]} == matrices
        no_decay = {id(p) for p in groups["no_decay"]["params"]}
        assert no_decay == {id(p) for p in net.parameters()} - matrices
        assert groups["no_decay"]["weight_decay"] == 0.0
        assert groups["no_decay"]["trust_ratio"] is False
    assert groups["decay"]["weight_decay"] == 0.01
    assert groups["decay"]["trust_ratio"] is True
    assert all(g["lr"] == 0.0 for g in groups.values())


def test_groups_leave_out_frozen_and_empty():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2))
    net[1].requires_grad_(False)
    groups = param_groups(net, OptimizerConfig())
    assert [g["name"] for g in groups] == ["decay"]
    assert groups[0]["params"] == [net[0].weight]


@pytest.mark.parametrize(
    ("momentum", "nesterov", "expected"),
    [(0.9, True, True), (0.9, False, False), (0.0, True, False)],
)
def test_sgd_momentum_and_nesterov(momentum, nesterov, expected):
    config = OptimizerConfig(name="sgd", momentum=momentum, nesterov=nesterov)
    optimizer = build_optimizer(_net(), config)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == momentum for g in optimizer.param_groups)
    assert all(g["nesterov"] is expected for g in optimizer.param_groups)


def test_adamw_betas_and_eps():
    config = OptimizerConfig(name="adamw", betas=(0.8, 0.95), eps=1e-6)
    optimizer = build_optimizer(_net(), config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in optimizer.param_groups)


@pytest.mark.parametrize(("name", "eps"), [("lamb", 1e-6), ("adamw", 1e-8)])
def test_default_eps_per_optimizer(name, eps):
    # Needs OptimizerConfig.eps to default to None (config.py, issue 10): today it is 1e-8 for all.
    optimizer = build_optimizer(_net(), OptimizerConfig.model_validate({"name": name}))
    assert all(g["eps"] == eps for g in optimizer.param_groups)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_eps_set_by_the_user_wins(name):
    optimizer = build_optimizer(_net(), OptimizerConfig(name=name, eps=1e-3))
    assert all(g["eps"] == 1e-3 for g in optimizer.param_groups)


# --------------------------------------------------------------------------- SDE rule


def _adam_by_hand(w: float, grads: list[float], lr: float, steps: list) -> float:
    """A scalar weight after Adam steps on `grads` (Kingma & Ba, bias-corrected, no decay), step
    t with (beta1, beta2, eps) = steps[t]; bias corrections use the step's own betas, as torch's
    AdamW does."""
    m = v = 0.0
    for t, (g, (beta1, beta2, eps)) in enumerate(zip(grads, steps, strict=True), start=1):
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        w -= lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)) ** 0.5 + eps)
    return w


GRADS = [[0.3, -1.0], [0.1, 0.4], [-0.2, 0.5], [0.6, 0.2]]
# Batch 1024 at base 256 (k = 4) under the SDE rule: LR x 2, betas (0.6, 0.996), eps / 2
# (worked in test_rules.py); eps 4e-3 here so that it shows in the update.
SDE = LRConfig(base=0.01, base_batch_size=256, scaling="sde")
ADAMW = OptimizerConfig(name="adamw", betas=(0.9, 0.999), eps=4e-3, weight_decay=0.0)
BASE, MOVED = (0.9, 0.999, 4e-3), (0.6, 0.996, 2e-3)


def test_adamw_trains_with_the_sde_moved_betas_and_eps():
    layer = _tiny([0.5, -0.25], 0.0)
    optimizer = build_optimizer(layer, moved_optimizer(ADAMW, SDE, 1024))
    for group in optimizer.param_groups:
        assert group["betas"] == pytest.approx(MOVED[:2]) and group["eps"] == MOVED[2]
    for grad in GRADS:
        _step(optimizer, peak_lr(SDE, 1024), {layer.weight: grad, layer.bias: [0.0]})
    for i, start in enumerate([0.5, -0.25]):
        expected = _adam_by_hand(start, [g[i] for g in GRADS], 0.02, [MOVED] * 4)
        assert layer.weight[0, i].item() == pytest.approx(expected, rel=1e-6)
    # The unmoved betas and eps give another weight: the check above can tell them apart.
    unmoved = _adam_by_hand(0.5, [g[0] for g in GRADS], 0.02, [BASE] * 4)
    assert layer.weight[0, 0].item() != pytest.approx(unmoved, rel=1e-3)


def test_set_hyperparameters_moves_betas_and_eps_mid_run():
    # Two steps at the base batch, then the batch quadruples: the moments carry on and the next
    # two steps use the moved betas and eps.
    layer = _tiny([0.5, -0.25], 0.0)
    optimizer = build_optimizer(layer, ADAMW)
    for grad in GRADS[:2]:
        _step(optimizer, 0.01, {layer.weight: grad, layer.bias: [0.0]})
    set_hyperparameters(optimizer, moved_optimizer(ADAMW, SDE, 1024))
    for grad in GRADS[2:]:
        _step(optimizer, 0.01, {layer.weight: grad, layer.bias: [0.0]})
    expected = _adam_by_hand(0.5, [g[0] for g in GRADS], 0.01, [BASE] * 2 + [MOVED] * 2)
    assert layer.weight[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_set_hyperparameters_leaves_sgd_alone():
    optimizer = build_optimizer(_net(), OptimizerConfig(name="sgd"))
    set_hyperparameters(optimizer, OptimizerConfig(name="sgd"))
    assert all("betas" not in g and "eps" not in g for g in optimizer.param_groups)


# --------------------------------------------------------------------------- LARS and LAMB


def test_lars_steps_by_hand():
    layer = _tiny([3.0, 4.0], bias=2.0)
    config = OptimizerConfig(name="lars", momentum=0.9, weight_decay=0.1, trust_coefficient=0.003)
    optimizer = build_optimizer(layer, config)
    assert isinstance(optimizer, LARS)
    grads = {layer.weight: [0.6, 0.8], layer.bias: [0.5]}
    _step(optimizer, lr=2.0, grads=grads)
    # ||w|| = 5, ||g|| = 1: local lr = 0.003 * 5 / (1 + 0.1 * 5) = 0.01.
    # d = g + 0.1 w = [0.9, 1.2]; v = 2.0 * 0.01 * d = [0.018, 0.024]; w - v.
    assert torch.allclose(layer.weight, torch.tensor([[2.982, 3.976]]))
    # The bias is plain momentum SGD: v = 2.0 * 0.5 = 1.0; b = 2 - 1.
    assert torch.allclose(layer.bias, torch.tensor([1.0]))
    _step(optimizer, lr=1.0, grads=grads)
    # The paper keeps the LR inside the buffer: v = 0.9 * 1.0 + 1.0 * 0.5 = 1.4; b = 1 - 1.4.
    assert torch.allclose(layer.bias, torch.tensor([-0.4]))


def test_lamb_step_by_hand():
    layer = _tiny([0.0, 5.0], bias=2.0)
    config = OptimizerConfig(name="lamb", weight_decay=0.1, eps=1.0)
    optimizer = build_optimizer(layer, config)
    assert isinstance(optimizer, LAMB)
    _step(optimizer, lr=0.1, grads={layer.weight: [1.0, -1.0], layer.bias: [1.0]})
    # Step 1: m_hat = g, v_hat = g^2, so m_hat / (sqrt(v_hat) + 1) = [0.5, -0.5].
    # r = [0.5, -0.5] + 0.1 * [0, 5] = [0.5, 0]; ratio = ||w|| / ||r|| = 5 / 0.5 = 10.
    # w = [0, 5] - 0.1 * 10 * [0.5, 0].
    assert torch.allclose(layer.weight, torch.tensor([[-0.5, 5.0]]))
    # The bias is plain Adam: r = 1 / (1 + 1) = 0.5; b = 2 - 0.1 * 0.5.
    assert torch.allclose(layer.bias, torch.tensor([1.95]))


def _lars_reference(w, grads, lrs, momentum, decay, eta):
    """Algorithm 1 of You, Gitman & Ginsburg 2017 on one float64 tensor."""
    v = torch.zeros_like(w)
    for g, lr in zip(grads, lrs, strict=True):
        local = eta * w.norm() / (g.norm() + decay * w.norm())
        v = momentum * v + lr * local * (g + decay * w)
        w = w - v
    return w


def _lamb_reference(w, grads, lrs, beta1, beta2, eps, decay):
    """Algorithm 2 of You et al. 2019 on one float64 tensor."""
    m = v = torch.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps) + decay * w
        w = w - lr * w.norm() / r.norm() * r
    return w


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_matches_paper_over_several_steps(name):
    torch.manual_seed(1)
    w0 = torch.randn(3, 4, dtype=torch.float64)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    lrs = [0.5, 1.0, 0.7, 0.2]
    config = OptimizerConfig(name=name, weight_decay=0.01, trust_coefficient=0.02, eps=1e-6)
    param = nn.Parameter(w0.clone())
    holder = nn.Module()
    holder.w = param
    optimizer = build_optimizer(holder, config)
    for g, lr in zip(grads, lrs, strict=True):
        _step(optimizer, lr, {param: g})
    if name == "lars":
        expected = _lars_reference(w0, grads, lrs, 0.9, 0.01, 0.02)
    else:
        expected = _lamb_reference(w0, grads, lrs, 0.9, 0.999, 1e-6, 0.01)
    assert torch.allclose(param.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_zero_norms_give_no_nan(name, weight_decay):
    holder = nn.Module()
    holder.zero_w = nn.Parameter(torch.zeros(2, 2))
    holder.zero_g = nn.Parameter(torch.ones(2, 2))
    holder.both = nn.Parameter(torch.zeros(2, 2))
    config = OptimizerConfig(name=name, weight_decay=weight_decay)
    optimizer = build_optimizer(holder, config)
    grads = {holder.zero_w: [1.0] * 4, holder.zero_g: [0.0] * 4, holder.both: [0.0] * 4}
    for _ in range(2):
        _step(optimizer, lr=0.1, grads=grads)
    assert all(torch.isfinite(p).all() for p in holder.parameters())
    # A zero weight still learns: its trust ratio is 1, not 0.
    assert (holder.zero_w < 0).all()
    assert torch.equal(holder.both, torch.zeros(2, 2))


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_step_does_not_read_tensor_values(name, monkeypatch):
    net = _net()
    net(torch.randn(16, 4)).sum().backward()
    optimizer = build_optimizer(net, OptimizerConfig(name=name))

    def host_read(*args):
        raise AssertionError("the step copied a tensor value to the host")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    optimizer.step()
    optimizer.step()


# --------------------------------------------------------------------------- checkpoints


def _train(net: nn.Module, optimizer: torch.optim.Optimizer, lrs: list[float]) -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(16, 4, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_checkpoint_is_bit_exact(name, tmp_path):
    config = OptimizerConfig(name=name, weight_decay=0.01, trust_coefficient=0.02)
    lrs = [0.05, 0.1, 0.1, 0.08, 0.05, 0.02]
    whole = _net()
    first = copy.deepcopy(whole)
    _train(whole, build_optimizer(whole, config), lrs)

    optimizer = build_optimizer(first, config)
    _train(first, optimizer, lrs[:3])
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    resumed = _net(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    optimizer = build_optimizer(resumed, config)
    optimizer.load_state_dict(checkpoint["optimizer"])
    _train(resumed, optimizer, lrs[3:])

    for (key, expected), actual in zip(
        whole.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), key
