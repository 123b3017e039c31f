"""Balancers against independent implementations (torchjd 0.18.0, the papers' vector-space
definitions, exact solvers written here), at the edges: nearly parallel gradients, one reward
opposing the rest, norms over six orders of magnitude, zero rows, inactive rewards, and the
independence of every answer from the solver's history."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.balancing import MinNormQP, balance
from marble_kit.registry import build, registry_from_plugins
from marble_plugins.balancers import cagrad, marble, mgda, pcgrad, upgrad, weighted_sum
from marble_plugins.balancers.cagrad import cagrad_weights
from marble_plugins.balancers.pcgrad import pcgrad_weights

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")  # the `test` extra installs it
from torchjd.linalg import QuadprogProjector  # noqa: E402

REGISTRY = registry_from_plugins(weighted_sum, mgda, marble, upgrad, pcgrad, cagrad)
GRAM_BALANCERS = ["mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"]


def make(name: str, num_rewards: int, **options):
    return build("balancer", name, options, num_rewards, registry=REGISTRY)


def jacobian(seed: int, k: int, kind: str, dim: int = 16) -> np.ndarray:
    """K gradients of one of the hard kinds, norms spread over 1e-3…1e3."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, dim))
    if kind == "parallel":
        g = g[:1] + 1e-4 * rng.normal(size=(k, dim))
    elif kind == "opposing":
        g[0] = -0.7 * g[1:].sum(axis=0) + 0.3 * rng.normal(size=dim)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g * 10.0 ** rng.uniform(-3, 3, size=(k, 1))


jacobians = st.tuples(st.integers(0, 2**31 - 1), st.integers(2, 7),
                      st.sampled_from(["generic", "parallel", "opposing"]))


def torchjd_upgrad(gram: np.ndarray) -> np.ndarray:
    """torchjd's UPGrad projections with its regularization off. Its quadprog call needs a
    well-conditioned matrix, so it gets the unit-diagonal Gram and the scaled bounds — the same
    QP (v = D·μ), still solved by torchjd's projector."""
    n = gram.shape[0]
    norms = np.sqrt(np.diag(gram))
    unit = gram / np.outer(norms, norms)
    projector = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    mu = projector(torch.tensor(np.diag(norms / n)), torch.tensor(unit)).numpy()
    return (mu / norms).sum(axis=0)


def relative_error(weights: np.ndarray, reference: np.ndarray, g: np.ndarray) -> float:
    """‖d − d_ref‖ / ‖d_ref‖ for the fused gradients of two weight vectors."""
    d, d_ref = weights @ g, reference @ g
    return float(np.linalg.norm(d - d_ref) / max(np.linalg.norm(d_ref), 1e-300))


# --------------------------------------------------------------------------------- UPGrad
@settings(max_examples=80, deadline=None)
@given(jacobians)
def test_upgrad_matches_torchjd_unregularized(params):
    seed, k, kind = params
    g = jacobian(seed, k, kind)
    gram = g @ g.T
    weights = make("upgrad", k, max_weight=np.inf).weights(torch.tensor(gram), 0).numpy()
    reference = torchjd_upgrad(gram)
    assert relative_error(weights, reference, g) < 1e-9
    # the weights themselves, relative to each reward's share of d (‖w_k g_k‖ vs ‖d‖)
    d_norm = np.linalg.norm(reference @ g)
    norms = np.linalg.norm(g, axis=1)
    assert np.all(np.abs(weights - reference) * norms <= 1e-8 * max(d_norm, norms.max() / k))


@settings(max_examples=40, deadline=None)
@given(jacobians)
def test_upgrad_does_not_depend_on_the_solver_history(params):
    """Fresh vs reused balancer, and the order of the solves: bit-identical answers."""
    seed, k, kind = params
    grams = [torch.tensor((g := jacobian(seed + i, k, kind)) @ g.T) for i in range(4)]
    reused = make("upgrad", k)
    forward = [reused.weights(gram, i) for i, gram in enumerate(grams)]
    backward = [reused.weights(gram, i) for i, gram in reversed(list(enumerate(grams)))][::-1]
    for i, gram in enumerate(grams):
        fresh = make("upgrad", k).weights(gram, i)
        assert torch.equal(fresh, forward[i]) and torch.equal(fresh, backward[i])


def test_upgrad_weights_of_tiny_gradients_are_bounded_and_d_is_continuous():
    """A conflicting reward at norm ratio r: the uncapped weight grows like 1/r; the cap bounds
    it, and d converges to the answer for an exactly zero gradient as r → 0."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(3, 10))
    tiny_direction = -base[0] / np.linalg.norm(base[0]) + 0.3 * rng.normal(size=10)
    tiny_direction /= np.linalg.norm(tiny_direction)

    def solve(ratio, **options):
        g = np.vstack([base, ratio * tiny_direction])
        balancer = make("upgrad", 4, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = balancer.weights(torch.tensor(g @ g.T), 0).numpy()
        return w, w @ g, balancer.metrics

    _, d_zero, metrics = solve(0.0)
    assert metrics["balancer/zero_gradient"] == 1.0
    uncapped, _, _ = solve(1e-6, max_weight=np.inf)
    assert uncapped[3] > 1e4  # what the cap is for
    previous = np.inf
    for ratio in [1e-1, 1e-3, 1e-6, 1e-9, 1e-12]:
        w, d, metrics = solve(ratio)
        assert np.all(w <= 1000.0 * (1 + 1e-12))
        gap = np.linalg.norm(d - d_zero)
        assert gap <= 1000.0 * ratio * (1 + 1e-9)  # the capped contribution ≤ max_weight·‖g_k‖
        assert gap <= previous
        previous = gap
    assert metrics["balancer/capped"] == 1.0


def test_upgrad_averages_over_the_active_rewards():
    g = np.random.default_rng(2).normal(size=(4, 8))
    gram = torch.tensor(g @ g.T)
    active = torch.tensor([True, False, True, True])
    sub = gram[active][:, active]
    with_mask = make("upgrad", 4).weights(gram, 0, active=active).numpy()
    alone = make("upgrad", 3).weights(sub, 0).numpy()
    assert with_mask[1] == 0.0
    np.testing.assert_array_equal(with_mask[[0, 2, 3]], alone)
    np.testing.assert_allclose(alone, torchjd_upgrad(sub.numpy()), rtol=1e-9)


# ----------------------------------------------------------------------------------- MGDA
def exact_min_norm(gram: np.ndarray) -> float:
    """min λᵀGλ on the simplex by enumerating supports (λ_S ∝ G_SS⁻¹1)."""
    k = gram.shape[0]
    best = np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            sub = gram[np.ix_(idx, idx)]
            scale = 1.0 / np.sqrt(np.diag(sub))
            try:
                x = np.linalg.solve(sub * np.outer(scale, scale), np.ones(size)) * scale
            except np.linalg.LinAlgError:
                continue
            if np.all(x >= 0) and x.sum() > 0:
                lam = np.zeros(k)
                lam[idx] = x / x.sum()
                best = min(best, float(lam @ gram @ lam))
    return best


@settings(max_examples=60, deadline=None)
@given(jacobians)
def test_mgda_is_exact_where_torchjd_is_approximate(params):
    seed, k, kind = params
    g = jacobian(seed, k, kind)
    gram = g @ g.T
    lam = make("mgda-qp", k).weights(torch.tensor(gram), 0).numpy()
    value = lam @ gram @ lam
    reference = exact_min_norm(gram)
    assert value <= reference * (1 + 1e-9) + 1e-15 * np.diag(gram).max()
    # MGDA optimality: (Gλ)_k ≥ λᵀGλ for every k
    assert np.all(gram @ lam >= value - 1e-9 * (np.abs(gram) @ lam))
    torchjd_lam = torchjd_aggregation.MGDAWeighting()(torch.tensor(gram)).numpy()
    assert torchjd_lam @ gram @ torchjd_lam >= value * (1 - 1e-9)  # never better than exact


def test_mgda_d_is_continuous_as_a_gradient_vanishes():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3, 10))
    direction = rng.normal(size=10)
    norms = []
    for ratio in [1e-2, 1e-6, 1e-11, 1.1e-12, 0.9e-12, 1e-15, 0.0]:
        g = np.vstack([base, ratio * direction])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lam = make("mgda-qp", 4).weights(torch.tensor(g @ g.T), 0).numpy()
        norms.append(np.linalg.norm(lam @ g))
        assert norms[-1] <= ratio * np.linalg.norm(direction) * (1 + 1e-6) + 1e-300  # the hull holds ratio·direction
    assert norms[-1] == 0.0


@settings(max_examples=25, deadline=None)
@given(jacobians)
def test_mgda_answer_does_not_depend_on_the_warm_start(params):
    seed, k, kind = params
    grams = [(g := jacobian(seed + i, k, kind)) @ g.T for i in range(4)]
    reused = MinNormQP()
    for gram in grams:
        warm = reused.solve(gram).lam
        cold = MinNormQP().solve(gram).lam
        np.testing.assert_allclose(warm, cold, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------- PCGrad
def pcgrad_vectors(g: np.ndarray, orders) -> np.ndarray:
    """Algorithm 1 of the paper on the gradient vectors themselves."""
    total = np.zeros(g.shape[1])
    for i in range(len(g)):
        projected = g[i].copy()
        for j in orders[i]:
            inner = projected @ g[j]
            if inner < 0:
                projected -= inner / (g[j] @ g[j]) * g[j]
        total += projected
    return total


@settings(max_examples=40, deadline=None)
@given(jacobians)
def test_pcgrad_matches_the_paper_and_torchjd(params):
    seed, k, kind = params
    g = jacobian(seed, k, kind)
    gram = g @ g.T
    # torchjd draws torch.randperm(K) per reward, skipping the reward itself
    torch.manual_seed(seed)
    orders = [[int(j) for j in torch.randperm(k) if j != i] for i in range(k)]
    weights = pcgrad_weights(gram, orders).sum(axis=0)
    torch.manual_seed(seed)
    reference = torchjd_aggregation.PCGradWeighting()(torch.tensor(gram)).numpy()
    scale = np.linalg.norm(g, axis=1).max()
    assert np.linalg.norm(weights @ g - reference @ g) <= 1e-9 * scale
    assert np.linalg.norm(weights @ g - pcgrad_vectors(g, orders)) <= 1e-9 * scale


def test_pcgrad_is_seeded_per_step_and_resumes():
    g = np.random.default_rng(0).normal(size=(5, 6))
    gram = torch.tensor(g @ g.T)
    first = make("pcgrad", 5, seed=3)
    runs = [first.weights(gram, step) for step in range(6)]
    assert any(not torch.equal(runs[0], w) for w in runs[1:])  # the order changes with the step
    resumed = make("pcgrad", 5, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(resumed.weights(gram, step), runs[step]) for step in range(6))
    other = make("pcgrad", 5, seed=4)
    assert any(not torch.equal(other.weights(gram, s), runs[s]) for s in range(6))
    with pytest.raises(Exception, match="seed=3"):
        other.load_state_dict(first.state_dict())
    mean = make("pcgrad", 5, seed=3, reduction="mean").weights(gram, 0)
    torch.testing.assert_close(mean * 5, runs[0])


# ---------------------------------------------------------------------------------- CAGrad
def cagrad_brute_force(gram: np.ndarray, c: float) -> np.ndarray:
    """Every support S: the closed-form stationary point of ⟨g_w, g0⟩ + c‖g0‖‖g_w‖ on S,
    kept if it satisfies the KKT conditions (independent of the plugin's root finding)."""
    n = gram.shape[0]
    mean = np.full(n, 1.0 / n)
    b = gram @ mean
    radius = c * np.sqrt(mean @ b)
    best = None
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            idx = list(support)
            inverse = np.linalg.inv(gram[np.ix_(idx, idx)])
            ones = np.ones(size)
            alpha, beta, gamma = ones @ inverse @ ones, ones @ inverse @ b[idx], b[idx] @ inverse @ b[idx]
            discriminant = beta * beta - alpha * (gamma - radius * radius)
            if discriminant <= 0:
                continue
            t = np.sqrt(discriminant)
            w = np.zeros(n)
            w[idx] = inverse @ ((t + beta) / alpha * ones - b[idx]) / t
            if np.any(w < -1e-12):
                continue
            norm = np.sqrt(w @ gram @ w)
            gradient = b + radius * (gram @ w) / norm
            if np.any(gradient < (t + beta) / alpha - 1e-9 * np.abs(gradient).max()):
                continue
            value = b @ w + radius * norm
            if best is None or value < best[0]:
                best = (value, mean + radius / norm * w)
    return best[1]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.sampled_from(["generic", "opposing"]),
       st.sampled_from([0.1, 0.4, 0.9]))
def test_cagrad_matches_its_definition_and_torchjd(seed, k, kind, c):
    g = jacobian(seed, max(k, 2), kind, dim=12)[:k] / 10.0 ** np.random.default_rng(seed).uniform(-1, 1)
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * 10.0 ** np.random.default_rng(seed + 1).uniform(-1, 1, (k, 1))
    gram = g @ g.T
    weights = make("cagrad", k, c=c).weights(torch.tensor(gram), 0).numpy()
    assert relative_error(weights, cagrad_brute_force(gram, c), g) < 1e-9
    # the primal: d is in the ball and no point of the ball improves the worst reward more
    g0 = g.mean(axis=0)
    d = weights @ g
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)
    rng = np.random.default_rng(seed)
    trial = rng.normal(size=(2000, g.shape[1]))
    trial = g0 + c * np.linalg.norm(g0) * trial / np.linalg.norm(trial, axis=1, keepdims=True)
    assert (g @ d).min() >= (trial @ g.T).min(axis=1).max() - 1e-9 * np.linalg.norm(g0) ** 2
    # torchjd solves the same problem with a conic solver (to its tolerance)
    reference = torchjd_aggregation.CAGradWeighting(c=c, norm_eps=0.0)(torch.tensor(gram)).numpy()
    assert relative_error(weights, reference, g) < 1e-3
    rescaled = make("cagrad", k, c=c, rescale=True).weights(torch.tensor(gram), 0).numpy()
    np.testing.assert_allclose(rescaled, weights / (1 + c * c), rtol=1e-12)


def test_cagrad_with_c_zero_is_the_mean_and_with_one_reward_scales_it():
    gram = torch.tensor(np.random.default_rng(1).normal(size=(3, 5)) @ np.random.default_rng(1).normal(size=(5, 3)))
    gram = gram @ gram.T
    np.testing.assert_allclose(make("cagrad", 3, c=0.0).weights(gram, 0).numpy(), 1 / 3)
    np.testing.assert_allclose(cagrad_weights(np.array([[4.0]]), 0.4)[0], [1.4], rtol=1e-12)


# ------------------------------------------------------------------ the `active` contract
@pytest.mark.parametrize("name", GRAM_BALANCERS)
def test_an_inactive_reward_is_out_of_the_problem(name):
    g = np.random.default_rng(3).normal(size=(4, 9))
    gram = torch.tensor(g @ g.T)
    gram_with_garbage = gram.clone()
    gram_with_garbage[1, :] = gram_with_garbage[:, 1] = 7.0  # inactive rows hold anything finite
    active = torch.tensor([True, False, True, True])
    weights = make(name, 4).weights(gram_with_garbage, 0, active=active)
    alone = make(name, 3).weights(gram[active][:, active], 0)
    assert weights[1] == 0.0
    torch.testing.assert_close(weights[active], alone, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", GRAM_BALANCERS + ["weighted-sum"])
def test_no_active_reward_gives_zero_weights_and_leaves_state_alone(name):
    g = np.random.default_rng(3).normal(size=(3, 9))
    gram = torch.tensor(g @ g.T)
    balancer = make(name, 3)
    balancer.weights(gram, 0)
    before = {k: v.clone() for k, v in balancer.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = balancer.weights(gram, 1, active=torch.zeros(3, dtype=torch.bool))
    if name == "weighted-sum":  # a fixed objective: `active` is ignored
        assert weights.sum() > 0
        return
    assert weights.tolist() == [0.0, 0.0, 0.0] and balancer.lam.tolist() == [0.0, 0.0, 0.0]
    assert balancer.metrics["balancer/no_active"] == 1.0
    after = balancer.state_dict()
    for key in ("ema", "ema_initialized", "qp_warm_x", "qp_warm_y", "seed"):
        if key in before:
            assert torch.equal(before[key], after[key]), key


def test_marble_ema_takes_zero_for_an_absent_reward_and_renormalizes_over_the_present():
    g = np.random.default_rng(6).normal(size=(3, 9))
    gram = torch.tensor(g @ g.T)
    balancer = make("marble", 3, rho=0.5, normalize="none")   # compared with the raw min-norm λ*
    balancer.weights(gram, 0)
    ema_before = balancer.ema.copy()
    active = torch.tensor([True, True, False])
    balancer.weights(gram, 1, active=active)
    lam_star = MinNormQP().solve(gram.numpy(), active=active.numpy()).lam
    assert lam_star[2] == 0.0
    np.testing.assert_allclose(balancer.ema, 0.5 * ema_before + 0.5 * lam_star, rtol=1e-12)
    expected = balancer.ema[:2] / balancer.ema[:2].sum()
    np.testing.assert_allclose(balancer.lam.numpy(), [*expected, 0.0], rtol=1e-12)


def test_balance_serves_a_balancer_written_before_active():
    class Legacy:
        needs_gram = True

        def __init__(self):
            self.seen = None

        def weights(self, gram, step):
            self.seen = gram.clone()
            return torch.ones(gram.shape[0], dtype=torch.float64)

    legacy = Legacy()
    gram = torch.full((3, 3), 2.0, dtype=torch.float64)
    weights = balance(legacy, gram, 0, active=torch.tensor([True, False, True]))
    assert weights.tolist() == [1.0, 0.0, 1.0]
    assert legacy.seen[1].tolist() == [0.0, 0.0, 0.0] and legacy.seen[:, 1].tolist() == [0.0, 0.0, 0.0]
    modern = make("upgrad", 3)
    torch.testing.assert_close(balance(modern, gram + torch.eye(3, dtype=torch.float64), 0),
                               make("upgrad", 3).weights(gram + torch.eye(3, dtype=torch.float64), 0))
    # a current balancer gets the mask itself (upgrad leaves an inactive reward out of its n rows;
    # a zeroed row would count as a zero gradient), and so does one that takes **options
    mask = torch.tensor([True, False, True])
    full = gram + torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(balance(make("upgrad", 3), full, 0, active=mask),
                               make("upgrad", 3).weights(full, 0, active=mask))

    class Options:
        needs_gram = True

        def weights(self, gram, step, **options):
            self.options = options
            return torch.ones(gram.shape[0], dtype=torch.float64)

    with_options = Options()
    assert balance(with_options, full, 0, active=mask).tolist() == [1.0, 1.0, 1.0]
    assert with_options.options["active"] is mask


def test_upgrad_unit_normalize_is_upgrad_of_the_unit_gradients_at_their_mean_norm():
    """normalize="unit": UPGrad of the unit gradients ĝ_k = g_k/‖g_k‖, scaled to the mean norm:
    d = mean‖g‖ · Σ u_k ĝ_k with u torchjd's weights for the unit Gram; a zero gradient has no
    direction: it is left out (weight 0, not one of the n rows)."""
    g = jacobian(5, 3, "opposing", dim=10) * np.array([[0.01], [1.0], [30.0]])
    norms = np.linalg.norm(g, axis=1)
    unit = (g / norms[:, None]) @ (g / norms[:, None]).T
    expected = norms.mean() * torchjd_upgrad(unit) / norms
    weights = make("upgrad", 3, normalize="unit", max_weight=np.inf).weights(torch.tensor(g @ g.T), 0).numpy()
    assert relative_error(weights, expected, g) < 1e-9
    with_zero = np.vstack([g, np.zeros((1, 10))])
    balancer = make("upgrad", 4, normalize="unit", max_weight=np.inf)
    weights = balancer.weights(torch.tensor(with_zero @ with_zero.T), 0).numpy()
    assert weights[3] == 0.0
    np.testing.assert_allclose(weights[:3], expected, rtol=1e-9)
    assert balancer.metrics["balancer/capped"] == 0.0
    plain = make("upgrad", 4, max_weight=np.inf)  # normalize="none": the zero gradient is a row, its share 1/n
    assert plain.weights(torch.tensor(with_zero @ with_zero.T), 0)[3] == 0.25
