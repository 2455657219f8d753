"""The noisy quadratic model's exact answer (Zhang et al. 2019, "Which algorithmic choices matter
at which batch sizes? Insights from a noisy quadratic model", NeurIPS): the expected loss of SGD
step by step, the steps to a target, the best learning rate per batch size, the exact S(B) curve.

The model, per dimension i = 1..d (every dimension is independent of the others):

    L(theta) = 1/2 sum_i h_i theta_i^2,    g_t = (h_i + wd) theta_t + xi_t,    xi_t ~ N(0, c_i / B)

with curvatures h_i > 0, per-example gradient-noise variances c_i >= 0 (a batch of B averages B
independent examples: variance c_i / B), theta_0 given and fixed, and `wd` the optimizer's weight
decay (torch adds wd * theta to the gradient; the loss stays the one above). The optimizer is
torch.optim.SGD exactly (dampening 0, momentum buffer starting at 0, so its first step sets the
buffer to g, which is mu * 0 + g):

    plain     (mu = 0):  theta' = theta - lr g
    heavy ball:          buf' = mu buf + g,  theta' = theta - lr buf'
    Nesterov:            buf' = mu buf + g,  theta' = theta - lr (g + mu buf')

Each is linear in x = (theta, buf) with the noise added once per step, x' = A x + b xi, where
(a = lr (h_i + wd))

    heavy ball (plain: mu = 0):  A = [[1 - a, -lr mu], [h_i + wd, mu]],  b = (-lr, 1)
    Nesterov:  A = [[1 - a (1 + mu), -lr mu^2], [h_i + wd, mu]],  b = (-lr (1 + mu), 1)

(Nesterov: theta' = theta - lr (g + mu (mu buf + g)) = theta - lr ((1 + mu) g + mu^2 buf), so its
noise enters theta with weight lr (1 + mu).) The noise is zero-mean and independent of x, so the
second moments S = (p, q, r) = (E theta^2, E theta buf, E buf^2) follow S' = A S A^T + b b^T c/B:

    p' = A11^2 p + 2 A11 A12 q + A12^2 r                     + b1^2   c/B
    q' = A11 A21 p + (A11 A22 + A12 A21) q + A12 A22 r       + b1 b2  c/B
    r' = A21^2 p + 2 A21 A22 q + A22^2 r                     + b2^2   c/B

from S_0 = (theta_0^2, 0, 0), and E[L_t] = 1/2 sum_i h_i p_{i,t}. For plain SGD this is
Zhang et al.'s m_{t+1} = (1 - a)^2 m_t + lr^2 c / B, whose closed form, with rho = (1 - a)^2, is

    m_t = rho^t theta_0^2 + lr^2 (c/B) (1 - rho^t) / (1 - rho)     (the fraction is t at rho = 1)

the first term the squared mean (falling for a stable rate), the second the variance of the noise
accumulated so far (rising). A rate is stable when every dimension's A has spectral radius < 1
(the second moments' map has eigenvalues lambda_j lambda_k, so they are stable together); by
Jury's test that is 0 < lr (h_max + wd) < 2 for plain SGD, 2 (1 + mu) for heavy ball and
2 (1 + mu) / (1 + 2 mu) for Nesterov (`stability_limit`). Past it the expected loss grows without
bound and the steps to target are inf: such a rate never solves the problem, whatever the loss
does in its first steps.

Steps to target count only evaluation steps, as the training loop measures them: the multiples of
`every` up to `max_steps`, and `max_steps` itself (the loop's last evaluation). Plain SGD uses the
closed form and a search over intervals of evaluation steps that skips an interval when a lower
bound of the loss on it (the squared mean at its end plus the variance at its start) is above the
target: exact, and about log2(max_steps / every) evaluations of d terms per rate. Momentum steps
the mean and the variance part of the second moments from evaluation to evaluation (the map of
`every` steps, by squaring), many rates at once; it drops a rate once its variance part alone is
above the target (that part only grows), and stops at the first evaluation where any rate reaches
the target when only the best is asked for: its cost grows as rates x d x evaluations
(benchmarks/nqm.py). Adam(W), LAMB and LARS have no such closed form (`exact_problem`).

E[L_t] is the mean over runs. One run's loss fluctuates about it, and its first evaluation under
the target comes early when the fluctuation is large against the loss's fall: measured steps
match the exact ones where the loss is a sum of many comparable terms (a flat spectrum, large d).

numpy only: no torch, no scipy, no I/O, no Ray; `analysis` imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Candidates (rates x dimensions) stepped together by the momentum path: ~20 MB of state.
CHUNK = 200_000
# A dense grid of learning rates, then rounds of a finer grid between the best one's neighbours.
GRID = 200
REFINE_ROUNDS = 3
REFINE_POINTS = 21
# Momenta tried over a range (then refined like the rates).
MOMENTUM_GRID = 20


class Quadratic(NamedTuple):
    """A noisy quadratic: curvatures `h` (d,) > 0, per-example gradient-noise variances `c` (d,)
    >= 0 (a batch of B has variance c / B), starting point `theta0` (d,)."""

    h: np.ndarray
    c: np.ndarray
    theta0: np.ndarray


class Uniform(NamedTuple):
    """A range of momenta searched uniformly between `low` and `high` (both in [0, 1))."""

    low: float
    high: float


class Best(NamedTuple):
    """The best rate found: learning rate, momentum, and its steps to target (inf: none reached
    the target within max_steps; then lr and momentum are NaN)."""

    lr: float
    momentum: float
    steps: float


# ============================================================================ Problem


def quadratic(
    dim: int | None = None,
    power: float = 1.0,
    scale: float = 1.0,
    values: Sequence[float] | None = None,
    noise_scale: float = 1.0,
    noise: Sequence[float] | None = None,
    theta0: float | Sequence[float] = 1.0,
) -> Quadratic:
    """The quadratic of a spectrum: h_i = scale * i^-power for i = 1..dim, or the given curvature
    `values`; c = noise_scale * h (noise covariance proportional to the Hessian, as in Zhang et
    al.), or the given `noise` variances; theta0 one value for every dimension or one per
    dimension. Raises ValueError naming the problems (see `problems`)."""
    found = problems(dim, power, scale, values, noise_scale, noise, theta0)
    if found:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in found))
    return _build(dim, power, scale, values, noise_scale, noise, theta0)


def _build(dim, power, scale, values, noise_scale, noise, theta0) -> Quadratic:
    if values is not None:
        h = np.asarray(values, dtype=float)
    else:
        h = scale * np.arange(1, dim + 1, dtype=float) ** -float(power)
    c = noise_scale * h if noise is None else np.asarray(noise, dtype=float)
    return Quadratic(h, c, np.broadcast_to(np.asarray(theta0, dtype=float), h.shape).copy())


def problems(
    dim: int | None = None,
    power: float = 1.0,
    scale: float = 1.0,
    values: Sequence[float] | None = None,
    noise_scale: float = 1.0,
    noise: Sequence[float] | None = None,
    theta0: float | Sequence[float] = 1.0,
    target: float | None = None,
) -> list[tuple[str, str]]:
    """What is wrong with a quadratic (the arguments of `quadratic`) and a target loss, as
    (key, message) pairs, the key one of the argument names; [] when all holds: dim >= 1 (or
    `values` given, non-empty), every curvature finite and > 0, power finite, scale > 0,
    noise_scale and every noise variance finite and >= 0, noise and a per-dimension theta0 of
    length d, theta0 finite, and 0 < target < the initial loss 1/2 sum h theta0^2."""
    found: list[tuple[str, str]] = []
    d = None
    if values is not None:
        h = np.asarray(values, dtype=float).ravel()
        if h.size == 0:
            found.append(("values", "give at least one curvature"))
        elif not np.all(np.isfinite(h) & (h > 0)):
            found.append(
                ("values", f"every curvature must be finite and > 0, not {_bad(h, h > 0)}")
            )
        else:
            d = h.size
    else:
        if dim is None or int(dim) != dim or dim < 1:
            found.append(("dim", f"the dimension must be an integer >= 1, got {dim}"))
        if not math.isfinite(power):
            found.append(("power", f"the power must be finite, got {power}"))
        if not (math.isfinite(scale) and scale > 0):
            found.append(
                ("scale", f"the scale of the curvatures must be finite and > 0, got {scale}")
            )
        if not found:
            d = int(dim)
            h = scale * np.arange(1, d + 1, dtype=float) ** -float(power)
            if not np.all(np.isfinite(h) & (h > 0)):
                found.append(("power", f"scale * i^-{power} leaves the floats for i <= {d}"))
                d = None
    if noise is not None:
        c = np.asarray(noise, dtype=float).ravel()
        if not np.all(np.isfinite(c) & (c >= 0)):
            found.append(
                ("noise", f"every noise variance must be finite and >= 0, not {_bad(c, c >= 0)}")
            )
        elif d is not None and c.size != d:
            found.append(("noise", f"give one variance per dimension ({d}), got {c.size}"))
    elif not (math.isfinite(noise_scale) and noise_scale >= 0):
        found.append(("noise_scale", f"the noise scale must be finite and >= 0, got {noise_scale}"))
    start = np.asarray(theta0, dtype=float).ravel()
    if not np.all(np.isfinite(start)):
        found.append(("theta0", "every starting value must be finite"))
    elif start.size != 1 and d is not None and start.size != d:
        found.append(("theta0", f"give one value, or one per dimension ({d}), got {start.size}"))
    if target is not None and not found:
        start_loss = initial_loss(_build(dim, power, scale, values, noise_scale, noise, theta0))
        if not (math.isfinite(target) and 0 < target < start_loss):
            found.append(
                ("target", f"the target loss must lie in (0, {start_loss:.6g}), the initial loss")
            )
    return found


def _bad(values: np.ndarray, ok: np.ndarray) -> str:
    """The first value of `values` that is not finite or not `ok`, for a message."""
    return f"{values[~(np.isfinite(values) & ok)][0]:g}"


def initial_loss(q: Quadratic) -> float:
    """L(theta_0) = 1/2 sum h theta0^2."""
    return float(0.5 * np.sum(q.h * q.theta0**2))


def stability_limit(
    h_max: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
) -> float:
    """The learning rate at which SGD stops being stable on a quadratic of top curvature `h_max`:
    2 / h for plain SGD, 2 (1 + mu) / h for heavy ball, 2 (1 + mu) / ((1 + 2 mu) h) for
    Nesterov, with h = h_max + weight_decay. Stable rates lie strictly below it."""
    return sgd_stability_factor(momentum, nesterov) / (h_max + weight_decay)


def sgd_stability_factor(momentum: float = 0.0, nesterov: bool = False) -> float:
    """The largest lr x curvature on which PyTorch's SGD is stable on a quadratic: 2 plain,
    2 (1 + mu) with heavy-ball momentum mu, 2 (1 + mu) / (1 + 2 mu) with Nesterov's."""
    mu = float(momentum)
    return 2 * (1 + mu) / (1 + 2 * mu) if nesterov else 2 * (1 + mu)


def exact_problem(
    optimizer: str,
    decay: str = "constant",
    warmup: float = 0.0,
    clip: float | None = None,
    schedule: bool = False,
    start: bool = False,
) -> str | None:
    """Why the NQM has no exact answer for this training (say "simulated only"), or None when
    it has: SGD (plain, heavy ball, Nesterov) at a constant learning rate, from theta0, at one
    batch size, unclipped. `clip`: the gradient norm clipped to; `schedule`: the batch changes
    during the run; `start`: it starts from another run's weights."""
    if optimizer != "sgd":
        return f"{optimizer} has no closed form on the noisy quadratic (simulated only)"
    if decay != "constant" or warmup:
        return "the exact answer is for a constant learning rate, without warmup or decay"
    if clip is not None:
        return "a clipped gradient norm has no closed form on the noisy quadratic (simulated only)"
    if schedule:
        return (
            "the exact answer is for one batch size per run, not a batch schedule (simulated only)"
        )
    if start:
        return "the exact answer starts from theta0, not from another run's weights (start_from)"
    return None


# ============================================================================ Expected loss


def expected_loss(
    q: Quadratic,
    lr: float,
    batch_size: float,
    steps: int,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    every: int = 1,
) -> np.ndarray:
    """E[L(theta_t)] at t = 0, every, 2 every, ..., <= steps (the recurrences in the module's
    docstring), as a float array; past the stability limit it grows without bound, to inf once
    past the floats."""
    t = np.arange(0, int(steps) + 1, int(every))
    s = q.c / batch_size
    if momentum == 0:
        plain = _Plain(q, lr, s, weight_decay)
        out = np.empty(t.size)
        block = max(1, CHUNK // q.h.size)
        for start in range(0, t.size, block):
            out[start : start + block] = plain.loss(t[start : start + block])
    else:
        moments = _Moments(q, np.array([lr]), np.array([momentum]), nesterov, s, weight_decay)
        out = [initial_loss(q)]
        for _ in range(t.size - 1):
            moments.advance(int(every))
            out.append(float(moments.losses()[0][0]))
        out = np.array(out)
    # NaN only comes of inf - inf once the moments overflow: the loss itself is past the floats.
    return np.where(np.isnan(out), math.inf, out)


class _Plain:
    """Plain SGD's closed form at one rate: E[L_t] = sum wm rho^t + sum wv (1 - rho^t), the
    squared mean (falling when stable) plus the variance (rising), per dimension."""

    def __init__(self, q: Quadratic, lr: float, s: np.ndarray, weight_decay: float):
        a = lr * (q.h + weight_decay)
        with np.errstate(divide="ignore"):
            self.log_rho = 2 * np.log(np.abs(1 - a))  # -inf where a = 1: rho = 0
        self.mean = 0.5 * q.h * q.theta0**2
        noise = 0.5 * q.h * lr**2 * s
        # (1 - rho^t) / (1 - rho) written with expm1, exact near rho = 1; rho = 1 (a = 2) is t.
        self.flat = self.log_rho == 0
        denominator = -np.expm1(np.where(self.flat, -1.0, self.log_rho))
        self.noise = np.where(self.flat, noise, noise / denominator)

    def _terms(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rho^t and (1 - rho^t)/(1 - rho) (t where rho = 1) for each t (rows) and dimension."""
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.outer(t, self.log_rho)
            x[np.asarray(t) == 0] = 0.0  # rho^0 = 1, also where rho = 0
            power = np.exp(x)
            rise = np.where(self.flat, np.asarray(t, float)[:, None], -np.expm1(x))
        return power, rise

    def loss(self, t: np.ndarray) -> np.ndarray:
        power, rise = self._terms(t)
        with np.errstate(over="ignore", invalid="ignore"):
            return power @ self.mean + rise @ self.noise

    def bound(self, early: int, late: int) -> float:
        """A lower bound of E[L_t] for 1 <= early <= t <= late at a stable rate: the squared mean
        at `late` plus the variance at `early`; the loss itself when early == late."""
        rise = -np.expm1(early * self.log_rho)
        return float(self.mean @ np.exp(late * self.log_rho) + self.noise @ rise)


# ============================================================================ Steps to target


def evaluation_steps(max_steps: int, every: int = 1) -> np.ndarray:
    """The steps at which the training loop evaluates: every, 2 every, ... <= max_steps, and
    max_steps itself."""
    steps = np.arange(every, max_steps + 1, every)
    if steps.size == 0 or steps[-1] != max_steps:
        steps = np.append(steps, max_steps)
    return steps


def steps_to_target(
    q: Quadratic,
    target: float,
    lr: float,
    batch_size: float,
    max_steps: int,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    every: int = 1,
) -> float:
    """The first evaluation step (`evaluation_steps`) at which E[L_t] <= target, as a float;
    inf when no evaluation up to max_steps reaches it or when `lr` is at or past the stability
    limit (the expected loss grows without bound there). Never raises for a rate."""
    steps = _first_steps(
        q,
        target,
        np.array([lr], dtype=float),
        np.array([momentum], dtype=float),
        nesterov,
        q.c / batch_size,
        weight_decay,
        evaluation_steps(int(max_steps), int(every)),
        first_only=False,
    )
    return float(steps[0])


def _stable(q, lrs, momenta, nesterov, weight_decay) -> np.ndarray:
    limits = np.array(
        [stability_limit(q.h.max(), mu, nesterov, weight_decay) for mu in momenta], dtype=float
    )
    return (lrs > 0) & (lrs < limits)


def _first_steps(
    q: Quadratic,
    target: float,
    lrs: np.ndarray,
    momenta: np.ndarray,
    nesterov: bool,
    s: np.ndarray,
    weight_decay: float,
    evals: np.ndarray,
    first_only: bool,
    cap: float = math.inf,
) -> np.ndarray:
    """Steps to target of each candidate (lrs[k], momenta[k]), inf for none. With `first_only`,
    only the candidates at the fewest steps get their steps (the others inf), and none is
    searched past `cap` steps: what a search for the best needs."""
    out = np.full(lrs.size, math.inf)
    stable = _stable(q, lrs, momenta, nesterov, weight_decay)
    last = int(np.searchsorted(evals, cap, side="right")) - 1  # the last evaluation <= cap
    plain = stable & (momenta == 0)
    for k in np.flatnonzero(plain):
        index = _first_plain(_Plain(q, lrs[k], s, weight_decay), target, evals, last)
        if index is not None:
            out[k] = evals[index]
            if first_only:
                last = index
    rest = np.flatnonzero(stable & ~plain)
    block = max(1, CHUNK // q.h.size)
    for start in range(0, rest.size, block):
        pick = rest[start : start + block]
        found = _first_momentum(
            q, target, lrs[pick], momenta[pick], nesterov, s, weight_decay, evals, last, first_only
        )
        out[pick] = found
        if first_only and np.isfinite(found).any():
            last = int(np.searchsorted(evals, found.min()))
    if first_only and np.isfinite(out).any():
        out[out > out.min()] = math.inf
    return out


def _first_plain(plain: _Plain, target: float, evals: np.ndarray, last: int) -> int | None:
    """The first index j <= last with E[L at evals[j]] <= target, or None: intervals of indices
    searched left first, each skipped when its lower bound (`_Plain.bound`) is above target."""
    stack = [(0, last)] if last >= 0 else []
    while stack:
        low, high = stack.pop()
        if plain.bound(int(evals[low]), int(evals[high])) > target:
            continue
        if low == high:
            return low
        middle = (low + high) // 2
        stack.append((middle + 1, high))
        stack.append((low, middle))
    return None


def _first_momentum(
    q, target, lrs, momenta, nesterov, s, weight_decay, evals, last, first_only
) -> np.ndarray:
    """Steps to target of stable candidates with momentum, by stepping their moments from
    evaluation to evaluation, all candidates at once; stops at evaluation `last`, and with
    `first_only` at the first evaluation where any candidate reaches the target. A candidate
    whose variance part alone is above the target is dropped: it only grows, so that candidate
    never reaches the target."""
    out = np.full(lrs.size, math.inf)
    moments = _Moments(q, lrs, momenta, nesterov, s, weight_decay)
    alive = np.arange(lrs.size)  # the candidate of each row of `moments`
    active = np.ones(lrs.size, bool)  # rows neither at the target nor dropped yet
    steps_done = 0
    for index in range(last + 1):
        moments.advance(int(evals[index]) - steps_done)
        steps_done = int(evals[index])
        loss, noise = moments.losses()
        hit = active & (loss <= target)
        out[alive[hit]] = steps_done
        if first_only and hit.any():
            break
        active &= ~hit & (noise <= target)
        if not active.any():
            break
        if active.sum() < 0.75 * active.size:  # copying the state pays once a quarter is gone
            moments.keep(active)
            alive, active = alive[active], active[active]
    return out


class _Moments:
    """The moments of (theta, buf) per candidate (lrs[k], momenta[k]) and dimension, split into
    the mean x = (E theta, E buf), deterministic, x' = A x, and the variance part S = (p, q, r)
    of the second moments, started at 0, S' = M S + n (the module docstring's map), so that
    E theta^2 = (E theta)^2 + p. The variance part only grows, which bounds the loss from below.
    Arrays: x (2, k, d), S (3, k, d), A (2, 2, k, d), M (3, 3, k, d), n (3, k, d)."""

    def __init__(self, q, lrs, momenta, nesterov, s, weight_decay):
        self.h = q.h
        lr, mu = lrs[:, None], momenta[:, None]
        hw = (q.h + weight_decay)[None, :]
        ones = np.ones((lrs.size, q.h.size))
        if nesterov:
            a11, a12, b1 = 1 - lr * hw * (1 + mu), -lr * mu**2 * ones, -lr * (1 + mu) * ones
        else:
            a11, a12, b1 = 1 - lr * hw, -lr * mu * ones, -lr * ones
        a21, a22, b2 = hw * ones, mu * ones, ones
        a = np.array([[a11, a12], [a21, a22]])
        m = np.array(
            [
                [a11 * a11, 2 * a11 * a12, a12 * a12],
                [a11 * a21, a11 * a22 + a12 * a21, a12 * a22],
                [a21 * a21, 2 * a21 * a22, a22 * a22],
            ]
        )
        self.step = (a, m, np.array([b1 * b1, b1 * b2, b2 * b2]) * s)
        self.mean = np.array([q.theta0 * ones, 0 * ones])
        self.var = np.zeros((3, lrs.size, q.h.size))
        self.maps: dict[int, tuple] = {}  # the map of `gap` steps, for each gap met

    def advance(self, gap: int) -> None:
        """Move every candidate `gap` optimizer steps on."""
        if gap not in self.maps:
            self.maps[gap] = _power(self.step, gap)
        a, m, n = self.maps[gap]
        with np.errstate(over="ignore", invalid="ignore"):
            self.mean = np.einsum("ijkd,jkd->ikd", a, self.mean)
            self.var = np.einsum("ijkd,jkd->ikd", m, self.var) + n

    def losses(self) -> tuple[np.ndarray, np.ndarray]:
        """E[L] of each candidate now, and its variance part (which never falls)."""
        with np.errstate(over="ignore", invalid="ignore"):
            noise = 0.5 * (self.var[0] @ self.h)
            return 0.5 * (self.mean[0] ** 2 @ self.h) + noise, noise

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the candidates of the boolean mask `rows`."""
        self.step = tuple(x[..., rows, :] for x in self.step)
        self.mean, self.var = self.mean[:, rows], self.var[:, rows]
        self.maps = {gap: tuple(x[..., rows, :] for x in map_) for gap, map_ in self.maps.items()}


def _power(step, steps: int):
    """The map (A, M, n) of one step composed `steps` times, by squaring."""
    result, one = None, step
    with np.errstate(over="ignore", invalid="ignore"):
        while steps:
            if steps & 1:
                result = one if result is None else _compose(one, result)
            steps >>= 1
            if steps:
                one = _compose(one, one)
    return result


def _compose(outer, inner):
    """The map `outer` after `inner`: (Ao Ai, Mo Mi, Mo ni + no)."""
    ao, mo, no = outer
    ai, mi, ni = inner
    return (
        np.einsum("ijkd,jlkd->ilkd", ao, ai),
        np.einsum("ijkd,jlkd->ilkd", mo, mi),
        np.einsum("ijkd,jkd->ikd", mo, ni) + no,
    )


# ============================================================================ Best rate


def best_rate(
    q: Quadratic,
    target: float,
    batch_size: float,
    lr_range: tuple[float, float],
    max_steps: int,
    momentum: float | Sequence[float] | Uniform = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    every: int = 1,
    grid: int = GRID,
    refine: int = REFINE_ROUNDS,
) -> Best:
    """The learning rate (log-uniform over `lr_range` = (low, high), as a sweep's search space
    gives it) and momentum (a fixed value, a list of values, or a `Uniform` range searched
    jointly; each in [0, 1)) with the fewest steps to target at `batch_size`.

    `grid` rates log-spaced over the range (with `grid` = 1: low alone) times each momentum of
    the list or MOMENTUM_GRID momenta spaced over the range; then `refine` rounds of a
    REFINE_POINTS grid between the neighbours of the best candidates (the span of all tied at the
    fewest steps, widened by one grid step each side, within the ranges; a range of momenta is
    refined the same way). Returns the candidate with the fewest steps (among ties, the lowest
    momentum, then the lowest rate, of the grid where those steps were first met), or
    Best(nan, nan, inf) when none reaches the target. A grid search: a range of momenta comes
    out at least as good as the best of its grid, not always as good as every momentum in it.
    """
    low, high = (float(x) for x in lr_range)
    if not 0 < low <= high:
        raise ValueError(f"lr_range is (low, high) with 0 < low <= high, got {lr_range}")
    if isinstance(momentum, Uniform):
        momenta = np.linspace(momentum.low, momentum.high, MOMENTUM_GRID)
        mu_bounds = (float(momentum.low), float(momentum.high))
    else:
        momenta = np.unique(np.atleast_1d(np.asarray(momentum, dtype=float)))
        mu_bounds = None
    if not np.all((momenta >= 0) & (momenta < 1)):
        raise ValueError(f"momenta lie in [0, 1), got {momentum}")
    evals = evaluation_steps(int(max_steps), int(every))
    s = q.c / batch_size
    log_rates = np.linspace(math.log(low), math.log(high), grid)
    best = Best(math.nan, math.nan, math.inf)
    for round_ in range(refine + 1):
        # Momentum-major: a chunk of candidates spans every rate, so the first sets the cap.
        rates, mus = np.meshgrid(np.exp(log_rates), momenta)
        found = _first_steps(
            q,
            target,
            rates.ravel(),
            mus.ravel(),
            nesterov,
            s,
            weight_decay,
            evals,
            first_only=True,
            cap=best.steps,
        ).reshape(rates.shape)
        if found.min() < best.steps:
            j, i = np.unravel_index(np.argmin(found), found.shape)
            best = Best(float(rates[j, i]), float(mus[j, i]), float(found.min()))
        if not np.isfinite(best.steps) or round_ == refine:
            break
        tied = np.argwhere(found == best.steps)  # (momentum, rate) index pairs
        if tied.size == 0:  # this round found nothing as good: refine around the best again
            nearest_mu = np.argmin(np.abs(momenta - best.momentum))
            nearest_rate = np.argmin(np.abs(log_rates - math.log(best.lr)))
            tied = np.array([[nearest_mu, nearest_rate]])
        log_rates = _finer(log_rates, tied[:, 1], (math.log(low), math.log(high)))
        if mu_bounds is not None:
            momenta = _finer(momenta, tied[:, 0], mu_bounds)
    return best


def _finer(points: np.ndarray, picked: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """REFINE_POINTS points spanning the picked grid points widened by one grid step each side,
    within bounds (the points themselves when there is only one)."""
    if points.size == 1:
        return points
    first, last = max(picked.min() - 1, 0), min(picked.max() + 1, points.size - 1)
    return np.linspace(max(points[first], bounds[0]), min(points[last], bounds[1]), REFINE_POINTS)


def exact_steps(
    batch_sizes: Sequence[float],
    q: Quadratic,
    target: float,
    lr_range: tuple[float, float],
    max_steps: int | Sequence[int],
    momentum: float | Sequence[float] | Uniform = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    every: int | Sequence[int] = 1,
    grid: int = GRID,
    refine: int = REFINE_ROUNDS,
) -> list[Best]:
    """The exact S(B) curve: `best_rate` at each batch size, in order; `max_steps` and `every`
    one value for all or one per batch size (a trial's budget and evaluation interval in steps,
    as the training loop computes them for that batch size). Fit it with
    analysis.scaling.fit_scaling(batch_sizes, [best.steps for best in result])."""
    n = len(batch_sizes)
    budgets = [max_steps] * n if np.ndim(max_steps) == 0 else list(max_steps)
    intervals = [every] * n if np.ndim(every) == 0 else list(every)
    if len(budgets) != n or len(intervals) != n:
        raise ValueError(f"give max_steps and every once, or once per batch size ({n})")
    return [
        best_rate(q, target, b, lr_range, m, momentum, nesterov, weight_decay, e, grid, refine)
        for b, m, e in zip(batch_sizes, budgets, intervals, strict=True)
    ]
