"""Balancers: min-norm QP optimality (hypothesis), degenerate Grams, EMA state, plugins."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

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
    elif case == "all_zero" and getattr(balancer, "normalize", "none") == "unit":
        # no direction to normalize: no reward takes part (λ = 0) and the update is zero
        assert weights.sum() == 0 and balancer.lam.sum() == 0
    else:
        assert weights.sum() > 0
    if name in ("mgda-qp", "marble") and case != "all_nan" and weights.sum() > 0:
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
    balancer = make("marble", k, rho=rho, min_weight=floor, normalize="none")  # the EMA of raw λ*
    expected = None
    for step, gram in enumerate(grams[:3]):
        balancer.weights(torch.tensor(gram), step)
        lam_star = MinNormQP().solve(gram, min_weight=floor).lam
        expected = lam_star if expected is None else rho * expected + (1 - rho) * lam_star
        np.testing.assert_allclose(balancer.lam.numpy(), expected, atol=1e-7)
        assert_on_simplex(balancer.lam.numpy(), k)
        assert np.all(balancer.lam.numpy() >= floor - 1e-9)
    restored = make("marble", k, rho=rho, min_weight=floor, normalize="none")
    restored.load_state_dict({key: value.clone() for key, value in balancer.state_dict().items()})
    for step, gram in enumerate(grams[3:], start=3):
        np.testing.assert_allclose(restored.weights(torch.tensor(gram), step).numpy(),
                                   balancer.weights(torch.tensor(gram), step).numpy(), atol=1e-9)


def test_marble_balances_unit_norm_gradients_by_default_and_raw_ones_for_adam_momentum():
    """The paper's recipe: λ of the unit-norm problem (so a small gradient does not take all the
    weight); the optimizer-aware metric needs raw gradients and gets them without being asked."""
    gram = torch.diag(torch.tensor([1e-4, 1.0, 4.0], dtype=torch.float64))  # orthogonal, norms 0.01, 1, 2
    default = make("marble", 3)
    assert default.normalize == "unit"
    default.weights(gram, 0)
    np.testing.assert_allclose(default.lam.numpy(), [1 / 3] * 3, atol=1e-9)  # unit orthogonal: the centre
    raw = make("marble", 3, normalize="none")
    raw.weights(gram, 0)
    assert raw.lam[0] > 0.99                                                # ∝ 1/‖g‖²: the smallest wins
    assert make("marble", 3, metric="adam-momentum", rho=0.0).normalize == "none"
    with pytest.raises(MarbleError, match="raw gradients"):
        make("marble", 3, metric="adam-momentum", rho=0.0, normalize="unit")


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


# ------------------------------------------------------- every message names its balancer
def _message(call) -> str:
    with pytest.raises(MarbleError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["weighted-sum", "mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"])
def test_every_mistake_names_the_balancer_it_was_made_with(name):
    """A user with several runs (or a sweep) needs to know which --balancer a message is about:
    construction, the Gram and mask of a step, and a checkpoint of another run all name it."""
    where = f"balancer {name!r}"
    assert _message(lambda: make(name, 0)) == f"{where}: needs at least one reward, got num_rewards=0"
    options = {"weighted-sum": [({"weights": [1, 2, 3]}, "weights"), ({"weights": [-1, 2]}, "weights"),
                                ({"mode": "sum"}, "mode")],
               "mgda-qp": [({"normalize": "l2"}, "normalize"), ({"metric": "sgd"}, "metric"),
                           ({"min_weight": 0.6}, "min_weight"),
                           ({"metric": "adam-momentum", "normalize": "unit"}, "metric=\"adam-momentum\" works")],
               "upgrad": [({"normalize": "l2"}, "normalize"), ({"max_weight": 0.5}, "max_weight")],
               "pcgrad": [({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"reduction": "max"}, "reduction")],
               "cagrad": [({"c": 1.0}, "c=1.0"), ({"rescale": "yes"}, "rescale")]}
    options["marble"] = [*options["mgda-qp"], ({"rho": 1.0}, "rho")]
    for option, named in options[name]:
        message = _message(lambda option=option: make(name, 2, **option))
        assert message.startswith(f"{where}: {named}"), message
    balancer = make(name, 2)
    if balancer.needs_gram:
        assert _message(lambda: balancer.weights(torch.eye(3), 0)) == (
            f"{where}: expected a (2, 2) Gram matrix for 2 rewards, got shape (3, 3)")
        assert _message(lambda: balancer.weights(torch.eye(2), 0, active=torch.ones(3, dtype=torch.bool))) == (
            f"{where}: active must be a (2,) bool mask, got shape (3,)")
        assert _message(lambda: balancer.weights(None, 0)).startswith(f"{where} needs the per-reward Gram")
    state = balancer.state_dict()
    for key in state:
        missing = {k: v for k, v in state.items() if k != key}
        assert _message(lambda missing=missing: make(name, 2).load_state_dict(missing)).startswith(
            f"{where}: checkpoint balancer state has no {key!r}")
        if state[key].ndim == 1 and state[key].shape[0] == 2:  # per-reward tensors: a run with other rewards
            other = make(name, 3).state_dict()
            assert _message(lambda other=other, key=key: make(name, 2).load_state_dict({**state, key: other[key]})) == (
                f"{where}: checkpoint {key!r} has shape (3,) but this run expects (2,); resume with the same rewards")


def test_mode_choices_are_listed():
    assert _message(lambda: make("weighted-sum", 2, mode="sum")) == (
        "balancer 'weighted-sum': mode='sum' is not one of per-reward, summed-reward")
    assert _message(lambda: make("pcgrad", 2, reduction="max")) == (
        "balancer 'pcgrad': reduction='max' is not one of sum, mean")
    assert _message(lambda: make("weighted-sum", 2, weights=[1, 2, 3])) == (
        "balancer 'weighted-sum': weights=[1, 2, 3] needs one number per reward (2), "
        "e.g. --balancer-opt weights=[1,2,1]")


def test_weighted_sum_takes_zero_and_fractional_weights_but_not_all_zero():
    assert make("weighted-sum", 3, weights=[1, 0, 1]).weights(None, 0).tolist() == [0.5, 0.0, 0.5]
    assert make("weighted-sum", 2, weights=[0.25, 0.75]).weights(None, 0).tolist() == [0.25, 0.75]
    assert make("weighted-sum", 2, weights=[0.5, 0.5]).weights(None, 0).tolist() == [0.5, 0.5]
    assert make("weighted-sum", 2, weights=[2, 2], mode="summed-reward").mode == "summed-reward"
    assert _message(lambda: make("weighted-sum", 2, weights=[0, 0])) == (
        "balancer 'weighted-sum': weights=[0, 0] must be finite, ≥ 0 and not all 0")


def test_mgda_before_its_first_step_and_its_degenerate_counter():
    """A fresh balancer reports uniform weights and no metrics; the counter adds up every
    degenerate step (here: all gradients zero), in the metrics and through a checkpoint."""
    for name in ("mgda-qp", "marble"):
        fresh = make(name, 4)
        assert fresh.last_weights.tolist() == [0.25] * 4 and fresh.metrics == {}
        balancer = make(name, 2)
        for step in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                balancer.weights(torch.zeros(2, 2), step)
            assert balancer.metrics["balancer/degenerate_steps"] == step + 1
        restored = make(name, 2)
        restored.load_state_dict(balancer.state_dict())
        assert restored.degenerate_steps == 3


def test_marble_ema_lag_is_the_l1_gap_to_this_steps_min_norm_lambda():
    """λ*_1 = (0.5, 0.5) for orthogonal unit gradients; with ρ = 0.5 and then λ*_2 = (0.8, 0.2)
    (‖g_1‖ = 0.5, ‖g_2‖ = 1: λ* ∝ 1/‖g‖²) the EMA is (0.65, 0.35): lag |0.65 − 0.8| + |0.35 − 0.2| = 0.3."""
    balancer = make("marble", 2, rho=0.5, normalize="none")
    balancer.weights(torch.eye(2, dtype=torch.float64), 0)
    assert balancer.metrics["balancer/ema_lag_l1"] == 0.0
    balancer.weights(torch.diag(torch.tensor([0.25, 1.0], dtype=torch.float64)), 1)
    np.testing.assert_allclose(balancer.lam.numpy(), [0.65, 0.35], atol=1e-12)
    assert balancer.metrics["balancer/ema_lag_l1"] == pytest.approx(0.3, abs=1e-12)
    idle = make("marble", 2)
    idle.weights(torch.eye(2, dtype=torch.float64), 0, active=torch.zeros(2, dtype=torch.bool))
    assert idle.metrics["balancer/ema_lag_l1"] == 0.0 and idle.ema is None


def test_cagrad_closed_form_ends_the_solve_in_a_few_rounds():
    """The closed form on the active set of the first QP ends CAGrad's root search: at most 4
    QP rounds on 60 random problems (bisection alone takes ~50 to reach round-off), and its
    answer sits on the ball: t·‖g_w‖ = c‖g0‖. Degenerate inputs take no round: c = 0 (the
    mean), all gradients zero, and g0 = 0 (two opposite gradients: the ball is the point 0)."""
    from marble_plugins.balancers.cagrad import cagrad_weights

    rounds = []
    for seed in range(60):
        k = 2 + seed % 5
        gram = random_gram(seed, k, min(k, 4), 1.0)
        weights, used = cagrad_weights(gram, 0.4)
        rounds.append(used)
        w = weights - 1.0 / k  # = t·w* on the simplex
        g0_squared = gram.sum() / k**2
        np.testing.assert_allclose(np.sqrt(w @ gram @ w), 0.4 * np.sqrt(g0_squared), rtol=1e-9)
        balancer = make("cagrad", k)
        balancer.weights(torch.tensor(gram), 0)
        assert balancer.metrics["balancer/qp_rounds"] == used
    assert 1 <= min(rounds) and max(rounds) <= 4 and sum(rounds) <= 90, rounds
    # norms over six orders of magnitude and a wide ball: the first active sets are often wrong,
    # the bracket grows and shrinks before the closed form lands, still on the ball
    for seed in range(60):
        gram = random_gram(seed, 6, 3, 3.0)
        weights, used = cagrad_weights(gram, 0.9)
        w = weights - 1.0 / 6
        assert used <= 12 and (w >= 0).all()
        np.testing.assert_allclose(np.sqrt(w @ gram @ w), 0.9 * np.sqrt(gram.sum() / 36), rtol=1e-9)
    opposite = np.array([[1.0, -1.0], [-1.0, 1.0]])
    for gram, c in [(random_gram(0, 3, 3, 0.5), 0.0), (np.zeros((2, 2)), 0.4), (opposite, 0.4)]:
        weights, used = cagrad_weights(gram, c)
        assert used == 0 and weights.tolist() == [1.0 / len(gram)] * len(gram)


def test_upgrad_counts_each_capped_reward_once():
    """Two tiny gradients that conflict with a large one: each is held at the cap 10/4 in two
    projections (its own and the other tiny one's) on top of its own share 1/4 — two capped
    rewards, whatever the number of projections that cap them."""
    g = np.array([[1.0, 0, 0, 0], [-1e-4, 1e-4, 0, 0], [-1e-4, 0, 1e-4, 0], [0.5, 0, 0, 1.0]])
    balancer = make("upgrad", 4, max_weight=10.0)
    weights = balancer.weights(torch.tensor(g @ g.T), 0).numpy()
    np.testing.assert_allclose(weights[1:], [5.25, 5.25, 0.25], rtol=1e-9)
    assert weights[0] == pytest.approx(0.25, rel=1e-3)  # (plus what the tiny ones' projections ask of it)
    assert balancer.metrics["balancer/capped"] == 2.0 and balancer.metrics["balancer/qp_iterations"] > 0


def pcgrad_on_vectors(g: np.ndarray, orders) -> np.ndarray:
    """The paper's Algorithm 1 on the gradient vectors themselves: Σ_i of g_i projected, in
    order, off each g_j it conflicts with."""
    total = np.zeros(g.shape[1])
    for i, order in enumerate(orders):
        projected = g[i].copy()
        for j in order:
            inner = projected @ g[j]
            if inner < 0:
                projected -= inner / (g[j] @ g[j]) * g[j]
        total += projected
    return total


def test_pcgrad_balancer_is_the_papers_algorithm_on_the_vectors():
    from marble_plugins.balancers.pcgrad import random_orders

    g = np.random.default_rng(4).normal(size=(5, 7))
    g[0] = -g[1:].sum(axis=0) * 0.6  # conflicts
    gram = g @ g.T
    default, zero = make("pcgrad", 5), make("pcgrad", 5, seed=0)
    for step in range(4):
        weights = default.weights(torch.tensor(gram), step).numpy()
        np.testing.assert_allclose(weights @ g, pcgrad_on_vectors(g, random_orders(5, 0, step)), rtol=1e-10, atol=1e-12)
        assert torch.equal(zero.weights(torch.tensor(gram), step), torch.tensor(weights))
    active = torch.tensor([True, False, True, True, True])
    masked = make("pcgrad", 5, reduction="mean").weights(torch.tensor(gram), 2, active=active).numpy()
    sub = g[active.numpy()]
    np.testing.assert_allclose(masked[active.numpy()] @ sub, pcgrad_on_vectors(sub, random_orders(4, 0, 2)) / 4,
                               rtol=1e-10, atol=1e-12)
    assert masked[1] == 0.0


def test_cagrad_without_an_active_reward_takes_no_round():
    balancer = make("cagrad", 3)
    weights = balancer.weights(torch.eye(3, dtype=torch.float64), 0, active=torch.zeros(3, dtype=torch.bool))
    assert weights.tolist() == [0.0, 0.0, 0.0] and balancer.metrics["balancer/qp_rounds"] == 0.0
    balancer.weights(torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)), 0)
    assert balancer.metrics["balancer/qp_rounds"] >= 1.0


def test_pcgrad_and_cagrad_find_nothing_degenerate_in_parallel_gradients():
    """They need no unit-diagonal Gram (no QP on the simplex of unit gradients), so a rank-one
    Gram is an ordinary input for them: no flag and no degenerate step, unlike mgda-qp/upgrad."""
    g = np.array([[1.0, 0.0], [2.0, 0.0], [-0.5, 1.0]])
    for name, degenerate in (("pcgrad", 0.0), ("cagrad", 0.0), ("upgrad", 1.0), ("mgda-qp", 1.0)):
        balancer = make(name, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            balancer.weights(torch.tensor(g @ g.T), 0)
        assert balancer.metrics["balancer/rank_deficient"] == degenerate, name
        assert balancer.metrics["balancer/degenerate_steps"] == degenerate, name


def test_upgrad_defaults_and_a_step_without_active_rewards():
    assert make("upgrad", 3).max_weight == 1000.0
    balancer = make("upgrad", 3)
    weights = balancer.weights(torch.eye(3, dtype=torch.float64), 0, active=torch.zeros(3, dtype=torch.bool))
    assert weights.tolist() == [0.0] * 3
    assert balancer.metrics["balancer/capped"] == 0.0 and balancer.metrics["balancer/qp_iterations"] == 0.0
    tight = make("upgrad", 3, max_weight=1.0)  # upper = lower on each own weight: that is no cap
    tight.weights(torch.ones(3, 3, dtype=torch.float64) + torch.eye(3, dtype=torch.float64), 0)
    assert tight.metrics["balancer/capped"] == 0.0


def test_option_messages_word_for_word():
    assert _message(lambda: make("cagrad", 2, c=1.0)) == (
        "balancer 'cagrad': c=1.0 must be in [0, 1) (the radius of the ball around the mean gradient, "
        "in units of its norm; e.g. --balancer-opt c=0.4)")
    assert _message(lambda: make("mgda-qp", 2, metric="adam-momentum", normalize="unit")) == (
        "balancer 'mgda-qp': metric=\"adam-momentum\" works on raw gradients; use normalize=\"none\" with it")
    with pytest.warns(RuntimeWarning, match=r"^balancer 'mgda-qp': degenerate Gram matrix \(nonfinite"):
        make("mgda-qp", 2).weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 0)


def _simplex_qp(seed: int, n: int = 4):
    """min ½xᵀPx on the simplex as OSQP sees it: A = [1ᵀ; I] (m = n + 1 rows ≠ n columns)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, n + 2))
    P = vectors @ vectors.T
    A = np.vstack([np.ones((1, n)), np.eye(n)])
    lower = np.concatenate([[1.0], np.zeros(n)])
    upper = np.concatenate([[1.0], np.full(n, np.inf)])
    return P, A, lower, upper


def test_dense_qp_alone_reaches_the_optimum_to_its_tolerance():
    # OSQP's own answer (MinNormQP refines it afterwards): accurate without the refinement
    from marble_kit.balancing import DenseQP, active_set_qp

    for seed in range(4):
        P, A, lower, upper = _simplex_qp(seed)
        result = DenseQP().solve(P, A, lower, upper)
        exact = active_set_qp(P, None, np.zeros(4), c=np.ones(4), target=1.0)
        assert result.solved is True and result.refined is False and result.iterations > 0
        assert result.x.dtype == np.float64
        assert np.abs(result.x - exact).max() < 1e-6, (result.x, exact)


def test_dense_qp_warm_start_is_its_state_and_a_resumed_solver_repeats_every_solve():
    import osqp

    from marble_kit.balancing import DenseQP

    P, A, lower, upper = _simplex_qp(0)
    cold = DenseQP()
    first = cold.solve(P, A, lower, upper)
    state = cold.state_dict()
    assert set(state) >= {"qp_warm_x", "qp_warm_y"}
    assert state["qp_warm_x"].shape == (4,) and state["qp_warm_y"].shape == (5,)
    again = cold.solve(P, A, lower, upper)                 # warm from its own answer
    assert again.iterations < first.iterations
    assert np.abs(again.x - first.x).max() < 1e-6
    # a fresh solver given the state repeats the continuation bit for bit
    P2 = P + 0.1 * np.eye(4)
    cold.load_state_dict(state)
    reference = cold.solve(P2, A, lower, upper)
    resumed = DenseQP()
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    repeat = resumed.solve(P2, A, lower, upper)
    assert repeat.iterations == reference.iterations and np.array_equal(repeat.x, reference.x)

    # the ρ kept for the next solve is OSQP's own estimate (clipped to OSQP's bounds [1e-6, 1e6]),
    # kept in float64, and it shortens the next solve (this problem: 50 iterations, 75 without)
    estimates = []
    original = osqp.OSQP.solve

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        estimates.append((float(result.info.rho_estimate), int(result.info.rho_updates)))
        return result

    P, A, lower, upper = _simplex_qp(2)
    qp = DenseQP()
    try:
        osqp.OSQP.solve = spy
        qp.solve(P, A, lower, upper)
    finally:
        osqp.OSQP.solve = original
    (estimate, updates), = estimates
    state = qp.state_dict()
    assert updates > 0 and estimate < 1.0
    assert state["qp_rho"].dtype == torch.float64 and float(state["qp_rho"]) == min(max(estimate, 1e-6), 1e6)
    P2 = P + 0.3 * np.eye(4)
    with_rho, without_rho = DenseQP(), DenseQP()
    with_rho.load_state_dict(state)
    without_rho.load_state_dict({k: v for k, v in state.items() if k != "qp_rho"})
    assert with_rho.solve(P2, A, lower, upper).iterations < without_rho.solve(P2, A, lower, upper).iterations
    # a state with half a warm start (x without y) starts cold
    half = DenseQP()
    half.load_state_dict({"qp_warm_x": state["qp_warm_x"]})
    assert "qp_warm_x" not in half.state_dict()


def test_dense_qp_reports_an_infeasible_problem_and_forgets_its_warm_start():
    from marble_kit.balancing import DenseQP

    P, A, lower, upper = _simplex_qp(1)
    qp = DenseQP()
    assert qp.solve(P, A, lower, upper).solved
    bad_lower, bad_upper = lower.copy(), upper.copy()
    bad_lower[0] = bad_upper[0] = -1.0                       # Σx = −1 with x ≥ 0: infeasible
    result = qp.solve(P, A, bad_lower, bad_upper)
    assert result.solved is False
    assert "qp_warm_x" not in qp.state_dict()
    # the next solve starts cold: the same iterations as a fresh solver's
    assert qp.solve(P, A, lower, upper).iterations == DenseQP().solve(P, A, lower, upper).iterations


def _brute_force_qp(P, q, lower, upper, c=None, target=0.0):
    """Independent reference: every assignment of each variable to its lower bound, its upper
    bound or free; the free block from its KKT system; the best feasible candidate wins."""
    n = len(lower)
    best, best_x = np.inf, None
    for status in itertools.product((-1, 0, 1), repeat=n):
        status = np.array(status)
        if np.any((status == 1) & ~np.isfinite(upper)):
            continue
        free = status == 0
        x = np.where(status == 1, np.where(np.isfinite(upper), upper, 0.0), lower).astype(float)
        k = int(free.sum())
        rows = np.zeros((k + (c is not None), k + (c is not None)))
        rhs = np.zeros(k + (c is not None))
        rows[:k, :k] = P[np.ix_(free, free)]
        rhs[:k] = -q[free] - P[np.ix_(free, ~free)] @ x[~free]
        if c is not None:
            rows[:k, k] = rows[k, :k] = c[free]
            rhs[k] = target - c[~free] @ x[~free]
        if rows.size:
            x[free] = np.linalg.lstsq(rows, rhs, rcond=None)[0][:k]
        if np.any(x < lower - 1e-9) or np.any(x > upper + 1e-9):
            continue
        if c is not None and abs(c @ x - target) > 1e-9:
            continue
        value = 0.5 * x @ P @ x + q @ x
        if value < best - 1e-12:
            best, best_x = value, x
    return best, best_x


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4), boxed=st.booleans(), start=st.booleans())
def test_active_set_qp_matches_brute_force_on_box_constrained_qps(seed, n, boxed, start):
    from marble_kit.balancing import active_set_qp

    rng = np.random.default_rng(seed)
    root = rng.normal(size=(n, n + 1))
    P = root @ root.T + 1e-3 * np.eye(n)
    q = 3.0 * rng.normal(size=n)
    lower = rng.uniform(-1.0, 0.0, size=n)
    upper = lower + rng.uniform(0.1, 1.5, size=n)
    if not boxed:
        upper[rng.random(n) < 0.5] = np.inf
    x0 = rng.uniform(lower - 1, np.where(np.isfinite(upper), upper, 2.0)) if start else None
    x = active_set_qp(P, q, lower, upper, x0=x0)
    best, reference = _brute_force_qp(P, q, lower, upper)
    assert x is not None
    assert np.all(x >= lower) and np.all(x <= upper)
    assert 0.5 * x @ P @ x + q @ x <= best + 1e-9 * max(1.0, abs(best))
    assert np.abs(x - reference).max() < 1e-7


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4), start=st.booleans())
def test_active_set_qp_with_a_weighted_equality_matches_brute_force(seed, n, start):
    # cᵀx = target with c ≠ 1 and target ≠ 1, a linear term and shifted lower bounds
    from marble_kit.balancing import _feasible_start, active_set_qp, refine_active_set

    rng = np.random.default_rng(seed)
    root = rng.normal(size=(n, n + 1))
    P = root @ root.T + 1e-3 * np.eye(n)
    q = rng.normal(size=n)
    c = rng.uniform(0.5, 2.0, size=n)
    lower = rng.uniform(0.0, 0.2, size=n)
    target = float(c @ lower) + rng.uniform(0.5, 3.0)
    x0 = lower + rng.uniform(0, 2, size=n) if start else None
    x = active_set_qp(P, q, lower, None, c, target, x0=x0)
    _, reference = _brute_force_qp(P, q, lower, np.full(n, np.inf), c, target)
    assert x is not None and abs(c @ x - target) < 1e-9 and np.all(x >= lower)
    assert np.abs(x - reference).max() < 1e-7
    # a feasible start: on the bounds, on the equality, along the given point's direction
    for guess in (lower.copy(), lower + rng.uniform(0, 2, size=n), np.full(n, np.nan)):
        begin = _feasible_start(c, target, lower, guess)
        assert np.all(begin >= lower - 1e-12) and abs(c @ begin - target) < 1e-9
    direction = rng.uniform(0.1, 2, size=n)
    begin = _feasible_start(c, target, lower, lower + direction)
    assert np.allclose((begin - lower) / direction, (begin - lower)[0] / direction[0])
    assert np.allclose(_feasible_start(c, target, lower, lower.copy()), lower + (target - c @ lower) / (n * c))
    assert np.array_equal(_feasible_start(None, 0.0, lower, lower - 1.0), lower)
    # refining (q = 0) from the optimum: one KKT solve, so one iteration is enough
    optimum = active_set_qp(P, None, lower, None, c, target)
    assert np.allclose(refine_active_set(P, c, target, lower, optimum, max_iter=1), optimum, atol=1e-12)


def test_active_set_qp_refuses_upper_bounds_with_an_equality_and_gives_up_within_max_iter():
    from marble_kit.balancing import active_set_qp

    P, n = np.eye(3), 3
    with pytest.raises(ValueError, match=r"^active_set_qp: an equality row needs \+inf upper bounds$"):
        active_set_qp(P, None, np.zeros(n), np.ones(n), c=np.ones(n), target=1.0)
    # min ½‖x − 5‖² on [0, 1]³ from the origin: several iterations (one per variable at its bound)
    q = -5.0 * np.ones(n)
    assert active_set_qp(P, q, np.zeros(n), np.ones(n), max_iter=1) is None
    assert np.array_equal(active_set_qp(P, q, np.zeros(n), np.ones(n)), np.ones(n))
    # a start at the bounds already (on the upper bound and exactly at the lower)
    assert np.array_equal(active_set_qp(P, q, np.zeros(n), np.ones(n), x0=np.ones(n), max_iter=1), np.ones(n))
    assert np.array_equal(active_set_qp(P, -q, np.zeros(n), np.ones(n), x0=np.zeros(n), max_iter=1), np.zeros(n))


def test_vertex_or_uniform_fallback_picks_the_best_feasible_candidate():
    from marble_kit.balancing import _vertex_or_uniform_fallback

    lower = np.array([0.1, 0.0, 0.2])
    c = np.array([1.0, 2.0, 0.5])
    # the vertex that puts all the slack on the cheap second coordinate: (0.1, 0.4, 0.2)
    x = _vertex_or_uniform_fallback(np.diag([1.0, 0.01, 1.0]), c, lower)
    assert np.allclose(x, [0.1, 0.4, 0.2]) and abs(c @ x - 1.0) < 1e-12
    # no floor, equal costs: the uniform point (⅓ each) beats every vertex (1 vs ⅓); with an
    # uneven simplex row c the uniform point is x_k = 1/(n·c_k)
    assert np.allclose(_vertex_or_uniform_fallback(np.eye(3), np.ones(3), np.zeros(3)), np.full(3, 1 / 3))
    c = np.array([1.0, 1.2, 0.9])
    assert np.allclose(_vertex_or_uniform_fallback(np.eye(3), c, np.zeros(3)), 1 / (3 * c))
    # K = 2 with a rectangular-looking call would misread n: the answer has K entries
    assert _vertex_or_uniform_fallback(np.diag([4.0, 1.0]), np.ones(2), np.zeros(2)).shape == (2,)


def test_kkt_residual_by_hand():
    gram = np.array([[2.0, 0.0], [0.0, 1.0]])
    optimum = np.array([1 / 3, 2 / 3])                  # (Gλ) = (2/3, 2/3): stationary
    assert kkt_residual(gram, optimum) == pytest.approx(0.0, abs=1e-15)
    # λ = (½, ½): Gλ = (1, ½), ν = mean = ¾ → violations ¼ each, relative to max(ν, Σ|G_kl|λ_l) = (1, ¾)
    assert kkt_residual(gram, np.array([0.5, 0.5])) == pytest.approx(1 / 3)
    # λ on its floor: only (Gλ)_k < ν is a violation there; λ = (0, 1): Gλ = (0, 1), ν = 1
    assert kkt_residual(gram, np.array([0.0, 1.0])) == pytest.approx(1.0)
    vertex = np.array([[1.0, 1.0], [1.0, 4.0]])          # λ = (1, 0) optimal: (Gλ)_2 = 1 ≥ ν = 1
    assert kkt_residual(vertex, np.array([1.0, 0.0])) == pytest.approx(0.0, abs=1e-15)
    # a weight of 1e-9 above the floor still counts as on the floor
    assert kkt_residual(vertex, np.array([1.0 - 1e-9, 1e-9])) == pytest.approx(0.0, abs=1e-15)
    # relative: the same at any gradient scale
    assert kkt_residual(1e-6 * gram, np.array([0.5, 0.5])) == pytest.approx(1 / 3)
    # a free weight whose (Gλ)_k is above ν violates too: G = diag(1, 1, 9), λ = (.45, .45, .1):
    # Gλ = (.45, .45, .9), ν = .6; the third is .3 above, relative to .9
    assert kkt_residual(np.diag([1.0, 1.0, 9.0]), np.array([0.45, 0.45, 0.1])) == pytest.approx(1 / 3)


def test_weights_balancer_base_logs_lambda_counts_degenerate_steps_and_warns_by_name():
    from marble_kit.balancing import WeightsBalancer

    class Half(WeightsBalancer):
        """A minimal subclass: loss weights that sum to ½ (degenerate on an all-zero Gram)."""
        name = "half"

        def solve(self, gram, active=None):
            degenerate = not gram.any()
            return np.array([0.1, 0.4]), {"balancer/degenerate": float(degenerate),
                                           "balancer/all_zero": float(degenerate)}

    balancer = Half(2)
    assert balancer.metrics == {}
    weights = balancer.weights(torch.eye(2, dtype=torch.float64), step=1)
    assert torch.equal(weights, torch.tensor([0.1, 0.4], dtype=torch.float64))
    assert torch.allclose(balancer.lam, torch.tensor([0.2, 0.8], dtype=torch.float64))   # w / Σw
    assert balancer.metrics["balancer/weight_sum"] == pytest.approx(0.5)
    assert balancer.metrics["balancer/degenerate_steps"] == 0.0
    with pytest.warns(RuntimeWarning, match=r"^balancer 'half': degenerate Gram matrix \(all_zero\)"):
        balancer.weights(torch.zeros(2, 2), step=2)
    with pytest.warns(RuntimeWarning, match=r"^balancer 'half': degenerate"):
        balancer.weights(torch.zeros(2, 2), step=3)
    assert balancer.metrics["balancer/degenerate_steps"] == 2.0
    assert balancer.state_dict()["degenerate_steps"].item() == 2.0


def test_balancer_option_and_state_messages_word_for_word():
    from marble_kit.balancing import check_max_weight, state_tensor

    with pytest.raises(MarbleError) as error:
        check_max_weight(0.5, "balancer 'upgrad'")
    assert str(error.value) == ("balancer 'upgrad': max_weight=0.5 must be ≥ 1 (a reward's own share 1/n "
                                "times n); it caps every loss weight (e.g. --balancer-opt max_weight=1000)")
    with pytest.raises(MarbleError) as error:
        state_tensor({}, "ema", (3,), "balancer 'marble'")
    assert str(error.value) == ("balancer 'marble': checkpoint balancer state has no 'ema'; it was written by "
                                "another balancer (resume with the same --balancer)")


def test_the_periodic_mode_solves_on_steps_0_n_2n():
    from marble_kit.balancing import solve_period_due

    assert [s for s in range(25) if solve_period_due(s, 10)] == [0, 10, 20]
    assert all(solve_period_due(s, 1) for s in range(5))
    with pytest.raises(MarbleError, match=r"^gram period must be ≥ 1, got 0$"):
        solve_period_due(3, 0)


def test_box_qp_batch_counts_its_rounds_and_finishes_unconverged_problems_exactly():
    from marble_kit.balancing import box_qp_batch

    H = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
    lower, upper = np.zeros((1, 3)), np.full((1, 3), np.inf)
    # the lower bounds are optimal (q ≥ 0): verified in the first round
    x, rounds, converged = box_qp_batch(H, lower, upper, q=np.ones((1, 3)))
    assert rounds == 1 and converged.all() and np.array_equal(x, lower)
    # an interior optimum: all three variables freed in round 1, verified in round 2
    q = -np.array([[1.0, 1.0, 1.0]])
    x, rounds, converged = box_qp_batch(H, lower, upper, q=q)
    assert rounds == 2 and converged.all()
    assert np.allclose(x[0], np.linalg.solve(H, -q[0]), atol=1e-12)
    # out of rounds: unconverged, unless the exact active-set method finishes it
    _, rounds, converged = box_qp_batch(H, lower, upper, max_iter=1, q=q, fallback=False)
    assert rounds == 1 and not converged.any()
    x2, _, converged = box_qp_batch(H, lower, upper, max_iter=1, q=q)
    assert converged.all() and np.allclose(x2, x, atol=1e-12)
    # several problems at once, one with finite upper bounds that bind; each as if alone
    lowers = np.array([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.2]])
    uppers = np.array([[np.inf] * 3, [0.1, 0.3, 0.25]])
    qs = np.array([[-1.0, 1.0, -2.0], [-1.0, -1.0, -1.0]])
    together, _, converged = box_qp_batch(H, lowers, uppers, q=qs)
    assert converged.all()
    for b in range(2):
        alone, _, _ = box_qp_batch(H, lowers[b:b + 1], uppers[b:b + 1], q=qs[b:b + 1])
        _, reference = _brute_force_qp(H, qs[b], lowers[b], uppers[b])
        assert np.allclose(together[b], alone[0], atol=1e-12) and np.allclose(together[b], reference, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(3, 5))
def test_min_norm_without_a_floor_takes_the_exact_fast_path(seed, k):
    # no floor, K ≥ 3, a full-rank Gram: the bound-constrained reformulation answers without OSQP
    # (0 iterations)
    gram = random_gram(seed, k, rank=k, log_spread=1.0)
    result = MinNormQP().solve(gram)
    _, reference = brute_force_min_norm(gram)
    assert np.abs(result.lam - reference).max() < 1e-7
    if reference @ gram @ reference > 1e-6 * np.diag(gram).max():   # 0 not in the hull
        assert result.metrics["balancer/qp_iterations"] == 0.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), batch=st.integers(1, 4))
def test_box_qp_batch_converges_on_its_own_to_the_brute_force_optimum(seed, n, batch):
    # block principal pivoting alone (no active-set fallback) on shifted, partly two-sided boxes
    from marble_kit.balancing import box_qp_batch

    rng = np.random.default_rng(seed)
    root = rng.normal(size=(n, n + 1))
    H = root @ root.T + 1e-2 * np.eye(n)
    q = 3.0 * rng.normal(size=(batch, n))
    lower = rng.uniform(-1.0, 0.5, size=(batch, n))
    upper = lower + rng.uniform(0.1, 2.0, size=(batch, n))
    upper[rng.random((batch, n)) < 0.4] = np.inf
    x, rounds, converged = box_qp_batch(H, lower, upper, q=q, fallback=False)
    assert converged.all() and 1 <= rounds <= 50
    for b in range(batch):
        _, reference = _brute_force_qp(H, q[b], lower[b], upper[b])
        assert np.abs(x[b] - reference).max() < 1e-8


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), rank=st.integers(1, 5),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_batched_pinv_solve_matches_numpy_pinv_on_singular_psd_matrices(seed, n, rank, scale):
    from marble_kit.balancing import _batched_pinv_solve

    rng = np.random.default_rng(seed)
    roots = rng.normal(size=(3, n, min(rank, n)))
    matrices = scale * roots @ roots.transpose(0, 2, 1)          # PSD, rank ≤ rank, any scale
    rhs = rng.normal(size=(3, n))
    expected = np.stack([np.linalg.pinv(m, rcond=1e-12, hermitian=True) @ r for m, r in zip(matrices, rhs)])
    assert np.allclose(_batched_pinv_solve(matrices, rhs), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    # the cutoff is relative to the largest eigenvalue, also when that is small: 1e-13 / 1e-3 = 1e-10 stays
    small = np.diag([1e-3, 1e-13])[None]
    assert np.allclose(_batched_pinv_solve(small, np.ones((1, 2))), [[1e3, 1e13]])


def test_the_min_norm_fast_path_refuses_an_answer_it_cannot_verify(monkeypatch):
    from marble_kit import balancing

    unit = np.array([[1.0, 0.2, -0.1], [0.2, 1.0, 0.3], [-0.1, 0.3, 1.0]])
    c = np.array([1.0, 0.8, 0.6])
    exact = balancing._min_norm_by_bounds(unit, c)
    assert exact is not None and abs(c @ exact - 1.0) < 1e-12
    x_star, _, _ = balancing.box_qp_batch(unit, np.zeros((1, 3)), np.full((1, 3), np.inf), q=-c[None, :])
    x_star = x_star[0]

    def answer(x, converged=True):
        monkeypatch.setattr(balancing, "box_qp_batch",
                            lambda *args, **kwargs: (np.asarray(x, float)[None, :], 1, np.array([converged])))
        return balancing._min_norm_by_bounds(unit, c)

    assert answer(x_star) == pytest.approx(exact)                  # the real answer passes
    assert answer(x_star, converged=False) is None                # unconverged
    assert answer([np.nan, 0.0, 0.0]) is None                      # not finite
    assert answer([0.0, 0.0, 0.0]) is None                         # the min-norm point would be 0
    assert answer(x_star * 1e13) is None                          # runaway (unbounded) QP
    assert answer(2.0 * x_star) is None                            # stationary signs, wrong magnitude
    # a point stationary on too small a support: another coordinate's gradient is negative
    single = np.array([c[0] / unit[0, 0], 0.0, 0.0])
    assert np.any(unit @ single - c < 0)
    assert answer(single) is None


@pytest.mark.parametrize("seed", [0, 2, 4, 12, 13, 26, 71])
def test_box_qp_batch_reaches_the_optimum_of_ill_conditioned_problems_through_murtys_rule(seed):
    # curvatures spread over 10^±2 per variable (condition numbers 4e6 … 4e10): full exchanges
    # cycle, and the single-exchange backup (Murty's rule) must finish; 14–55 rounds here
    from marble_kit.balancing import box_qp_batch

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    root = rng.normal(size=(n, n)) * 10.0 ** rng.uniform(-2, 2, size=(1, n))
    H = root @ root.T + 1e-6 * np.eye(n)
    q = 10 * rng.normal(size=(1, n))
    lower = rng.uniform(-1, 0, size=(1, n))
    upper = lower + rng.uniform(0.05, 1, size=(1, n))
    x, rounds, converged = box_qp_batch(H, lower, upper, q=q, max_iter=200, fallback=False)
    assert converged.all() and rounds > 5
    best, reference = _brute_force_qp(H, q[0], lower[0], upper[0])
    value = 0.5 * x[0] @ H @ x[0] + q[0] @ x[0]
    assert value <= best + 1e-9 * abs(best)
    assert np.abs(x[0] - reference).max() <= 1e-6 * (upper - lower).max()


def test_option_and_gram_messages_word_for_word():
    from marble_kit.balancing import as_gram_array, check_gram_metric, check_min_weight, check_normalize

    def message(call):
        with pytest.raises(MarbleError) as error:
            call()
        return str(error.value)

    assert message(lambda: check_normalize("l2", "balancer 'marble'")) == (
        "balancer 'marble': normalize='l2' is not one of none, unit (e.g. --balancer-opt normalize=\"unit\")")
    assert message(lambda: check_gram_metric("l1", "balancer 'mgda-qp'")) == (
        "balancer 'mgda-qp': metric='l1' is not one of euclidean, adam, adam-momentum")
    assert message(lambda: check_min_weight(0.5, 4, "balancer 'marble'")) == (
        "balancer 'marble': min_weight=0.5 must satisfy 0 ≤ min_weight ≤ 1/K = 0.25 for K=4 rewards")
    assert check_min_weight(0.25, 4, "b") == 0.25                      # exactly 1/K is allowed
    assert message(lambda: as_gram_array(None, 2, "balancer 'marble'")) == (
        "balancer 'marble' needs the per-reward Gram matrix; train with --gram affine, exact or periodic (not none)")
    # a list or an integer array is read as float64, a tensor too
    assert as_gram_array([[1, 0], [0, 2]], 2, "b").dtype == np.float64
    assert as_gram_array(torch.eye(2, dtype=torch.float32), 2, "b").dtype == np.float64


def test_balance_adapts_a_balancer_written_before_the_active_mask():
    from marble_kit.balancing import accepts_active, balance

    class Legacy:
        """weights(gram, step): the contract before `active` existed."""
        def __init__(self):
            self.calls = []

        def weights(self, gram, step):
            self.calls.append((None if gram is None else gram.clone(), step))
            return torch.full((3,), 1.0 / 3, dtype=torch.float64)

    class Current:
        def weights(self, gram, step, active=None):
            return torch.tensor([float(step), 0.0, 0.0 if active is None else float(active.sum())])

    assert not accepts_active(Legacy()) and accepts_active(Current())
    assert balance(Current(), torch.eye(3), 7, active=torch.tensor([True, False, True])).tolist() == [7.0, 0.0, 2.0]
    legacy = Legacy()
    gram = torch.arange(1.0, 10.0, dtype=torch.float64).view(3, 3)
    weights = balance(legacy, gram, 5, active=torch.tensor([True, False, True]))
    seen, step = legacy.calls[-1]
    assert step == 5
    assert torch.equal(seen, torch.tensor([[1.0, 0, 3], [0, 0, 0], [7, 0, 9]], dtype=torch.float64))
    assert weights.tolist() == [1 / 3, 0.0, 1 / 3]
    # every reward active (or no mask, or no Gram): the call is passed through untouched
    cases = ((torch.ones(3, dtype=torch.bool), gram), (None, gram), (torch.tensor([True, False, True]), None))
    for active, passed in cases:
        balance(legacy, passed, 6, active=active)
        seen, step = legacy.calls[-1]
        assert step == 6 and (seen is None if passed is None else torch.equal(seen, gram))


def test_clean_simplex_by_hand():
    from marble_kit.balancing import _clean_simplex

    members = np.array([True, True, False])
    assert np.allclose(_clean_simplex(np.array([0.2, 0.6, 0.5]), 0.0, members), [0.25, 0.75, 0.0])
    # round-off below the floor is lifted to it, then everything renormalized
    assert np.allclose(_clean_simplex(np.array([0.1 - 1e-12, 0.9, 0.0]), 0.1, members), [0.1, 0.9, 0.0])
    assert np.allclose(_clean_simplex(np.array([np.nan, 0.5, 0.0]), 0.0, members), [0.0, 1.0, 0.0])
    # nothing left: uniform over the members; no members: all zero
    assert np.allclose(_clean_simplex(np.array([0.0, -0.0, 3.0]), 0.0, members), [0.5, 0.5, 0.0])
    assert np.array_equal(_clean_simplex(np.array([0.3, 0.3, 0.4]), 0.0, np.zeros(3, bool)), np.zeros(3))


def test_two_reward_min_norm_is_closed_form_without_a_solver():
    # spread = ‖g₁ − g₂‖² in λ units; t = (b − r)/spread clipped to [0, 1]
    for gram, expected in ((np.array([[1.0, 1.0], [1.0, 1.0]]), [0.5, 0.5]),      # identical: the midpoint, no 0/0
                           (np.array([[1.0, 2.0], [2.0, 4.0]]), [1.0, 0.0]),      # aligned: the shorter
                           (np.array([[4.0, 0.0], [0.0, 1.0]]), [0.2, 0.8]),
                           (np.array([[1.0, 0.8], [0.8, 0.7]]), [0.0, 1.0]),      # spread 0.1 < 1: the endpoint g₂
                           (np.array([[0.5, 0.3], [0.3, 0.6]]), [0.6, 0.4])):     # spread 0.5: t = 0.3/0.5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = MinNormQP().solve(gram)
        assert np.allclose(result.lam, expected, rtol=0, atol=1e-12)
        assert result.metrics["balancer/qp_iterations"] == 0.0 and result.metrics["balancer/solver_fallback"] == 0.0
    assert np.array_equal(MinNormQP().solve(np.ones((2, 2))).lam, [0.5, 0.5])


def _degenerate_warning(name):
    balancer = make(name, 3)
    gram = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, float("nan")]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balancer.weights(gram, 0)
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    return warning


@pytest.mark.parametrize("name", ["mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"])
def test_degenerate_warning_names_every_issue(name):
    assert str(_degenerate_warning(name).message) == (
        f"balancer {name!r}: degenerate Gram matrix (zero_gradient, nonfinite); "
        "used its defined answer (see the balancer's docs)")


@pytest.mark.parametrize("name", ["mgda-qp", "marble", "upgrad", "pcgrad", "cagrad"])
def test_degenerate_warning_points_at_the_caller_of_weights(name):
    if Path(__file__).parent.parent.name == "mutants":  # mutmut's trampolines add stack frames
        pytest.skip("a stack level cannot be judged in mutmut's copy of the tree")
    assert _degenerate_warning(name).filename == __file__


def test_min_norm_special_cases_by_hand():
    # one direction left under unit normalization: it takes all the weight, without a solve
    single = MinNormQP().solve(np.diag([2.0, 0.0]), normalize="unit")
    assert np.allclose(single.lam, [1.0, 0.0]) and single.metrics["balancer/qp_iterations"] == 0.0
    # no direction at all under unit normalization: nothing to balance
    nothing = MinNormQP().solve(np.zeros((2, 2)), normalize="unit")
    assert np.array_equal(nothing.lam, np.zeros(2)) and np.array_equal(nothing.weights, np.zeros(2))
    # zero gradients with a floor: the nonzero ones keep the floor, the zero ones share the rest
    gram = np.diag([1.0, 3.0, 0.0, 0.0])
    floored = MinNormQP().solve(gram, min_weight=0.1)
    assert np.allclose(floored.lam, [0.1, 0.1, 0.4, 0.4])


def test_the_active_mask_is_read_from_tensors_arrays_and_lists():
    from marble_kit.balancing import as_active_mask

    expected = np.array([True, False, True])
    for active in (torch.tensor([True, False, True]), np.array([1, 0, 1]), [True, False, True]):
        mask = as_active_mask(active, 3, "w")
        assert mask.dtype == bool and np.array_equal(mask, expected)
    assert np.array_equal(as_active_mask(None, 2, "w"), [True, True])
    with pytest.raises(MarbleError, match=r"w: active must be a \(3,\) bool mask, got shape \(2,\)"):
        as_active_mask(np.array([True, False]), 3, "w")


def test_balancer_metrics_and_loss_weights_by_hand():
    from marble_kit.balancing import balancer_metrics, loss_weights

    metrics = balancer_metrics({"nonfinite": False, "zero_gradient": True}, np.array([True, True, False]))
    assert metrics == {"balancer/nonfinite": 0.0, "balancer/zero_gradient": 1.0, "balancer/degenerate": 1.0,
                       "balancer/active_rewards": 2.0}
    lam, norms = np.array([0.5, 0.2, 0.3]), np.array([2.0, 0.0, 4.0])
    assert np.array_equal(loss_weights(lam, norms, "none"), lam)
    # unit: s = mean of the nonzero norms (3), w = s·λ/‖g‖, 0 for the reward without a direction
    assert np.allclose(loss_weights(lam, norms, "unit"), [3 * 0.5 / 2, 0.0, 3 * 0.3 / 4], rtol=1e-15, atol=0)


def test_results_are_float64_tensors():
    from marble_kit.balancing import to_tensor, uniform

    for values in (np.array([0.25, 0.75], dtype=np.float32), [1, 2]):
        assert to_tensor(values).dtype == torch.float64
    assert uniform(4).dtype == torch.float64 and torch.equal(uniform(4), torch.full((4,), 0.25, dtype=torch.float64))


def test_sanitize_leaves_a_psd_gram_untouched_and_flags_rank_relative_to_the_largest_eigenvalue():
    from marble_kit.balancing import RANK_TOL

    rng = np.random.default_rng(3)
    g = rng.normal(size=(4, 9)) * np.array([[0.5], [2.0], [1.0], [3.0]])
    gram = g @ g.T
    clean = sanitize_gram(gram)
    norms = np.sqrt(np.diag(gram))
    assert np.array_equal(clean.unit, (0.5 * gram + 0.5 * gram.T) / norms[:, None] / norms[None, :])  # no re-projection
    assert not clean.flags["non_psd"] and not clean.flags["rank_deficient"]
    # three unit gradients with eigenvalues (ε, 1.5, 1.5): rank deficient iff ε < RANK_TOL · λ_max
    v = np.ones(3) / np.sqrt(3.0)
    for eps, deficient in ((1.3 * RANK_TOL, True), (1.75 * RANK_TOL, False)):
        two_by_two = np.array([[1.0, 1.0 - 1.0 * eps], [1.0 - 1.0 * eps, 1.0]])  # eigenvalues (ε, 2 − ε)
        assert sanitize_gram(two_by_two).flags["rank_deficient"] is (eps < 2 * RANK_TOL)
        three = 1.5 * np.eye(3) - (1.5 - eps) * np.outer(v, v)
        assert sanitize_gram(three).flags["rank_deficient"] is deficient


def test_dense_qp_is_quiet_and_its_polished_answer_exact_to_round_off(capfd):
    from marble_kit.balancing import DenseQP, active_set_qp

    P, A, lower, upper = _simplex_qp(0)
    result = DenseQP().solve(P, A, lower, upper)
    exact = active_set_qp(P, None, np.zeros(4), c=np.ones(4), target=1.0)
    assert np.abs(result.x - exact).max() < 1e-14  # polishing: OSQP alone stops ~1e-10 away
    assert capfd.readouterr().out == ""


def test_box_qp_batch_handles_binding_upper_bounds_and_keeps_an_unfinished_answer_in_the_box():
    from marble_kit.balancing import box_qp_batch

    eye, q = np.eye(2), np.array([[-5.0, -5.0]])
    lower, upper = np.zeros((1, 2)), np.ones((1, 2))
    x, _, converged = box_qp_batch(eye, lower, upper, q=q, fallback=False)  # unconstrained optimum (5, 5)
    assert converged.all() and np.array_equal(x, upper)
    # out of rounds after freeing both: the free solve (5, 5) is clipped back into the box ...
    x, rounds, converged = box_qp_batch(eye, lower, upper, q=q, max_iter=2, fallback=False)
    assert rounds == 2 and not converged.any() and np.all((x >= lower) & (x <= upper))
    # ... and the exact fallback finishes it with its upper bounds
    x, _, converged = box_qp_batch(eye, lower, upper, q=q, max_iter=2)
    assert converged.all() and np.array_equal(x, upper)
    # a coupled free solve that lands below a lower bound, (−1, 1), is clipped too
    H, q = np.array([[1.0, 2.0], [2.0, 5.0]]), np.array([[-1.0, -3.0]])
    x, _, converged = box_qp_batch(H, lower, np.full((1, 2), np.inf), q=q, max_iter=2, fallback=False)
    assert not converged.any() and np.all(x >= lower)


def test_min_norm_on_the_osqp_path_is_exact_and_its_osqp_iterate_is_the_warm_start():
    # a floor takes the OSQP path: OSQP's iterate, refined by the exact active-set solve
    for seed in range(5):
        rng = np.random.default_rng(seed)
        g = rng.normal(size=(4, 8)) * 10.0 ** rng.uniform(-1, 1, size=(4, 1))
        gram = g @ g.T
        solver = MinNormQP()
        result = solver.solve(gram, min_weight=0.05)
        assert kkt_residual(gram, result.lam, min_weight=0.05) < 1e-12
        assert set(result.metrics) == {f"balancer/{name}" for name in (
            "nonfinite", "zero_gradient", "no_active", "all_zero", "non_psd", "rank_deficient", "solver_fallback",
            "degenerate", "active_rewards", "qp_iterations")}
        assert result.metrics["balancer/solver_fallback"] == 0.0 and result.metrics["balancer/qp_iterations"] > 0
        # the warm start kept for the next solve is OSQP's answer in μ = λ/c (c = (1/‖g‖)/max)
        c = (1.0 / result.norms) / (1.0 / result.norms).max()
        assert np.abs(solver.state_dict()["qp_warm_x"].numpy() - result.lam / c).max() < 1e-6


def test_min_norm_with_zero_gradients_and_a_floor_by_hand():
    # two nonzero gradients and a zero one, floor 0.1: the zero gradient takes everything the
    # floors leave (its slack variable has no curvature)
    for gram in (np.diag([1.0, 4.0, 0.0]), np.diag([4.0, 1.0, 0.0])):
        result = MinNormQP().solve(gram, min_weight=0.1)
        assert np.allclose(result.lam, [0.1, 0.1, 0.8], atol=1e-12)
    # one nonzero gradient and a zero one: the same, not all the weight on the nonzero one
    result = MinNormQP().solve(np.diag([2.0, 0.0]), min_weight=0.2)
    assert np.allclose(result.lam, [0.2, 0.8], atol=1e-12)


def test_unit_weights_that_overflow_fall_back_to_lambda():
    # norms 1e154 and 1e-160 under unit normalization: s·λ/‖g‖ overflows float64 (and a Gram
    # entry near float64's max must survive the symmetrization)
    gram = np.diag([1e308, 1e-320])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = MinNormQP().solve(gram, normalize="unit")
    assert np.allclose(result.lam, [0.5, 0.5]) and np.array_equal(result.weights, result.lam)
    assert result.metrics["balancer/solver_fallback"] == 1.0


def test_a_duplicated_gradient_shares_its_weight_evenly_on_the_osqp_path():
    # the optimum is not unique when two rewards have the same gradient: the exact refinement
    # (least squares on the KKT system) splits evenly; OSQP alone leaves them ~1e-10 apart
    for seed in (0, 1, 3):
        a, b, c = np.random.default_rng(seed).normal(size=(3, 6))
        gradients = np.stack([a, a, b, c])
        result = MinNormQP().solve(gradients @ gradients.T, min_weight=0.05)
        assert abs(result.lam[0] - result.lam[1]) < 1e-14 and result.lam[0] > 0.05


def test_min_norm_when_no_refinement_verifies_returns_osqps_point_made_feasible(monkeypatch):
    # the last resort (no input is known to reach it): the exact refinement fails from OSQP's
    # point and from the best vertex; the answer is OSQP's iterate moved onto the feasible set
    # (floors kept), a fallback when OSQP did not converge either
    from marble_kit import balancing
    from marble_kit.balancing import QPResult, _vertex_or_uniform_fallback

    g = np.random.default_rng(0).normal(size=(3, 5))
    gram = g @ g.T
    norms = np.sqrt(np.diag(gram))
    c = (1.0 / norms) / (1.0 / norms).max()
    floor = 0.1
    monkeypatch.setattr(balancing, "refine_active_set", lambda *args, **kwargs: None)
    iterate = np.array([3.0, 0.0, 1.0]) / c                    # λ = (3, 0, 1): off the simplex, below a floor
    monkeypatch.setattr(balancing.DenseQP, "solve", lambda self, *args: QPResult(iterate.copy(), False, 7, False))
    result = MinNormQP().solve(gram, min_weight=floor)
    # by hand: λ = floor + (λ' − floor)·(1 − 3·floor)/Σ(λ' − floor) with λ' = max(λ, floor) = (3, 0.1, 1)
    excess = np.array([2.9, 0.0, 0.9])
    assert np.allclose(result.lam, floor + excess * (1 - 3 * floor) / excess.sum(), rtol=1e-12, atol=0)
    assert result.metrics["balancer/solver_fallback"] == 1.0 and result.metrics["balancer/qp_iterations"] == 7.0
    # converged but unverified: not a fallback
    monkeypatch.setattr(balancing.DenseQP, "solve", lambda self, *args: QPResult(iterate.copy(), True, 7, False))
    assert MinNormQP().solve(gram, min_weight=floor).metrics["balancer/solver_fallback"] == 0.0
    # a non-finite iterate is dropped: the best vertex (or the uniform point) instead
    monkeypatch.setattr(balancing.DenseQP, "solve",
                        lambda self, *args: QPResult(np.full(3, np.nan), False, 9, False))
    result = MinNormQP().solve(gram, min_weight=floor)
    vertex = _vertex_or_uniform_fallback(gram / norms[:, None] / norms[None, :], c, floor / c)
    assert np.allclose(result.lam, vertex * c, rtol=1e-12) and np.all(result.lam >= floor - 1e-15)
