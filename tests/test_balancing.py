"""Balancers: min-norm QP optimality (hypothesis), degenerate Grams, EMA state, plugins."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.balancing import Balancer, MinNormQP, kkt_residual, sanitize_gram
from marble_kit.errors import MarbleError
from marble_kit.registry import build, registry_from_plugins
from marble_plugins.balancers import cagrad, marble, mgda, pcgrad, upgrad, weighted_sum

REGISTRY = registry_from_plugins(weighted_sum, mgda, marble, upgrad, pcgrad, cagrad)


def make(name: str, num_rewards: int, **options):
    return build("balancer", name, options, num_rewards, registry=REGISTRY)


def random_gram(seed: int, k: int, rank: int, log_spread: float) -> np.ndarray:
    """G = g gᵀ for K gradients of the given rank with norms spread over 10^±log_spread."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, 12))
    grads = rng.normal(size=(k, rank)) @ basis
    grads /= np.linalg.norm(grads, axis=1, keepdims=True)
    grads *= 10.0 ** rng.uniform(-log_spread, log_spread, size=(k, 1))
    return grads @ grads.T


def brute_force_min_norm(gram: np.ndarray) -> tuple[float, np.ndarray]:
    """Independent exact solver: every support S, λ_S ∝ G_SS⁻¹·1 (diagonally equilibrated),
    keep the best feasible one. Exponential in K — fine for K ≤ 6."""
    k = gram.shape[0]
    best, best_lam = np.inf, None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            sub = gram[np.ix_(idx, idx)]
            scale = 1.0 / np.sqrt(np.diag(sub))
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = sub * scale[:, None] * scale[None, :]
            kkt[:size, size] = scale
            kkt[size, :size] = scale
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            lam_sub = solution[:size] * scale
            if np.any(lam_sub < -1e-12) or abs(lam_sub.sum() - 1) > 1e-9:
                continue
            lam = np.zeros(k)
            lam[idx] = np.maximum(lam_sub, 0)
            lam /= lam.sum()
            value = lam @ gram @ lam
            if value < best:
                best, best_lam = value, lam
    return best, best_lam


def projected_gradient_min_norm(gram: np.ndarray, iterations: int = 20000) -> float:
    """Independent solver for larger K: accelerated projected gradient on the simplex."""
    def project(v):
        u = np.sort(v)[::-1]
        css = np.cumsum(u)
        rho = np.nonzero(u * np.arange(1, len(v) + 1) > (css - 1))[0][-1]
        return np.maximum(v - (css[rho] - 1) / (rho + 1.0), 0)

    k = gram.shape[0]
    step = 1.0 / (2 * np.linalg.eigvalsh(gram)[-1])
    lam = y = np.full(k, 1.0 / k)
    t = 1.0
    for _ in range(iterations):
        nxt = project(y - step * 2 * gram @ y)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = nxt + (t - 1) / t_next * (nxt - lam)
        lam, t = nxt, t_next
    return float(lam @ gram @ lam)


def assert_on_simplex(lam, k):
    lam = np.asarray(lam)
    assert lam.shape == (k,)
    assert np.all(np.isfinite(lam))
    assert np.all(lam >= -1e-12)
    assert abs(lam.sum() - 1.0) < 1e-9


gram_params = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 6)).flatmap(
    lambda sk: st.tuples(st.just(sk[0]), st.just(sk[1]), st.integers(1, sk[1] + 2),
                         st.floats(0.0, 3.0)))


@settings(max_examples=60, deadline=None)
@given(gram_params)
def test_min_norm_matches_brute_force_and_is_mgda_optimal(params):
    seed, k, rank, spread = params
    gram = random_gram(seed, k, min(rank, 12), spread)
    result = MinNormQP().solve(gram)
    assert_on_simplex(result.lam, k)
    value = result.lam @ gram @ result.lam
    reference, _ = brute_force_min_norm(gram)
    scale = np.diag(gram).max()
    assert value <= reference * (1 + 1e-6) + 1e-12 * scale
    assert value >= reference * (1 - 1e-6) - 1e-12 * scale
    # MGDA optimality: (Gλ)_k ≥ λᵀGλ for every k, so the fused direction conflicts with no reward.
    magnitude = np.abs(gram) @ result.lam  # round-off scale of each (Gλ)_k
    assert np.all(gram @ result.lam >= value - 1e-6 * np.maximum(value, magnitude))
    assert kkt_residual(gram, result.lam) < 1e-6


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(7, 10))
def test_min_norm_matches_projected_gradient_for_larger_k(seed, k):
    gram = random_gram(seed, k, k, 0.5)
    result = MinNormQP().solve(gram)
    assert_on_simplex(result.lam, k)
    reference = projected_gradient_min_norm(gram)
    value = result.lam @ gram @ result.lam
    assert value <= reference * (1 + 1e-6) + 1e-12
    assert kkt_residual(gram, result.lam) < 1e-6


def test_gradient_norms_over_six_orders_of_magnitude_give_the_true_lambda():
    rng = np.random.default_rng(3)
    for trial in range(20):
        k = 2 + trial % 5
        grads = rng.normal(size=(k, 30))
        grads /= np.linalg.norm(grads, axis=1, keepdims=True)
        grads *= np.logspace(-3, 3, k)[rng.permutation(k)][:, None]
        gram = grads @ grads.T
        result = MinNormQP().solve(gram)
        reference_value, reference_lam = brute_force_min_norm(gram)
        assert abs(result.lam @ gram @ result.lam - reference_value) <= 1e-6 * reference_value
        np.testing.assert_allclose(result.lam, reference_lam, atol=1e-7)
        assert kkt_residual(gram, result.lam) < 1e-6


def test_solver_warm_start_sequence_stays_exact():
    solver = MinNormQP()
    for seed in range(30):  # one workspace, shapes fixed, numbers change every call
        gram = random_gram(seed, 4, 4, 1.0)
        result = solver.solve(gram)
        reference, _ = brute_force_min_norm(gram)
        assert abs(result.lam @ gram @ result.lam - reference) <= 1e-6 * reference + 1e-14


@settings(max_examples=30, deadline=None)
@given(gram_params, st.floats(0.0, 1.0))
def test_floor_keeps_lambda_above_min_weight_and_optimal(params, floor_fraction):
    seed, k, rank, spread = params
    gram = random_gram(seed, k, min(rank, 12), spread)
    floor = floor_fraction / k
    result = MinNormQP().solve(gram, min_weight=floor)
    assert_on_simplex(result.lam, k)
    assert np.all(result.lam >= floor - 1e-9)
    assert kkt_residual(gram, result.lam, min_weight=floor) < 1e-6


@settings(max_examples=30, deadline=None)
@given(gram_params)
def test_unit_normalization_weights_give_the_normalized_fused_direction(params):
    seed, k, rank, spread = params
    gram = random_gram(seed, k, min(rank, 12), spread)
    norms = np.sqrt(np.diag(gram))
    balancer = make("mgda-qp", k, normalize="unit")
    weights = balancer.weights(torch.tensor(gram), 0).numpy()
    lam = balancer.lam.numpy()
    assert_on_simplex(lam, k)
    # w_k = s·λ_k/‖g_k‖ with s the mean norm; λ solves the unit-norm problem.
    np.testing.assert_allclose(weights, norms.mean() * lam / norms, rtol=1e-9)
    unit = gram / np.outer(norms, norms)
    reference, _ = brute_force_min_norm(unit)
    assert lam @ unit @ lam <= reference * (1 + 1e-6) + 1e-12


# ------------------------------------------------------------------------ degenerate Grams
def degenerate_cases():
    g = np.random.default_rng(0).normal(size=(3, 5))
    rank_one = np.outer([1.0, 2.0, -0.5], [1.0, 2.0, -0.5])
    duplicated = np.vstack([g[:2], g[1:2]])
    one_zero = np.vstack([g[:2], np.zeros((1, 5))])
    nan_gram = g @ g.T
    nan_gram[0, 1] = nan_gram[1, 0] = np.nan
    inf_gram = g @ g.T
    inf_gram[2, 2] = np.inf
    non_psd = g[:2].T @ g[:2]                       # 5×5 of rank 2, round-off made indefinite
    non_psd = non_psd[:3, :3] - 1e-6 * np.eye(3) * np.abs(non_psd).max()
    return {
        "all_zero": (np.zeros((3, 3)), "all_zero"),
        "rank_one": (rank_one, "rank_deficient"),
        "duplicated": (duplicated @ duplicated.T, "rank_deficient"),
        "one_zero_gradient": (one_zero @ one_zero.T, "zero_gradient"),
        "nan_entries": (nan_gram, "nonfinite"),
        "inf_entries": (inf_gram, "nonfinite"),
        "non_psd": (non_psd, "non_psd"),
        "all_nan": (np.full((3, 3), np.nan), "nonfinite"),
    }


@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("name", ["mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"])
def test_degenerate_gram_gives_finite_answer_warning_and_counter(case, name):
    gram, flag = degenerate_cases()[case]
    if name in ("pcgrad", "cagrad") and flag in ("rank_deficient", "non_psd"):
        pytest.skip("no QP on the unit-diagonal Gram: these flags are not computed")
    balancer = make(name, gram.shape[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = balancer.weights(torch.tensor(gram), 0)
    # a rank-deficient Gram is an ordinary case (parallel gradients): a metric, not a warning
    warned = [w for w in caught if "degenerate Gram" in str(w.message)]
    assert len(warned) == (0 if flag == "rank_deficient" else 1), [str(w.message) for w in caught]
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert torch.isfinite(balancer.lam).all()
    if case == "all_nan":  # nothing finite to balance: no reward takes part
        assert weights.sum() == 0 and balancer.lam.sum() == 0
    else:
        assert weights.sum() > 0
    if name in ("mgda-qp", "marble") and case != "all_nan":
        assert_on_simplex(balancer.lam.numpy(), gram.shape[0])
    assert balancer.metrics[f"balancer/{flag}"] == 1.0
    assert balancer.metrics["balancer/degenerate"] == 1.0
    assert balancer.metrics["balancer/degenerate_steps"] == 1.0


def test_degenerate_answers_are_the_defined_limits():
    cases = degenerate_cases()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # An exactly zero gradient is in the hull's limit: 0 is in the hull, so d = 0 (λ on it).
        gram = cases["one_zero_gradient"][0]
        lam = MinNormQP().solve(gram).lam
        assert lam.tolist() == [0.0, 0.0, 1.0]
        # With a floor the zero gradient takes what the floor leaves, the rest is still optimal.
        result = MinNormQP().solve(gram, min_weight=0.2)
        assert_on_simplex(result.lam, 3)
        assert np.all(result.lam >= 0.2 - 1e-12)
        grid = [(a, b) for a in np.linspace(0.2, 0.6, 81) for b in np.linspace(0.2, 0.6, 81) if a + b <= 0.8]
        best = min(np.array([a, b, 1 - a - b]) @ gram @ np.array([a, b, 1 - a - b]) for a, b in grid)
        assert result.lam @ gram @ result.lam <= best + 1e-12
        # With unit normalization a zero gradient has no direction and is left out.
        assert MinNormQP().solve(gram, "unit").lam[2] == 0.0
        # Duplicated rewards share their weight evenly (minimum-norm refinement).
        lam = MinNormQP().solve(cases["duplicated"][0]).lam
        assert abs(lam[1] - lam[2]) < 1e-6
        # A non-finite row must not steer the update.
        lam = MinNormQP().solve(cases["inf_entries"][0]).lam
        assert lam[2] == 0.0
        # All gradients zero: d = 0 whatever λ; λ splits evenly.
        np.testing.assert_allclose(MinNormQP().solve(cases["all_zero"][0]).lam, 1 / 3)


def test_single_reward_gets_weight_one():
    balancer = make("marble", 1)
    assert balancer.weights(torch.tensor([[4.0]]), 0).tolist() == [1.0]
    assert balancer.metrics["balancer/degenerate"] == 0.0


def test_sanitize_keeps_tiny_and_zero_gradients_in_the_problem():
    clean = sanitize_gram(np.diag([1e-30, 1.0, 1e6, 0.0]))
    assert clean.included.all() and clean.nonzero.tolist() == [True, True, True, False]
    assert clean.flags["zero_gradient"] and not clean.flags["nonfinite"]
    clean = sanitize_gram(np.diag([1e-30, 1.0, 1e6]))
    assert not any(clean.flags.values())


# --------------------------------------------------------------------------- marble / EMA
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 6), st.floats(0.0, 0.95), st.floats(0.0, 1.0))
def test_marble_ema_follows_the_formula_and_round_trips(seed, k, rho, floor_fraction):
    floor = floor_fraction / k
    grams = [random_gram(seed + i, k, k, 1.0) for i in range(6)]
    balancer = make("marble", k, rho=rho, min_weight=floor)
    expected = None
    for step, gram in enumerate(grams[:3]):
        balancer.weights(torch.tensor(gram), step)
        lam_star = MinNormQP().solve(gram, min_weight=floor).lam
        expected = lam_star if expected is None else rho * expected + (1 - rho) * lam_star
        np.testing.assert_allclose(balancer.lam.numpy(), expected, atol=1e-7)
        assert_on_simplex(balancer.lam.numpy(), k)
        assert np.all(balancer.lam.numpy() >= floor - 1e-9)
    restored = make("marble", k, rho=rho, min_weight=floor)
    restored.load_state_dict({key: value.clone() for key, value in balancer.state_dict().items()})
    for step, gram in enumerate(grams[3:], start=3):
        np.testing.assert_allclose(restored.weights(torch.tensor(gram), step).numpy(),
                                   balancer.weights(torch.tensor(gram), step).numpy(), atol=1e-9)


def test_marble_state_before_first_solve_and_mismatched_state():
    fresh = make("marble", 3)
    other = make("marble", 3)
    other.load_state_dict(fresh.state_dict())
    assert other.ema is None
    with pytest.raises(MarbleError, match="same rewards"):
        make("marble", 4).load_state_dict(fresh.state_dict())
    with pytest.raises(MarbleError, match="another balancer"):
        make("marble", 3).load_state_dict({"lam": torch.ones(3) / 3})


# ----------------------------------------------------------------------------- upgrad
@settings(max_examples=40, deadline=None)
@given(gram_params)
def test_upgrad_direction_conflicts_with_no_reward(params):
    """Without the cap (max_weight=inf) the paper's guarantee holds for every reward; with the
    default cap, for every reward whose weight stays below it."""
    seed, k, rank, spread = params
    gram = random_gram(seed, k, min(rank, 12), spread)
    for max_weight in (np.inf, 1000.0):
        balancer = make("upgrad", k, max_weight=max_weight)
        weights = balancer.weights(torch.tensor(gram), 0).numpy()
        assert np.all(weights >= 1.0 / k - 1e-9)  # v_i ≥ e_i/K for each projection
        assert np.all(weights <= max_weight * (1 + 1e-12))
        magnitude = np.abs(gram) @ weights  # round-off scale of each ⟨g_k, d⟩
        protected = weights < 0.999 * max_weight / k  # below the cap in every projection
        assert np.all((gram @ weights >= -1e-9 * magnitude)[protected])
        if max_weight == np.inf:
            assert protected.all() and balancer.metrics["balancer/capped"] == 0.0


def test_upgrad_leaves_agreeing_gradients_alone():
    g = np.abs(np.random.default_rng(1).normal(size=(4, 6)))  # positive entries: no conflict
    weights = make("upgrad", 4).weights(torch.tensor(g @ g.T), 0).numpy()
    np.testing.assert_allclose(weights, 0.25, atol=1e-7)


# ------------------------------------------------------------------------ weighted-sum
def test_weighted_sum_modes_and_validation():
    uniform = make("weighted-sum", 4)
    assert uniform.weights(None, 0).tolist() == [0.25] * 4
    assert uniform.summed_reward_weights is None and not uniform.needs_gram
    summed = make("weighted-sum", 3, weights=[1, 2, 1], mode="summed-reward")
    assert summed.summed_reward_weights.tolist() == [0.25, 0.5, 0.25]
    with pytest.raises(MarbleError, match="one number per reward"):
        make("weighted-sum", 3, weights=[1, 2])
    with pytest.raises(MarbleError, match="finite"):
        make("weighted-sum", 2, weights=[-1, 2])
    with pytest.raises(MarbleError, match="mode"):
        make("weighted-sum", 2, mode="sum")
    with pytest.raises(MarbleError, match="differ"):
        summed.load_state_dict(make("weighted-sum", 3).state_dict())


# --------------------------------------------------------------------- contract / options
@pytest.mark.parametrize("name", ["weighted-sum", "mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"])
def test_every_builtin_follows_the_contract(name):
    balancer = make(name, 3)
    assert isinstance(balancer, Balancer)
    assert balancer.gram_metric in ("euclidean", "adam", "adam-momentum")
    gram = torch.tensor(random_gram(0, 3, 3, 0.5))
    weights = balancer.weights(gram if balancer.needs_gram else None, 0)
    assert weights.shape == (3,) and torch.isfinite(weights).all()
    assert all(isinstance(v, float) for v in balancer.metrics.values())
    restored = make(name, 3)
    restored.load_state_dict(balancer.state_dict())
    assert torch.allclose(restored.lam, balancer.lam)


@pytest.mark.parametrize(("name", "options"), [("mgda-qp", {}), ("marble", {}), ("mgda-qp", {"min_weight": 0.05}),
                                               ("marble", {"min_weight": 0.05}), ("upgrad", {}), ("pcgrad", {}),
                                               ("cagrad", {})])
def test_a_restored_balancer_repeats_every_later_solve_bit_for_bit(name, options):
    """Solves after a restore equal the uninterrupted ones exactly (what a bit-exact resume
    needs). With a floor the min-norm QP goes through OSQP, whose warm start travels in the
    state: its iteration counts repeat too."""
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(4, 12)) * np.array([[0.5], [1.0], [2.0], [4.0]])
    # slowly drifting gradients, as in training: the warm start decides OSQP's iterations
    grams = [torch.tensor((g := grads + 0.05 * rng.normal(size=grads.shape)) @ g.T) for _ in range(8)]
    uninterrupted = make(name, 4, **options)
    expected = [(uninterrupted.weights(g, i), dict(uninterrupted.metrics)) for i, g in enumerate(grams)]
    first = make(name, 4, **options)
    for i, g in enumerate(grams[:3]):
        first.weights(g, i)
    resumed = make(name, 4, **options)
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    for i, g in enumerate(grams[3:], start=3):
        weights = resumed.weights(g, i)
        assert torch.equal(weights, expected[i][0]), (i, weights, expected[i][0])
        assert resumed.metrics == expected[i][1]
    if options:
        assert any(m["balancer/qp_iterations"] > 0 for _, m in expected[3:])


def test_user_mistakes_are_one_line_marble_errors():
    for options, match in [({"rho": 1.5}, "rho"), ({"min_weight": 0.6}, "min_weight"),
                           ({"normalize": "l2"}, "normalize"), ({"metric": "sgd"}, "metric"),
                           ({"metric": "adam-momentum", "normalize": "unit", "rho": 0.0}, "adam-momentum"),
                           ({"metric": "adam-momentum"}, "EMA"),  # the default rho = 0.7
                           ({"metric": "adam-momentum", "rho": 0.0, "min_weight": 0.1}, "min_weight=0"),
                           ({"lr": 1}, "no option")]:
        with pytest.raises(MarbleError, match=match) as info:
            make("marble", 2, **options)
        assert "\n" not in str(info.value)
    make("marble", 2, metric="adam-momentum", rho=0.0)  # the fresh min-norm λ: accepted
    for name, options, match in [("upgrad", {"max_weight": 0.5}, "max_weight"),
                                 ("pcgrad", {"seed": -1}, "seed"), ("pcgrad", {"reduction": "max"}, "reduction"),
                                 ("cagrad", {"c": 1.0}, "c=1.0"), ("cagrad", {"rescale": "yes"}, "rescale"),
                                 ("mgda-qp", {"metric": "adam-momentum", "min_weight": 0.1}, "min_weight=0")]:
        with pytest.raises(MarbleError, match=match) as info:
            make(name, 3, **options)
        assert "\n" not in str(info.value)
    with pytest.raises(MarbleError, match="--gram"):
        make("mgda-qp", 2).weights(None, 0)
    with pytest.raises(MarbleError, match="shape"):
        make("mgda-qp", 2).weights(torch.eye(3), 0)


def test_builtins_are_registered_through_entry_points():
    from marble_kit.registry import get_registry

    names = get_registry(refresh=True).names("balancer")
    assert {"weighted-sum", "mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"} <= set(names)


@pytest.mark.parametrize("name", ["mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_asymmetric_gram_is_read_as_its_symmetric_part(name, seed):
    """A Gram from two float reductions can be slightly asymmetric; G + S (S skew) has the same
    quadratic form as G, so every balancer must answer as for G (it symmetrizes)."""
    gram = random_gram(seed, 3, 3, 0.5)
    rng = np.random.default_rng(seed + 10)
    skew = rng.normal(size=(3, 3)) * 0.2 * np.abs(gram).max()
    skew = skew - skew.T
    expected = make(name, 3).weights(torch.tensor(gram), 0)
    actual = make(name, 3).weights(torch.tensor(gram + skew), 0)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)
