"""The noisy quadratic model's exact answer (lbs_tune.nqm): one-dimensional cases worked by hand,
the mean of seeded simulations of the update rule (written plainly here, and torch.optim.SGD
itself), the issue's own figures (d = 1000, h_i = 1/i), the stability limits, the validators."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.scaling import fit_scaling
from lbs_tune import nqm

# ============================================================================ By hand


def one_dimension(h=1.0, c=1.0, theta0=1.0) -> nqm.Quadratic:
    return nqm.Quadratic(np.array([h]), np.array([c]), np.array([theta0]))


def test_plain_sgd_in_one_dimension_by_hand():
    # h = 1, c = 1, B = 1, lr = 0.5, theta0 = 1: m' = (1 - 0.5)^2 m + 0.5^2 = m / 4 + 1 / 4, so
    # m = 1, 1/2, 3/8, 11/32 (closed form m_t = 1/3 + (2/3) 4^-t) and L = m / 2.
    q = one_dimension()
    assert nqm.expected_loss(q, 0.5, 1, 3) == pytest.approx([1 / 2, 1 / 4, 3 / 16, 11 / 64])
    assert nqm.expected_loss(q, 0.5, 1, 40)[-1] == pytest.approx(1 / 6 + (1 / 3) * 4.0**-40)
    # The first t with L <= 0.2 is 2 (3/16 = 0.1875); L never goes below the floor 1/6.
    assert nqm.steps_to_target(q, 0.2, 0.5, 1, 100) == 2
    assert nqm.steps_to_target(q, 0.16, 0.5, 1, 10**6) == math.inf
    # Evaluations every 3 steps see L_3 = 11/64 first; with max_steps 2, the last one is step 2.
    assert nqm.steps_to_target(q, 0.2, 0.5, 1, 100, every=3) == 3
    assert nqm.steps_to_target(q, 0.2, 0.5, 1, 2, every=3) == 2
    # lr = 1, B = 4: the mean is gone after one step, the variance is lr^2 c / B = 1/4 each step.
    assert nqm.expected_loss(q, 1.0, 4, 2) == pytest.approx([1 / 2, 1 / 8, 1 / 8])


def test_heavy_ball_and_nesterov_in_one_dimension_by_hand():
    # h = 1, c = 1, B = 1, lr = 0.5, mu = 0.5, theta0 = 1, buf0 = 0; xi_t the noises, N(0, 1).
    # Heavy ball (buf' = mu buf + g, theta' = theta - lr buf'):
    #   g0 = 1 + xi0, buf1 = 1 + xi0, theta1 = 1/2 - xi0/2                      E theta1^2 = 1/2
    #   g1 = 1/2 - xi0/2 + xi1, buf2 = 1 + xi1, theta2 = -(xi0 + xi1)/2          E theta2^2 = 1/2
    #   g2 = theta2 + xi2, buf3 = 1/2 - xi0/2 + xi2,
    #   theta3 = -1/4 - xi0/4 - xi1/2 - xi2/2            E theta3^2 = 1/16 + 1/16 + 1/4 + 1/4 = 5/8
    q = one_dimension()
    heavy = nqm.expected_loss(q, 0.5, 1, 3, momentum=0.5)
    assert heavy == pytest.approx([1 / 2, 1 / 4, 1 / 4, 5 / 16])
    # Nesterov (buf' = mu buf + g, theta' = theta - lr (g + mu buf')):
    #   theta1 = 1 - (3/4)(1 + xi0) = 1/4 - 3 xi0/4                              E = 10/16
    #   g1 = 1/4 - 3 xi0/4 + xi1, buf2 = 3/4 - xi0/4 + xi1,
    #   theta2 = theta1 - (g1 + buf2/2)/2 = -1/16 - 5 xi0/16 - 3 xi1/4   E = (1 + 25 + 144)/256
    nesterov = nqm.expected_loss(q, 0.5, 1, 2, momentum=0.5, nesterov=True)
    assert nesterov == pytest.approx([1 / 2, 5 / 16, 170 / 512])


# ============================================================================ Simulation


def simulate(q, lr, batch_size, steps, momentum, nesterov, weight_decay, runs, seed):
    """Losses (steps + 1, runs) of `runs` seeded runs of torch's SGD rule, written plainly."""
    rng = np.random.default_rng(seed)
    theta = np.tile(q.theta0, (runs, 1))
    buf = np.zeros_like(theta)
    losses = [0.5 * theta**2 @ q.h]
    for _ in range(steps):
        noise = rng.standard_normal(theta.shape) * np.sqrt(q.c / batch_size)
        g = (q.h + weight_decay) * theta + noise
        if momentum == 0:
            theta = theta - lr * g
        else:
            buf = momentum * buf + g
            theta = theta - lr * (g + momentum * buf if nesterov else buf)
        losses.append(0.5 * theta**2 @ q.h)
    return np.array(losses)


def largest_z(simulated: np.ndarray, exact: np.ndarray) -> float:
    """The largest |mean - exact| over steps 1.. (step 0 has no noise), in standard errors of the
    mean of the runs."""
    simulated, exact = simulated[1:], exact[1:]
    error = simulated.std(axis=1, ddof=1) / math.sqrt(simulated.shape[1])
    return float(np.max(np.abs(simulated.mean(axis=1) - exact) / error))


SMALL = nqm.quadratic(dim=8, power=1.0, scale=2.0, noise_scale=1.5, theta0=1.0)
CASES = [
    # (lr, batch size, momentum, nesterov, weight decay): rates from slow to near the limit
    (0.1, 1, 0.0, False, 0.0),
    (0.8, 4, 0.0, False, 0.0),
    (0.95, 64, 0.0, False, 0.01),
    (0.05, 1, 0.9, False, 0.0),
    (0.3, 8, 0.5, False, 0.0),
    (1.5, 64, 0.8, False, 0.01),
    (0.05, 1, 0.9, True, 0.0),
    (0.3, 8, 0.5, True, 0.0),
    (0.5, 64, 0.8, True, 0.01),
]


@pytest.mark.parametrize("lr,batch_size,momentum,nesterov,weight_decay", CASES)
def test_expected_loss_is_the_mean_of_simulations(lr, batch_size, momentum, nesterov, weight_decay):
    steps = 40
    exact = nqm.expected_loss(SMALL, lr, batch_size, steps, momentum, nesterov, weight_decay)
    runs = simulate(SMALL, lr, batch_size, steps, momentum, nesterov, weight_decay, 2000, seed=1)
    assert largest_z(runs, exact) < 4


def test_the_simulation_check_tells_the_rules_apart():
    # The same check rejects heavy ball's recurrence for Nesterov's runs and plain SGD's for heavy
    # ball's: it has the power to catch a wrong update rule.
    runs = simulate(SMALL, 0.3, 8, 40, 0.5, True, 0.0, 2000, seed=2)
    assert largest_z(runs, nqm.expected_loss(SMALL, 0.3, 8, 40, 0.5, nesterov=True)) < 4
    assert largest_z(runs, nqm.expected_loss(SMALL, 0.3, 8, 40, 0.5, nesterov=False)) > 10
    runs = simulate(SMALL, 0.3, 8, 40, 0.5, False, 0.0, 2000, seed=3)
    assert largest_z(runs, nqm.expected_loss(SMALL, 0.3, 8, 40, 0.0)) > 10


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.7, True)])
def test_expected_loss_is_the_mean_of_torch_sgd_runs(momentum, nesterov):
    # torch.optim.SGD itself on the quadratic, every run a row of one parameter, the noise added
    # to the gradient before each step: pins the semantics (first buffer, weight decay, Nesterov).
    runs, steps, lr, batch_size, weight_decay = 2000, 30, 0.2, 2, 0.05
    h, c = (torch.tensor(x) for x in (SMALL.h, SMALL.c))
    theta = torch.tensor(np.tile(SMALL.theta0, (runs, 1)), requires_grad=True)
    optimizer = torch.optim.SGD(
        [theta], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    generator = torch.Generator().manual_seed(4)
    losses = []
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = 0.5 * (h * theta**2).sum(dim=1)
        losses.append(loss.detach().numpy().copy())
        if step == steps:
            break
        loss.sum().backward()
        noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        theta.grad.add_(noise * torch.sqrt(c / batch_size))
        optimizer.step()
    exact = nqm.expected_loss(SMALL, lr, batch_size, steps, momentum, nesterov, weight_decay)
    assert largest_z(np.array(losses), exact) < 4


# ============================================================================ Steps to target


def first_at_evaluations(losses: np.ndarray, target: float, max_steps: int, every: int) -> float:
    """The first evaluation step with loss <= target, read off every step's expected loss."""
    for step in nqm.evaluation_steps(max_steps, every):
        if losses[step] <= target:
            return float(step)
    return math.inf


@pytest.mark.parametrize(
    "h,c,theta0,lr,momentum,nesterov,target",
    [
        # the loss falls to 0.0008 at step 2, then rises to a floor of 0.011: the dip is the reach
        ([1.0, 0.02], [0.0, 0.05], [1.0, 0.0], 0.9, 0.0, False, 0.003),
        # the loss rises first (a fast dimension fills with noise), then falls below the target
        ([1.0, 0.01], [0.5, 0.0], [0.0, 10.0], 0.9, 0.0, False, 0.3),
        # underdamped momentum: the loss oscillates on its way down (heavy ball, Nesterov)
        ([1.0, 0.1, 0.01], [1e-3, 1e-3, 1e-3], [1.0, 1.0, 1.0], 1.5, 0.9, False, 0.012),
        ([1.0, 0.1, 0.01], [1e-3, 1e-3, 1e-3], [1.0, 1.0, 1.0], 0.5, 0.9, True, 0.05),
    ],
)
def test_steps_to_target_is_the_first_evaluation_below_it(
    h, c, theta0, lr, momentum, nesterov, target
):
    q = nqm.Quadratic(*(np.array(x) for x in (h, c, theta0)))
    max_steps = 3000
    losses = nqm.expected_loss(q, lr, 1, max_steps, momentum, nesterov)
    assert np.any(np.diff(losses) > 0) and np.any(np.diff(losses) < 0)  # neither up nor down
    found = {}
    for every in (1, 3, 7, 50):
        found[every] = first_at_evaluations(losses, target, max_steps, every)
        got = nqm.steps_to_target(q, target, lr, 1, max_steps, momentum, nesterov, every=every)
        assert got == found[every]
    assert math.isfinite(found[1]) and len(set(found.values())) > 1


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_past_the_stability_limit_steps_are_inf(momentum, nesterov):
    q = nqm.quadratic(dim=20, power=1.0)
    limit = nqm.stability_limit(q.h.max(), momentum, nesterov)
    # The limit is where the update matrix of the top dimension reaches spectral radius 1.
    a11 = 1 - limit * (1 + momentum if nesterov else 1)
    a12 = -limit * momentum**2 if nesterov else -limit * momentum
    radius = np.abs(np.linalg.eigvals([[a11, a12], [1.0, momentum]])).max()
    assert radius == pytest.approx(1.0)
    target = 1e-3 * nqm.initial_loss(q)
    below = nqm.steps_to_target(q, target, 0.95 * limit, 1e6, 10**5, momentum, nesterov)
    assert math.isfinite(below)
    for lr in (1.001 * limit, limit, 10 * limit):
        assert nqm.steps_to_target(q, target, lr, 1e6, 10**5, momentum, nesterov) == math.inf
    losses = nqm.expected_loss(q, 1.01 * limit, 1e6, 3000, momentum, nesterov)
    assert losses[300] > 1e3 * losses[0] and losses[-1] > losses[300]  # it grows without bound
    beyond = nqm.best_rate(q, target, 1e6, (limit, 10 * limit), 10**5, momentum, nesterov)
    assert beyond.steps == math.inf and math.isnan(beyond.lr)


# ============================================================================ Best rate


def test_best_rate_is_the_best_of_its_grid_and_refinement_only_improves_it():
    q = nqm.quadratic(dim=30, power=1.2, noise_scale=2.0)
    target = 0.02 * nqm.initial_loss(q)
    rates = np.geomspace(1e-3, 3.0, 40)
    for momentum, nesterov in ((0.0, False), (0.8, False), (0.8, True)):
        rule = (momentum, nesterov, 0.0, 5)  # evaluations every 5 steps
        each = [nqm.steps_to_target(q, target, lr, 4, 2000, *rule) for lr in rates]
        best = nqm.best_rate(q, target, 4, (1e-3, 3.0), 2000, *rule, grid=40, refine=0)
        assert best.steps == min(each)
        assert best.lr == pytest.approx(rates[int(np.argmin(each))], rel=1e-12)
        assert best.momentum == momentum
        refined = nqm.best_rate(q, target, 4, (1e-3, 3.0), 2000, *rule, grid=40)
        assert refined.steps <= best.steps and refined.steps % 5 == 0
        assert nqm.steps_to_target(q, target, refined.lr, 4, 2000, *rule) == refined.steps


def test_a_momentum_range_is_searched_with_the_rate():
    # Zhang et al.'s finding: momentum pays at large batch sizes, hardly at small ones. The joint
    # search is at least as good as the best of its grid: each momentum of the range's grid.
    q = nqm.quadratic(dim=10, power=1.0)
    grid = np.linspace(0.0, 0.95, nqm.MOMENTUM_GRID)
    for batch_size, fraction, pays in ((1e4, 1e-4, True), (1, 1e-2, False)):
        target = fraction * nqm.initial_loss(q)
        search = (q, target, batch_size, (1e-3, 5.0), 10**5)
        joint = nqm.best_rate(*search, nqm.Uniform(0.0, 0.95), grid=40)
        assert 0.0 <= joint.momentum <= 0.95
        for momentum in grid[[10, 18]]:  # 0.5, 0.9
            assert joint.steps <= nqm.best_rate(*search, momentum, grid=40, refine=0).steps
        plain = nqm.best_rate(*search, grid=40).steps
        assert joint.steps < 0.7 * plain if pays else 0.95 * plain <= joint.steps <= plain
    listed = nqm.best_rate(*search, [0.0, 0.5], grid=40, refine=0)
    assert listed.momentum in (0.0, 0.5)


def test_the_issues_own_figures():
    # d = 1000, h_i = 1/i, C = H, theta0 = 1, target 1% of the initial loss, plain SGD, best of
    # 200 rates: the grid np.geomspace(1e-3, 1.99, 200) gives the issue's integers exactly (each
    # best rate reaches the target with a margin >= 2e-6 of it, far above rounding).
    q = nqm.quadratic(dim=1000, power=1.0)
    target = 0.01 * nqm.initial_loss(q)
    batch_sizes = [2**k for k in range(14)]  # 1 .. 8192
    curve = nqm.exact_steps(batch_sizes, q, target, (1e-3, 1.99), 10**6, refine=0)
    steps = dict(zip(batch_sizes, (best.steps for best in curve), strict=True))
    assert [steps[b] for b in (1, 16, 128, 8192)] == [90_323, 5_801, 963, 452]
    fit = fit_scaling(batch_sizes, list(steps.values()), resamples=0)
    assert fit.b_crit == pytest.approx(201, abs=1)
    # The best rate itself (refined between grid points) needs a few steps fewer at most.
    refined = nqm.best_rate(q, target, 8192, (1e-3, 1.99), 10**6)
    assert 440 <= refined.steps <= 452


# ============================================================================ Inputs


def test_exact_problem_says_which_optimizers_have_no_closed_form():
    assert nqm.exact_problem("sgd") is None
    assert "simulated only" in nqm.exact_problem("adamw")
    assert nqm.exact_problem("lars") and nqm.exact_problem("lamb")
    assert nqm.exact_problem("sgd", decay="cosine") and nqm.exact_problem("sgd", warmup=1.0)


@pytest.mark.parametrize(
    "arguments,key",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"dim": 10, "scale": 0.0}, "scale"),
        ({"values": [1.0, 0.0]}, "values"),
        ({"values": [1.0, -2.0]}, "values"),
        ({"values": []}, "values"),
        ({"dim": 3, "noise": [1.0, -1.0, 0.0]}, "noise"),
        ({"dim": 3, "noise": [1.0, 1.0]}, "noise"),
        ({"dim": 3, "noise_scale": -1.0}, "noise_scale"),
        ({"dim": 3, "theta0": [1.0, 2.0]}, "theta0"),
        ({"dim": 3, "theta0": math.nan}, "theta0"),
        ({"dim": 3, "target": 0.0}, "target"),
        ({"dim": 3, "target": -1.0}, "target"),
        ({"dim": 3, "target": 0.5 * (1 + 1 / 2 + 1 / 3)}, "target"),  # the initial loss
        ({"dim": 3, "theta0": 0.0, "target": 0.1}, "target"),  # starts at the optimum
    ],
)
def test_bad_inputs_are_named(arguments, key):
    found = nqm.problems(**arguments)
    assert [k for k, _ in found] == [key]
    if key != "target":
        with pytest.raises(ValueError, match=key):
            nqm.quadratic(**arguments)


def test_good_inputs_pass():
    assert nqm.problems(dim=1000, power=1.0, target=0.01) == []
    assert nqm.problems(values=[3.0, 1.0], noise=[0.0, 2.0], theta0=[1.0, -1.0], target=1.0) == []
    q = nqm.quadratic(dim=4, power=2.0, scale=3.0, noise_scale=0.5, theta0=[1.0, 2.0, 0.0, 1.0])
    assert q.h == pytest.approx([3.0, 3 / 4, 3 / 9, 3 / 16])
    assert q.c == pytest.approx(0.5 * q.h)
    assert nqm.problems(dim=3, noise=[1.0, -1.0, 0.0]) == [
        ("noise", "every noise variance must be finite and >= 0, not -1")
    ]
    assert nqm.initial_loss(q) == pytest.approx(0.5 * (3.0 + 3.0 + 0.0 + 3 / 16))


def test_the_benchmark_runs_at_a_tiny_size(capsys):
    # benchmarks/nqm.py times the exact answer; here it only has to run and print its lines.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "nqm.py"
    spec = importlib.util.spec_from_file_location("nqm_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dim", "20", "--repeat", "1", "--only", "plain_grid,nesterov_0.9"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["case"] for line in lines] == ["plain_grid", "nesterov_0.9"]
    assert len(lines[0]["steps"]) == 14 and all(s > 0 for s in lines[1]["steps"].values())
