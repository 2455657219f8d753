"""Noise scales and sharpness against closed forms, an independent simulation and numbers worked
by hand; the optimizers' stability limits against PyTorch's own optimizers; no side effects."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_base
from torch import nn

from lbs_tune.config import TrialConfig
from lbs_tune.measure import (
    NoiseMoments,
    NoiseScale,
    _influence_values,
    _weighted_norm,
    gradient_moments,
    hessian_moments,
    noise_moments,
)
from lbs_tune.measuring import trainable_params
from lbs_tune.models import GhostBatchNorm
from lbs_tune.rules import stability_limit
from lbs_tune.sharpness import adam_preconditioner, top_hessian_eigenvalue
from lbs_tune.training import ListReporter, train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(1) - targets).square().mean()


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error."""
    data = torch.tensor(values, dtype=torch.float64)
    return float(data.mean()), float(data.std() / math.sqrt(len(data)))


# --------------------------------------------------------------------------- estimators by hand


def test_gradient_moments_by_hand():
    # Per-example gradients 1 and 3: Σ|g|² = 10, ḡ = 2, |ḡ|² = 4.
    # tr(Σ) = (10 - 2·4) / 1 = 2, the unbiased sample variance ((1-2)² + (3-2)²) / 1;
    # |G|² = 4 - 2/2 = 3, the unbiased estimate of the squared mean.
    assert gradient_moments(10.0, 4.0, 2) == pytest.approx((3.0, 2.0))
    # Units that are means of 2 examples each, (3, 1) and (1, 1): Σ|u|² = 12, ū = (2, 1), |ū|² = 5.
    # Their covariance is Σ/2: tr(Σ) = 2 (12 - 2·5) / 1 = 4; |G|² = 5 - 4/(2·2) = 4 (the
    # two-batch-size estimates of McCandlish et al. with b = 2, B = 4 give the same 4 and 4).
    assert gradient_moments(12.0, 5.0, 2, 2) == pytest.approx((4.0, 4.0))


def test_hessian_moments_by_hand():
    # Per-example gradients 1 and 3 and a Hessian H' = 2: deviations -1 and +1, each
    # (g - ḡ) H' (g - ḡ) = 2. tr(HΣ) = n / ((n - 1) m) · Σ = 2 / (1·2) · 4 = 4 = H tr(Σ) = 2·2;
    # GᵀHG = ḡ H' ḡ - tr(HΣ)/n = 8 - 2 = 6 = H |G|² = 2·3.
    assert hessian_moments(4.0, 2, 8.0, 2) == pytest.approx((6.0, 4.0))
    # From the first example alone: 2/(1·1)·2 = 4 again (both deviations have the same size).
    assert hessian_moments(2.0, 1, 8.0, 2) == pytest.approx((6.0, 4.0))


def test_windows_by_examples_end_where_the_next_starts_and_at_the_budget():
    """Under a batch schedule the loop opens windows (`open`): one still open ends there, its
    estimate returned; the last ends at the budget; `left` goes with the checkpoint."""
    scale = NoiseScale(interval=5, window=3, budget=7, seed=0, device=torch.device("cpu"),
                       by_examples=True)  # fmt: skip
    ones, twos = NoiseMoments(1.0, 4.0, 1.0, 2.0), NoiseMoments(3.0, 8.0, 1.0, 2.0)
    assert scale.due(0) and scale.add(0, ones) is None and scale.due(1)
    cut = scale.open()  # after step 1: the window of steps 0 and 1 ends, one of 3 starts
    assert cut.moments == ones and cut.b_simple == 4.0
    assert scale.add(2, twos) is None and scale.add(3, twos) is None
    state = scale.state_dict()
    assert state["left"] == 1 and state["count"] == 2
    again = NoiseScale(5, 3, 7, 0, torch.device("cpu"), by_examples=True)
    again.load_state_dict(state)
    assert again.due(4) and again.add(4, ones).moments == NoiseMoments(7 / 3, 20 / 3, 1.0, 2.0)
    assert not again.due(5) and again.open() is None  # nothing open: nothing to end
    assert again.add(5, ones) is None and again.add(6, twos).b_simple == 6.0 / 2.0  # budget
    # A schedule's checkpoint from before `left`: its open window is dropped, not folded in.
    old = NoiseScale(5, 3, 7, 0, torch.device("cpu"), by_examples=True)
    old.load_state_dict({k: v for k, v in state.items() if k != "left"})
    assert not old.due(4) and old.open() is None
    assert old.add(4, ones) is None and old.add(5, ones) is None
    assert old.add(6, ones).moments == ones


def test_window_schedule_averages_and_state_round_trip():
    # Windows of 2 steps every 5, budget 12: steps 0-1, 5-6, 10-11.
    scale = NoiseScale(interval=5, window=2, budget=12, seed=0, device=torch.device("cpu"))
    assert [s for s in range(12) if scale.due(s)] == [0, 1, 5, 6, 10, 11]
    first, second = NoiseMoments(3.0, 2.0, 6.0, 4.0), NoiseMoments(1.0, 10.0, -2.0, 20.0)
    assert scale.add(0, first) is None
    state = scale.state_dict()
    draw = scale.seed()
    # Averages (2, 6, 2, 12): B_simple = 6/2 = 3, the ratio of the averages (the average of the
    # ratios would be (2/3 + 10)/2 = 5.33); B_noise = 12/2 = 6.
    estimate = scale.add(1, second)
    assert estimate.moments == pytest.approx((2.0, 6.0, 2.0, 12.0))
    assert (estimate.b_simple, estimate.b_noise) == pytest.approx((3.0, 6.0))
    assert estimate.metrics()["noise/b_simple"] == 3.0
    restored = NoiseScale(interval=5, window=2, budget=12, seed=1, device=torch.device("cpu"))
    restored.load_state_dict(state)
    assert restored.seed() == draw
    assert restored.add(1, second) == estimate
    # GᵀHG averaging to <= 0 leaves B_noise without a value; a window cut by the budget's end
    # (budget 11: step 10 is the last) reports what it has.
    short = NoiseScale(interval=5, window=2, budget=11, seed=0, device=torch.device("cpu"))
    alone = short.add(10, NoiseMoments(1.0, 4.0, -1.0, 3.0))
    assert alone.b_simple == 4.0 and math.isnan(alone.b_noise)
    # A window longer than the interval measures every step, closing every interval.
    every = NoiseScale(interval=3, window=10, budget=9, seed=0, device=torch.device("cpu"))
    assert all(every.due(s) for s in range(9))
    assert [s for s in range(9) if every.add(s, first) is not None] == [2, 5, 8]


# --------------------------------------------------------------------------- closed forms


def _estimates(
    model: nn.Module,
    draw: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    loss_fn,
    draws: int,
    hessian_units: int,
    micro_batch: int | None = None,
    hessian_draw: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[NoiseMoments]:
    """`noise_moments` on `draws` independent batches, each with an independent Hessian batch
    (drawn by `hessian_draw`, `draw` by default)."""
    generator = torch.Generator().manual_seed(0)
    return [
        noise_moments(
            model,
            *draw(generator),
            loss_fn,
            micro_batch,
            seed=i,
            hessian_batch=(hessian_draw or draw)(generator),
            hessian_units=hessian_units,
        )
        for i in range(draws)
    ]


def _assert_unbiased(found: list[NoiseMoments], truth: NoiseMoments, n: int) -> None:
    """Every estimate's mean within 4 standard errors of the truth, and the plain squared norm
    |ḡ|² (and ḡᵀH'ḡ), biased by tr(Σ)/n (tr(HΣ)/n), at least 4 standard errors away from it:
    batches of a few examples, where the corrections matter most."""
    for name, exact in zip(NoiseMoments._fields, truth, strict=True):
        mean, error = _mean_and_error([getattr(m, name) for m in found])
        assert abs(mean - exact) < 4 * error, (name, mean, exact, error)
    for name, noise in (("grad_sq", "trace_cov"), ("grad_hgrad", "trace_hcov")):
        plain, error = _mean_and_error([getattr(m, name) + getattr(m, noise) / n for m in found])
        assert abs(plain - getattr(truth, name)) > 4 * error, (name, plain, error)


def test_noise_moments_match_gaussian_linear_regression_with_anisotropic_inputs():
    # Loss ½(w·x - y)², x ~ N(0, S) with S = diag(s), y = w*·x + ε, ε ~ N(0, σ²); u = w - w*.
    # Per-example gradient g = (u·x) x - ε x, Hessian x xᵀ, so H = E[x xᵀ] = S and G = S u.
    # E[g gᵀ] = E[(u·x)² x xᵀ] + σ² S; by Isserlis, E[x_a x_b x_c x_d] = S_ab S_cd + S_ac S_bd
    # + S_ad S_bc, so E[(u·x)² x xᵀ] = (uᵀSu) S + 2 S u uᵀ S. Then Σ = E[g gᵀ] - G Gᵀ
    # = (uᵀSu + σ²) S + S u uᵀ S, and
    #   |G|² = |Su|²,  tr(Σ) = (uᵀSu + σ²) tr S + |Su|²,
    #   GᵀHG = uᵀS³u,  tr(HΣ) = (uᵀSu + σ²) tr S² + uᵀS³u.
    # With s = (3, 1, 0.5, 0.25), u = (0.5, -1, 1, 2), σ = 0.5: |G|² = 3.75, tr(Σ) = 20.375
    # (B_simple 5.43), GᵀHG = 7.9375, tr(HΣ) = 44.03 (B_noise 5.55).
    s = torch.tensor([3.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    u = torch.tensor([0.5, -1.0, 1.0, 2.0], dtype=torch.float64)
    sigma, n = 0.5, 8
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(u)  # w* = 0

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 4, generator=generator, dtype=torch.float64) * s.sqrt()
        return x, sigma * torch.randn(n, generator=generator, dtype=torch.float64)

    level = u @ (s * u) + sigma**2
    su_sq, s3 = float((s * u) @ (s * u)), float(u @ (s**3 * u))
    truth = NoiseMoments(
        su_sq, float(level * s.sum()) + su_sq, s3, float(level * (s**2).sum()) + s3
    )
    assert truth == pytest.approx((3.75, 20.375, 7.9375, 44.03125))
    _assert_unbiased(_estimates(model, draw, _half_squared_error, 250, 4), truth, n)


class Quadratic(nn.Module):
    """Per example z the loss ½ wᵀAw - z·w: the Hessian is A whatever the example, the
    per-example gradient A w - z. With z ~ N(μ, C): G = A w - μ and Σ = C."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w - z @ self.w


def _mean(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


def _rotated(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """A symmetric matrix with these eigenvalues in a random basis."""
    generator = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T


def test_noise_moments_match_a_quadratic_with_known_hessian_and_covariance():
    # G = A w - μ, Σ = C, H = A: |G|² = |Aw - μ|², tr(Σ) = tr C, GᵀHG = Gᵀ A G, tr(HΣ) = tr(AC).
    # A and C share no eigenvectors, so tr(AC) is not a product of their traces.
    a, c = _rotated([4.0, 2.0, 1.0, 0.5, 0.1], 1), _rotated([3.0, 1.0, 1.0, 0.3, 0.2], 2)
    mu = torch.tensor([1.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64)
    w = torch.tensor([0.2, 0.4, -0.3, 0.1, 0.0], dtype=torch.float64)
    model, n = Quadratic(a, w), 8
    root = torch.linalg.cholesky(c)

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z = mu + torch.randn(n, 5, generator=generator, dtype=torch.float64) @ root.T
        return z, torch.zeros(n)

    g = a @ w - mu
    truth = NoiseMoments(float(g @ g), float(c.trace()), float(g @ a @ g), float((a @ c).trace()))
    _assert_unbiased(_estimates(model, draw, _mean, 150, 4), truth, n)


# --------------------------------------------------------------------------- batch norm


def _teacher_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs N(0, I_8), labels the argmax of a fixed linear teacher of 3 classes, plus noise."""
    teacher = torch.linspace(-1, 1, 24).view(3, 8).roll(1, 1)
    x = torch.randn(n, 8, generator=generator)
    return x, (x @ teacher.T + 0.5 * torch.randn(n, 3, generator=generator)).argmax(1)


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _simulated_step_noise(net: nn.Module, n: int, batches: int) -> tuple[float, float]:
    """(|E G_n|², n tr Cov G_n) of the training gradient G_n of independent batches of n
    examples, batch norm on each batch's statistics: what the noise scale claims to measure."""
    generator = torch.Generator().manual_seed(99)
    params = list(net.parameters())
    grads = []
    for _ in range(batches):
        x, y = _teacher_task(n, generator)
        parts = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        grads.append(torch.cat([g.flatten() for g in parts]).double())
    stacked = torch.stack(grads)
    mean = stacked.mean(0)
    variance = (stacked - mean).square().sum(1).sum() / (batches - 1)
    return float(mean @ mean - variance / batches), float(n * variance)


def test_batch_norm_noise_is_that_of_the_step_gradient_whatever_the_settings():
    # Batch norm couples a batch's examples. The measured |G|² and tr(Σ) are those of the
    # training gradient G_n of batches of n (simulated from independent batches: |E G_n|² and
    # n·tr Cov G_n, the same at n = 64 and 128), with groups of any size; B_simple agrees within
    # 5% across the settings, which measure the same batches (the n = 64 ones are the first
    # halves of the others) so that their difference is not lost in the sampling noise.
    # Taking each example's loss through the batch's statistics instead gave tr(Σ) +12%, the
    # delete-one jackknife +14%, on a net like this one with another teacher.
    net = _bn_net()
    grad_sq, trace_cov = _simulated_step_noise(net, 64, 2000)
    generator = torch.Generator().manual_seed(0)
    batches = [_teacher_task(128, generator) for _ in range(40)]
    b_simple = []
    for n, micro_batch in ((128, 16), (64, None), (64, 16)):
        found = [
            noise_moments(net, x[:n], y[:n], F.cross_entropy, micro_batch, seed=i)
            for i, (x, y) in enumerate(batches)
        ]
        mean_sq, _ = _mean_and_error([m.grad_sq for m in found])
        mean_trace, _ = _mean_and_error([m.trace_cov for m in found])
        assert mean_trace == pytest.approx(trace_cov, rel=0.08), (n, micro_batch)
        assert mean_sq == pytest.approx(grad_sq, rel=0.08), (n, micro_batch)
        b_simple.append(mean_trace / mean_sq)
    assert max(b_simple) / min(b_simple) < 1.05, b_simple


def test_a_bias_before_batch_norm_has_no_gradient_noise():
    # Batch norm subtracts the batch's mean: no step's loss depends on the bias before it, and
    # the measurement gives it no gradient and no noise. Freezing the statistics (here: eval
    # mode with the batch's own statistics as running ones) gives it both.
    net = _bn_net()
    x, y = _teacher_task(64, torch.Generator().manual_seed(0))
    full = noise_moments(net, x, y, F.cross_entropy, 8, seed=0)
    for name, p in net.named_parameters():
        p.requires_grad_(name == "0.bias")
    bias = noise_moments(net, x, y, F.cross_entropy, 8, seed=0)
    assert full.trace_cov > 1
    assert abs(bias.trace_cov) < 1e-9 * full.trace_cov and abs(bias.grad_sq) < 1e-9
    with torch.no_grad():
        hidden = net[0](x)
        net[1].running_mean.copy_(hidden.mean(0))
        net[1].running_var.copy_(hidden.var(0, unbiased=False))
    frozen = noise_moments(net.eval(), x, y, F.cross_entropy, 8, seed=0)
    assert frozen.trace_cov > 0.01 * full.trace_cov


def test_noise_moments_with_dropout_draw_the_hessian_batchs_masks_apart():
    # Loss ½(w·z)² with z = m⊙x/(1-p) (dropout, p = ½: m_a ~ Bernoulli(½)), x_a = ±1: the
    # per-example gradient is g = (w·z) z, the Hessian z zᵀ, so H = E[z zᵀ] = 2I and G = 2w.
    # z_a² = 4 m_a, so E[|g|²] = E[(w·z)² |z|²] = 16 Σ_a w_a² E[m_a Σ_c m_c]
    # = 16 |w|² (½ + ¼(d - 1)). With d = 4, w_a = ½ (|w|² = 1): |G|² = 4, tr(Σ) = 20 - 4 = 16,
    # GᵀHG = 8, tr(HΣ) = 32. H' is one example's z' z'ᵀ and the first example is the unit it
    # weighs: drawn with the first batch's masks, z' shared g_1's mask and tr(HΣ) came out
    # 58.5 ± 5.1 on these draws, 1.8x too large (the estimators need H' independent of the g_j).
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 1, bias=False)).double().train()
    with torch.no_grad():
        model[1].weight.fill_(0.5)

    def signs(count: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
        def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randint(0, 2, (count, 4), generator=generator).double() * 2 - 1
            return x, torch.zeros(count, dtype=torch.float64)

        return draw

    found = _estimates(model, signs(8), _half_squared_error, 1200, 1, hessian_draw=signs(1))
    _assert_unbiased(found, NoiseMoments(4.0, 16.0, 8.0, 32.0), 8)


def test_batch_norm_groups_with_dropout_average_to_the_batch_gradient():
    # The groups' gradients u_k = G + (n/size) dG/dw_k average to G, as the weights' scale does
    # not change the loss (Σ_k dG/dw_k = 0), only if every derivative is of the one function
    # whose gradient is G: the same dropout masks in every batched pass (32 groups: two).
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    x, y = _teacher_task(64, torch.Generator().manual_seed(0))
    params = trainable_params(net)
    units = list(_influence_values(net, x, y, F.cross_entropy, params, 2, 5, []))
    torch.manual_seed(5)
    whole = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    for i, g in enumerate(whole):
        mean = torch.cat([unit[i] for unit in units]).mean(0)
        assert torch.allclose(mean, g, atol=1e-6), i
    assert len(units) == 32


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm1d(3), nn.BatchNorm2d(3), GhostBatchNorm(3, ghost_batch_size=4)],
    ids=["bn1d", "bn2d", "ghost"],
)
def test_weighted_statistics_are_batch_norms_own(norm):
    # Unit weights reproduce the layer (ghost: chunks of 4, 4 and the remainder 2); weight 0
    # leaves an example out of the statistics, its neighbours in their places.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2, generator=generator)
        norm.bias.uniform_(-1, 1, generator=generator)
    shape = (10, 3) if isinstance(norm, nn.BatchNorm1d) else (10, 3, 2, 5)
    x = 3 * torch.randn(shape, generator=generator) + 1
    weights = torch.ones(10)
    assert torch.allclose(_weighted_norm(norm, x, weights), norm(x), atol=1e-5)
    weights[1] = 0
    kept = torch.cat([x[:1], x[2:]])
    expected = torch.cat([norm(kept[:3]), norm(kept[3:7]), norm(kept[7:])])
    if not isinstance(norm, GhostBatchNorm):  # the first ghost batch has 3 examples left
        expected = norm(kept)
    left = _weighted_norm(norm, x, weights)
    assert torch.allclose(torch.cat([left[:1], left[2:]]), expected, atol=1e-5)


def test_b_simple_at_batch_16_on_the_quickstart_mlp_is_never_null(data_dir):
    # The quickstart's MLP and optimizer at batch 16: B_simple comes from the measurement's own
    # batches (128 here) over windows of consecutive steps (5), not from the step's 16 examples.
    base = tiny_base(batch_size=16, epochs=1, eval_every=0.25)
    base["optimizer"] = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}
    base["lr"] = {"base": 0.01, "base_batch_size": 16}
    base["noise_scale"] = {"every": 0.25, "window": 5, "batch": 128, "hessian_examples": 2}
    reporter = ListReporter()
    train(TrialConfig.model_validate(base), reporter)
    measured = [r for r in reporter.rows if "noise/b_simple" in r]
    # 90 steps an epoch: windows at steps 0, 22, 44, 66 (every round(22.5) = 22) and 88 (cut
    # to 2 steps by the budget), each reported at the evaluation after its last step.
    assert [r["step"] for r in measured] == [22, 44, 66, 88, 90]
    assert all(r["noise/b_simple"] is not None and r["noise/b_simple"] > 0 for r in measured)
    assert all(r["noise/trace_cov"] > 0 for r in measured)


# --------------------------------------------------------------------------- sharpness


@pytest.mark.parametrize(
    "eigenvalues",
    [
        # A bulk near zero and a few outliers, the shape of deep nets' Hessian spectra.
        [*torch.linspace(0.0, 1.0, 195).tolist(), 2.0, 3.0, 5.0, 7.0, 10.0],
        # The most negative eigenvalue is the largest in size (power iteration would find -20);
        # the top one is 5.
        [-20.0, -8.0, *torch.linspace(-1.0, 1.0, 196).tolist(), 3.0, 5.0],
    ],
)
def test_top_eigenvalue_of_a_quadratic(eigenvalues):
    generator = torch.Generator().manual_seed(0)
    model = Quadratic(_rotated(eigenvalues, 0), torch.randn(200, generator=generator).double())
    z = torch.zeros(8, 200, dtype=torch.float64)
    estimate = top_hessian_eigenvalue(model, z, z, _mean, iterations=20, seed=3)
    assert estimate == pytest.approx(max(eigenvalues), rel=0.01)


def test_preconditioned_top_eigenvalue_of_a_quadratic():
    # λ_max(P⁻¹A) for a diagonal P: the eigenvalues of P^-1/2 A P^-1/2. Here it is 9.46, where
    # λ_max(A) is 4 and λ_max(A) / min P would be 40: neither bound gives it.
    a = _rotated([4.0, 2.0, 1.0, 0.5, 0.1], 1)
    p = torch.tensor([0.1, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    exact = float(torch.linalg.eigvalsh(a / torch.outer(p.sqrt(), p.sqrt()))[-1])
    model = Quadratic(a, torch.ones(5, dtype=torch.float64))
    z = torch.zeros(4, 5, dtype=torch.float64)
    estimate = top_hessian_eigenvalue(model, z, z, _mean, iterations=5, preconditioner=[p])
    assert estimate == pytest.approx(exact, rel=1e-9)
    assert 4 < exact < 40


def _flat_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
    """The loss as a function of all parameters in one vector, dropout's masks those drawn
    after seeding torch with `seed`, in the net's current modes."""
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        parts = vector.split([s.numel() for s in shapes])
        tensors = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        torch.manual_seed(seed)
        return F.cross_entropy(torch.func.functional_call(net, tensors, (x,)), y)

    return loss_of, torch.cat([p.detach().flatten() for p in net.parameters()])


def test_top_eigenvalue_is_that_of_the_loss_a_step_descends():
    # Train mode: batch norm on the batch's statistics, dropout with one fixed set of masks.
    # The net's running statistics differ from the batch's, so eval mode (which the sharpness
    # used to be measured in) has another Hessian, with another top eigenvalue.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)
    ).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(2, 4)
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    loss_of, flat = _flat_loss(net, x, y, seed=1)
    before = [b.clone() for b in net.buffers()]
    train_exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))[-1]
    net.eval()
    eval_exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))[-1]
    net.train()
    with torch.no_grad():
        for buffer, saved in zip(net.buffers(), before, strict=True):
            buffer.copy_(saved)
    estimate = top_hessian_eigenvalue(net, x, y, F.cross_entropy, iterations=len(flat), seed=1)
    assert estimate == pytest.approx(float(train_exact), rel=1e-6)
    assert abs(float(eval_exact) / float(train_exact) - 1) > 0.2
    assert net.training
    assert all(torch.equal(b, s) for b, s in zip(net.buffers(), before, strict=True))


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


# --------------------------------------------------------------------------- stability limits


def _largest_stable(
    optimizer: Callable[[torch.Tensor], torch.optim.Optimizer],
    curvatures: torch.Tensor,
    steps: int = 1000,
    before_step: Callable[[torch.optim.Optimizer, torch.Tensor], None] | None = None,
) -> float:
    """The largest curvature below which PyTorch's `optimizer` keeps every 1-D quadratic
    f = λx²/2 from growing over `steps` steps from x = 1: each coordinate of one parameter is
    one λ of the increasing `curvatures` (the optimizers act coordinate by coordinate)."""
    x = torch.ones(len(curvatures), dtype=torch.float64, requires_grad=True)
    opt = optimizer(x)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvatures * x.square()).sum().backward()
        if before_step:
            before_step(opt, x)
        opt.step()
    grown = ~(x.detach().abs() <= 1)  # NaN and inf included
    return float(curvatures[grown.nonzero()[0, 0] - 1])


@pytest.mark.parametrize(
    ("momentum", "nesterov", "paper"),
    # lr·λ at the limit: 2 for gradient descent; 2(1 + β) heavy ball (3.8 at 0.9, the issue's
    # number); 2(1 + β)/(1 + 2β) with Nesterov's update (1.357 at 0.9, 1.5 at 0.5).
    [(0.0, False, 2.0), (0.9, False, 3.8), (0.9, True, 1.357), (0.5, False, 3.0), (0.5, True, 1.5)],
)
def test_stability_limit_of_pytorchs_own_sgd(momentum, nesterov, paper):
    lr = 0.1
    curvatures = torch.logspace(-1, 3, 20_000, dtype=torch.float64)
    found = _largest_stable(
        lambda x: torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov), curvatures
    )
    assert stability_limit("sgd", lr, momentum, nesterov) * lr == pytest.approx(paper, abs=1e-3)
    assert found == pytest.approx(stability_limit("sgd", lr, momentum, nesterov), rel=0.005)


@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_stability_limit_of_pytorchs_own_adamw_with_a_frozen_preconditioner(beta1):
    # AdamW as PyTorch writes it, with its second moment frozen: before each step its state is
    # set so that the step's own update of it leaves the bias-corrected v̂ = v0 = 4. The
    # curvature each coordinate is stable up to, divided by Adam's preconditioner P as
    # `adam_preconditioner` reads it from the optimizer's state (√v0 + ε = 2), is the
    # preconditioned sharpness at the limit: 2(1 + β₁)/((1 - β₁)·lr), 38/lr at β₁ = 0.9
    # (Cohen et al. 2022).
    lr, beta2, v0 = 0.1, 0.999, 4.0
    curvatures = torch.logspace(-1, 4, 20_000, dtype=torch.float64)

    def adamw(x: torch.Tensor) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW([x], lr=lr, betas=(beta1, beta2), weight_decay=0.0, foreach=True)
        zeros = torch.zeros_like(x)
        # Late in training: the bias corrections 1 - βᵗ are 1 (early, 1/(1 - β₁ᵗ) multiplies
        # the step, a transient that would hide the limit within a few thousand steps).
        opt.state[x] = {"step": torch.tensor(1e4), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        return opt

    def freeze(opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        state = opt.state[x]
        t = float(state["step"]) + 1
        target = v0 * (1 - beta2**t)
        state["exp_avg_sq"].copy_((target - (1 - beta2) * x.grad.square()) / beta2)

    found = _largest_stable(adamw, curvatures, before_step=freeze)
    opt = adamw(torch.ones(1, dtype=torch.float64, requires_grad=True))
    x = next(iter(opt.state))
    opt.state[x]["step"].fill_(11_000)
    opt.state[x]["exp_avg_sq"].fill_(v0 * (1 - beta2**11_000))
    (preconditioner,) = adam_preconditioner(opt, [x])
    assert float(preconditioner) == pytest.approx(2.0, rel=1e-6)
    limit = stability_limit("adamw", lr, betas=(beta1, beta2))
    assert found / float(preconditioner) == pytest.approx(limit, rel=0.005)


def test_layerwise_optimizers_have_no_line_and_lr_must_be_positive():
    assert stability_limit("lars", 0.1, 0.9) is None
    assert stability_limit("lamb", 0.1) is None
    with pytest.raises(ValueError, match="positive"):
        stability_limit("sgd", 0.0)


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


def _net(norm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        InputNoise(seed=5),
        nn.Linear(4, 16),
        nn.BatchNorm1d(16) if norm else nn.Identity(),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    )


def _trajectory(measure: bool, norm: bool, steps: int = 4) -> tuple[dict, list[float]]:
    """SGD steps on a net with dropout, its own noise and optionally batch norm; optionally
    measuring the noise before each step and between its backward and its update (on batches
    of a generator of its own), and the sharpness after it."""
    net = _net(norm)
    noise = net[0].generator
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    data, own = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    measured: list[float] = []

    def measurement() -> None:
        x, y = torch.randn(16, 4, generator=own), torch.randint(0, 3, (16,), generator=own)
        hessian = torch.randn(16, 4, generator=own), torch.randint(0, 3, (16,), generator=own)
        moments = noise_moments(net, x, y, F.cross_entropy, 4, 7, hessian, 2, generators=[noise])
        measured.extend(moments)

    for step in range(steps):
        x = torch.randn(16, 4, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        if measure:
            measurement()
        F.cross_entropy(net(x), y).backward()
        if measure:
            grads = [p.grad.clone() for p in net.parameters()]
            measurement()
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
    return states, measured


@pytest.mark.parametrize("norm", [True, False], ids=["batch-norm", "per-example"])
def test_measuring_leaves_the_trajectory_bit_identical(norm):
    plain, _ = _trajectory(measure=False, norm=norm)
    measuring, measured = _trajectory(measure=True, norm=norm)
    assert len(measured) == 4 * 9
    assert all(math.isfinite(v) for v in measured)
    assert measured[1] > 0 and measured[8] > 0  # tr(Σ), the first sharpness: real measurements
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
    noise_moments(net, x, y, F.cross_entropy, 4, 0, (x, y), 2, generators=[net[0].generator])
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
