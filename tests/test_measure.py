"""Noise scale and sharpness against closed forms and hand-worked numbers; no side effects."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lbs_tune.measure import (
    NoiseScale,
    gradient_norms,
    noise_estimates,
    top_hessian_eigenvalue,
)

# --------------------------------------------------------------------------- estimator by hand


def test_estimator_on_two_one_dimensional_gradients():
    # Per-example gradients 1 and 3; b = 1, B = 2.
    # |G_b|² = (1² + 3²) / 2 = 5;  G_B = (1 + 3) / 2 = 2, |G_B|² = 4.
    # |G|² = (2·4 - 1·5) / (2 - 1) = 3;  tr(Σ) = (5 - 4) / (1/1 - 1/2) = 2.
    # Check: the sample mean is 2 and the unbiased sample variance ((1-2)² + (3-2)²) / 1 = 2;
    # the unbiased estimate of the squared mean is mean² - var / n = 4 - 2/2 = 3.
    assert noise_estimates(5.0, 4.0, 1, 2) == pytest.approx((3.0, 2.0))


def test_estimator_on_two_dimensional_micro_batches():
    # Micro-batch gradients (3, 1) and (1, 1) of b = 2 examples each; B = 4.
    # |G_b|² = (10 + 2) / 2 = 6;  G_B = (2, 1), |G_B|² = 5.
    # |G|² = (4·5 - 2·6) / (4 - 2) = 4;  tr(Σ) = (6 - 5) / (1/2 - 1/4) = 4.
    assert noise_estimates(6.0, 5.0, 2, 4) == pytest.approx((4.0, 4.0))
    # Micro-batch gradients (2, 0) and (0, 2): |G_b|² = 4, G_B = (1, 1), |G_B|² = 2.
    # |G|² = (4·2 - 2·4) / 2 = 0: all of |G_B|² is noise, and B_simple has no value.
    scale = NoiseScale(decay=0.0)
    estimate = scale.update(4.0, 2.0, 2, 4)
    assert estimate.grad_sq == 0.0
    assert estimate.trace_cov == pytest.approx(8.0)  # (4 - 2) / (1/4)
    assert math.isnan(estimate.b_simple)


def test_moving_average_by_hand_and_state_round_trip():
    scale = NoiseScale(decay=0.5)
    # Measurement 1: |G|² = 3, tr(Σ) = 2 (the 1-D set above). EMA 0.5·3 = 1.5, corrected by
    # 1 - 0.5 = 0.5: 3. tr: 1 / 0.5 = 2.
    assert scale.update(5.0, 4.0, 1, 2) == pytest.approx((3.0, 2.0, 2 / 3))
    state = scale.state_dict()
    # Measurement 2: |G|² = 4, tr(Σ) = 4 (the 2-D set). EMA 0.5·1.5 + 0.5·4 = 2.75, corrected
    # by 1 - 0.25: 11/3; tr 0.5·1 + 0.5·4 = 2.5 -> 10/3; B_simple = (10/3) / (11/3) = 10/11.
    expected = (11 / 3, 10 / 3, 10 / 11)
    assert scale.update(6.0, 5.0, 2, 4) == pytest.approx(expected)
    restored = NoiseScale(decay=0.9)
    restored.load_state_dict(state)
    assert restored.update(6.0, 5.0, 2, 4) == pytest.approx(expected)
    assert restored.state_dict() == scale.state_dict()


def test_gradient_norms_by_hand():
    # One weight w = 1, loss 0.5 (w x - y)² with x = 1 and y = 0, -2, 1, 1: per-example
    # gradients (w x - y) x = 1, 3, 0, 0. Micro-batches of 2: gradients 2 and 0, so
    # |G_b|² = (4 + 0) / 2 = 2; the whole batch's gradient is 1, |G_B|² = 1.
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    x = torch.ones(4, 1)
    y = torch.tensor([0.0, -2.0, 1.0, 1.0])
    small_sq, big_sq = gradient_norms(model, x, y, _half_squared_error, 2)
    assert (small_sq, big_sq) == pytest.approx((2.0, 1.0))
    with pytest.raises(ValueError, match="must divide"):
        gradient_norms(model, x, y, _half_squared_error, 3)


def _half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(1) - targets).square().mean()


# --------------------------------------------------------------------------- closed form


def test_noise_scale_matches_gaussian_linear_regression():
    # Loss 0.5 (w·x - y)², x ~ N(0, I_d), y = w*·x + ε, ε ~ N(0, σ²); let u = w - w*.
    # Per-example gradient g = (w·x - y) x = (u·x) x - ε x.
    # G = E[g] = E[x xᵀ] u - E[ε] E[x] = u, so |G|² = |u|².
    # E|g|² = E[(u·x)² |x|²] + σ² E|x|² (the cross term has E[ε] = 0). By Isserlis,
    # E[x_a x_b x_j²] = δ_ab + 2 δ_aj δ_bj, so E[(u·x)² |x|²] = Σ_ab u_a u_b (d δ_ab + 2 δ_ab)
    # = (d + 2)|u|², and E|x|² = d. tr(Σ) = E|g|² - |G|² = (d + 1)|u|² + d σ².
    # Here d = 4, |u|² = 1, σ = 0.5: |G|² = 1, tr(Σ) = 5 + 1 = 6, B_simple = 6.
    d, sigma, big, small = 4, 0.5, 256, 16
    # One measurement's estimates spread by 17% (|G|²) and 24% (tr(Σ)); the means of 400 by 0.9%
    # and 1.2%, so 5% is four spreads away.
    measurements = 400
    model = nn.Linear(d, 1, bias=False)
    nn.init.constant_(model.weight, 1 / math.sqrt(d))  # w* = 0, so u = w and |u|² = 1
    generator = torch.Generator().manual_seed(0)
    scale = NoiseScale(decay=1 - 1 / measurements)
    sums = [0.0, 0.0]
    for _ in range(measurements):
        x = torch.randn(big, d, generator=generator)
        y = sigma * torch.randn(big, generator=generator)
        small_sq, big_sq = gradient_norms(model, x, y, _half_squared_error, small)
        for i, value in enumerate(noise_estimates(small_sq, big_sq, small, big)):
            sums[i] += value / measurements
        smoothed = scale.update(small_sq, big_sq, small, big)
    # The plain |G_b|² would be 1 + 6/16 = 1.375 and b |G_b|² 22: 5% tells them apart.
    assert sums == pytest.approx([1.0, 6.0], rel=0.05)
    assert smoothed.grad_sq == pytest.approx(1.0, rel=0.05)
    assert smoothed.trace_cov == pytest.approx(6.0, rel=0.05)
    assert smoothed.b_simple == pytest.approx(6.0, rel=0.1)


# --------------------------------------------------------------------------- sharpness


class Quadratic(nn.Module):
    """Loss 0.5 wᵀ A w for every example: the Hessian is A whatever the input."""

    def __init__(self, eigenvalues: torch.Tensor, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        d = len(eigenvalues)
        basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        self.register_buffer("a", basis @ torch.diag(eigenvalues) @ basis.T)
        self.w = nn.Parameter(torch.randn(d, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.a @ self.w).expand(len(x))


def _mean(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


@pytest.mark.parametrize(
    "eigenvalues",
    [
        # A bulk near zero and a few outliers, the shape of deep nets' Hessian spectra.
        torch.cat([torch.linspace(0.0, 1.0, 195), torch.tensor([2.0, 3.0, 5.0, 7.0, 10.0])]),
        # The most negative eigenvalue is the largest in size (power iteration would find -20);
        # the top one is 5.
        torch.cat(
            [torch.tensor([-20.0, -8.0]), torch.linspace(-1.0, 1.0, 196), torch.tensor([3.0, 5.0])]
        ),
    ],
)
def test_top_eigenvalue_of_a_quadratic(eigenvalues):
    model = Quadratic(eigenvalues.double())
    x = torch.zeros(8, 1)
    estimate = top_hessian_eigenvalue(model, x, x, _mean, iterations=20, seed=3)
    assert estimate == pytest.approx(float(eigenvalues.max()), rel=0.01)


def test_top_eigenvalue_of_an_eval_mode_network_matches_the_exact_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():  # running statistics that differ from any batch's own
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        tensors = [
            t.view(s)
            for t, s in zip(vector.split([s.numel() for s in shapes]), shapes, strict=True)
        ]
        logits = torch.func.functional_call(net, dict(zip(names, tensors, strict=True)), (x,))
        return F.cross_entropy(logits, y)

    net.eval()
    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))[-1]
    net.train()
    estimate = top_hessian_eigenvalue(net, x, y, F.cross_entropy, iterations=len(flat), seed=1)
    assert estimate == pytest.approx(float(exact), rel=0.01)
    assert net.training


def test_top_eigenvalue_in_chunks_equals_the_whole_batch():
    # Mean squared error of a linear model: the Hessian is Xᵀ X / N.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(32, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    exact = float(torch.linalg.eigvalsh(x.T @ x / 32)[-1])
    whole = top_hessian_eigenvalue(model, x, y, _half_squared_error, iterations=6)
    chunked = top_hessian_eigenvalue(model, x, y, _half_squared_error, iterations=6, max_batch=5)
    assert whole == pytest.approx(exact, rel=1e-9)
    assert chunked == pytest.approx(exact, rel=1e-9)


# --------------------------------------------------------------------------- no side effects


class InputNoise(nn.Module):
    """Adds noise from its own generator in train mode (a random stream that is not torch's)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + 0.1 * torch.randn(x.shape, generator=self.generator)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        InputNoise(seed=5),
        nn.Linear(4, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    )


def _trajectory(measure: bool, steps: int = 4) -> tuple[nn.Module, dict, list[float]]:
    """SGD steps on a net with dropout, batch norm and its own noise; optionally measuring
    before each step, between its backward and its update, and after it."""
    net = _net()
    noise = net[0].generator
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    measured = []
    for step in range(steps):
        x = torch.randn(16, 4, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        if measure:
            measured += gradient_norms(net, x, y, F.cross_entropy, 4, generators=[noise])
        F.cross_entropy(net(x), y).backward()
        if measure:
            grads = [p.grad.clone() for p in net.parameters()]
            measured += gradient_norms(net, x, y, F.cross_entropy, 8, generators=[noise])
            assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))
        optimizer.step()
        if measure:
            measured.append(
                top_hessian_eigenvalue(net, x, y, F.cross_entropy, 5, seed=step, generators=[noise])
            )
        optimizer.zero_grad()
    states = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict()["state"],
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
        "modes": [m.training for m in net.modules()],
    }
    return net, states, measured


def test_measuring_leaves_the_trajectory_bit_identical():
    _, plain, _ = _trajectory(measure=False)
    _, measuring, measured = _trajectory(measure=True)
    assert len(measured) == 4 * 5
    assert all(math.isfinite(v) for v in measured)
    assert measured[4] > 0  # the first sharpness estimate: a real measurement was taken
    assert plain["modes"] == measuring["modes"] == [True] * 7
    for key, expected in plain["model"].items():
        assert torch.equal(expected, measuring["model"][key]), key
    for index, state in plain["optimizer"].items():
        assert torch.equal(
            state["momentum_buffer"], measuring["optimizer"][index]["momentum_buffer"]
        )
    assert torch.equal(plain["torch"], measuring["torch"])
    assert torch.equal(plain["noise"], measuring["noise"])


def test_measurements_would_have_changed_the_state_they_restore():
    # The restore is what keeps the trajectory: each measurement's own passes move batch norm's
    # running statistics and draw from both random streams.
    net = _net()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = (net[2].running_mean.clone(), torch.get_rng_state(), net[0].generator.get_state())
    gradient_norms(net, x, y, F.cross_entropy, 4, generators=[net[0].generator])
    assert torch.equal(net[2].running_mean, before[0])
    assert torch.equal(torch.get_rng_state(), before[1])
    assert torch.equal(net[0].generator.get_state(), before[2])
    F.cross_entropy(net(x[:4]), y[:4]).backward()
    assert not torch.equal(net[2].running_mean, before[0])
    assert not torch.equal(torch.get_rng_state(), before[1])
    assert not torch.equal(net[0].generator.get_state(), before[2])


def test_sharpness_restores_mixed_modes():
    net = _net()
    net[4].eval()  # a module the caller keeps in eval mode inside a training model
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    top_hessian_eigenvalue(net, x, y, F.cross_entropy, iterations=2)
    assert [m.training for m in net.modules()] == [True, True, True, True, True, False, True]
