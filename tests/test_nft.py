"""The DiffusionNFT loss: affinity in r, closed-form cotangents vs torch.autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.advantages import group_advantages
from marble_kit.nft import (
    affine_cotangents_autograd,
    anchor_cotangent,
    anchor_loss,
    fused_row_weights,
    nft_cotangents,
    nft_loss_per_sample,
    reward_row_coefficients,
    velocity_loss_per_sample,
)


def _batch(seed, batch=6, shape=(4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v_old = (noise - x0) + 0.3 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    v = (v_old + 0.1 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    return v, v_old, x_t, x0, t


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), beta=st.sampled_from([0.1, 0.5, 1.0]))
def test_weighted_losses_equal_loss_of_effective_r(seed, k, beta):
    """Σ_k λ_k L_k == L(r_eff), r_eff = Σ λ_k r_k — with clipped advantages and NaN rewards."""
    v, v_old, x_t, x0, t = _batch(seed)
    g = torch.Generator().manual_seed(seed + 1)
    rewards = torch.randn(k, v.shape[0], generator=g, dtype=torch.float64) * 10  # large → clipping
    rewards[0, :2] = float("nan")
    r = group_advantages(rewards, torch.arange(v.shape[0]) // 3, clip=1.0).probabilities.double()
    lam = torch.rand(k, generator=g, dtype=torch.float64)
    lam = lam / lam.sum()
    losses = torch.stack([nft_loss_per_sample(v, v_old, x_t, x0, t, r[i], beta).mean() for i in range(k)])
    fused = nft_loss_per_sample(v, v_old, x_t, x0, t, lam @ r, beta).mean()
    assert torch.allclose(lam @ losses, fused, rtol=1e-9, atol=1e-12)
    # and the gradient of L(r_eff) equals Σ λ_k ∇L_k from separate backward passes
    grads = torch.stack([torch.autograd.grad(losses[i], v, retain_graph=True)[0] for i in range(k)])
    (fused_grad,) = torch.autograd.grad(fused, v)
    assert torch.allclose(torch.einsum("k,k...->...", lam, grads), fused_grad, rtol=1e-9, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.05, 0.1, 1.0]))
def test_closed_form_cotangents_match_autograd(seed, beta):
    v, v_old, x_t, x0, t = _batch(seed)
    r = torch.rand(v.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (expected,) = torch.autograd.grad(nft_loss_per_sample(v, v_old, x_t, x0, t, r, beta).mean(), v)
    U, W = nft_cotangents(v, v_old, x_t, x0, t, beta)
    assert torch.allclose(U + r.view(-1, 1, 1, 1) * W, expected, rtol=1e-9, atol=1e-15)
    # U and W do not depend on r: the same pair serves any reward
    (expected_other,) = torch.autograd.grad(nft_loss_per_sample(v, v_old, x_t, x0, t, 1 - r, beta).mean(), v)
    assert torch.allclose(U + (1 - r).view(-1, 1, 1, 1) * W, expected_other, rtol=1e-9, atol=1e-15)


def test_cotangents_with_global_normalizer_for_micro_batches():
    v, v_old, x_t, x0, t = _batch(3, batch=8)
    r = torch.rand(8, dtype=torch.float64)
    (full,) = torch.autograd.grad(nft_loss_per_sample(v, v_old, x_t, x0, t, r, 0.1).mean(), v)
    U, W = nft_cotangents(v[:4], v_old[:4], x_t[:4], x0[:4], t[:4], 0.1, num_samples=8)
    assert torch.allclose(U + r[:4].view(-1, 1, 1, 1) * W, full[:4], rtol=1e-9)


def test_velocity_space_loss_is_affine_and_autograd_cotangents():
    v, v_old, x_t, x0, t = _batch(5)
    r = torch.rand(v.shape[0], dtype=torch.float64)

    def loss(out, rr):
        return velocity_loss_per_sample(out, v_old, x_t, x0, t, rr, 0.1).mean()

    U, W = affine_cotangents_autograd(loss, v)
    (expected,) = torch.autograd.grad(loss(v, r), v)
    assert torch.allclose(U + r.view(-1, 1, 1, 1) * W, expected, rtol=1e-9)


def test_anchor_cotangent_matches_autograd():
    v, v_old, *_ = _batch(7)
    (expected,) = torch.autograd.grad(anchor_loss(v, v_old), v)
    assert torch.allclose(anchor_cotangent(v, v_old), expected)


def test_loss_prefers_the_better_side():
    """r = 1 pulls v_θ towards the data (positive branch); r = 0 pushes the other way."""
    v, v_old, x_t, x0, t = _batch(11)
    target_v = ((x_t - x0) / t.view(-1, 1, 1, 1)).detach()
    ones, zeros = torch.ones(v.shape[0], dtype=v.dtype), torch.zeros(v.shape[0], dtype=v.dtype)
    (g_pos,) = torch.autograd.grad(nft_loss_per_sample(v, v_old, x_t, x0, t, ones, 0.5).mean(), v)
    (g_neg,) = torch.autograd.grad(nft_loss_per_sample(v, v_old, x_t, x0, t, zeros, 0.5).mean(), v)
    towards_data = (target_v - v).detach()
    assert (-(g_pos * towards_data).sum()) > 0
    assert (-(g_neg * towards_data).sum()) < 0


# ------------------------------------------------------ masked per-reward losses (SPEC §1.4–1.5)
def _masked_problem(seed: int, k: int, batch: int = 9, group: int = 3):
    """Rewards with NaN patterns (one reward judging nothing, one scoring every group equally)."""
    g = torch.Generator().manual_seed(seed + 1)
    rewards = torch.randn(k, batch, generator=g, dtype=torch.float64) * 3
    rewards[torch.rand(k, batch, generator=g) < 0.35] = float("nan")
    if k > 1:
        rewards[1] = float("nan")                      # judges nothing
    if k > 2:
        rewards[2] = torch.arange(batch, dtype=torch.float64).div(group).floor() * 0.1  # constant per group
    adv = group_advantages(rewards, torch.arange(batch) // group, clip=2.0)
    judged = adv.valid
    coef = reward_row_coefficients(judged, judged.sum(1))
    return adv, judged, coef


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), beta=st.sampled_from([0.1, 1.0]))
def test_masked_losses_are_means_over_judged_rows_and_fuse_into_one_loss(seed, k, beta):
    """L_k = mean of ℓ_k over the rows reward k judges (0 without any), and for any w ≥ 0
    Σ_k w_k L_k = Σ_i c_i·ℓ(i; r_eff(i)) — value and gradient, with NaN patterns and clipping."""
    v, v_old, x_t, x0, t = _batch(seed, batch=9)
    adv, judged, coef = _masked_problem(seed, k)
    r = adv.probabilities.double()
    per_row = torch.stack([nft_loss_per_sample(v, v_old, x_t, x0, t, r[i], beta) for i in range(k)])
    losses = (coef * per_row).sum(1)
    for i in range(k):
        expected = per_row[i][judged[i]].mean() if judged[i].any() else torch.zeros((), dtype=torch.float64)
        assert torch.allclose(losses[i], expected, rtol=1e-12, atol=1e-15)
    w = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    c, r_eff = fused_row_weights(w, coef, r)
    fused = (c * nft_loss_per_sample(v, v_old, x_t, x0, t, r_eff, beta)).sum()
    assert torch.allclose(w @ losses, fused, rtol=1e-9, atol=1e-12)
    grads = torch.stack([torch.autograd.grad(losses[i], v, retain_graph=True)[0] for i in range(k)])
    (fused_grad,) = torch.autograd.grad(fused, v)
    assert torch.allclose(torch.einsum("k,k...->...", w, grads), fused_grad, rtol=1e-9, atol=1e-14)
    assert ((r_eff >= 0) & (r_eff <= 1)).all()
    assert torch.equal(c == 0, ~judged.any(0) | (w[:, None] * judged == 0).all(0))


def test_preference_and_judged_counts_of_the_advantages():
    """A reward that judges nothing, or scores every group equally, expresses no preference;
    its advantages are exactly 0 (also where the group mean is not exact in floating point)."""
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.3, 0.3, 0.3],        # equal within each group
                            [float("nan")] * 6,                    # judges nothing
                            [0.1, 0.2, float("nan"), 5.0, 5.0, 5.0]], dtype=torch.float64)
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert adv.judged().tolist() == [6, 0, 5]
    assert adv.expresses_preference().tolist() == [False, False, True]
    assert (adv.advantages[0] == 0).all() and (adv.advantages[2, 3:] == 0).all()
    assert (adv.probabilities[:2] == 0.5).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), world=st.sampled_from([2, 3]))
def test_rank_shares_with_global_counts_average_to_the_global_masked_mean(seed, world):
    """n_k counts the judged rows of all ranks: each rank's Σ coef·ℓ with coef = W·m/n_k, averaged
    over ranks (the gradient all-reduce), is the mean over the judged rows of the whole batch,
    even when the ranks judge different numbers of rows."""
    batch = 12
    v, v_old, x_t, x0, t = _batch(seed, batch=batch)
    adv, judged, _ = _masked_problem(seed, 4, batch=batch)
    r = adv.probabilities.double()
    per_row = torch.stack([nft_loss_per_sample(v, v_old, x_t, x0, t, r[i], 0.5) for i in range(4)])
    counts = judged.sum(1)
    shares = [(reward_row_coefficients(judged[:, part], counts, scale=world) * per_row[:, part]).sum(1)
              for part in torch.arange(batch).chunk(world)]
    averaged = torch.stack(shares).mean(0)
    whole = (reward_row_coefficients(judged, counts) * per_row).sum(1)
    assert torch.allclose(averaged, whole, rtol=1e-12, atol=1e-15)


def test_losses_against_hand_computed_values():
    """One element: x_t = 1, x0 = 0.2, t = 0.5, v_θ = 1, v_old = 2, β = 0.5, r = 0.25.
    v⁺ = 1.5, v⁻ = 2.5. Velocity space (target (x_t − x0)/t = 1.6): e⁺ = 0.01, e⁻ = 0.81,
    ℓ = (0.25·0.01 + 0.75·0.81)/0.5 = 1.22. x0 space: x̂0⁺ = 0.25, x̂0⁻ = −0.25, so
    e⁺ = 0.05²/0.05 = 0.05, e⁻ = 0.45²/0.45 = 0.45 and ℓ = (0.25·0.05 + 0.75·0.45)/0.5 = 0.7."""
    def one(value):
        return torch.tensor([[value]], dtype=torch.float64)

    args = (one(1.0), one(2.0), one(1.0), one(0.2), torch.tensor([0.5], dtype=torch.float64),
            torch.tensor([0.25], dtype=torch.float64), 0.5)
    assert velocity_loss_per_sample(*args).item() == pytest.approx(1.22, rel=1e-12)
    assert nft_loss_per_sample(*args).item() == pytest.approx(0.7, rel=1e-12)
    # the anchor: mean over elements, then over samples
    assert anchor_loss(one(1.0), one(0.5)).item() == pytest.approx(0.25)
