"""The DiffusionNFT loss (SPEC §1.4) and its output-space cotangents U, W (SPEC §1.6).

For sample i with reward probability r(i), old velocity v_old and trainable velocity v_θ:

    v⁺ = (1−β)·v_old + β·v_θ          v⁻ = (1+β)·v_old − β·v_θ
    x̂0^± = x_t − t·v^±
    e^± = mean((x̂0^± − x0)²) / stopgrad(max(mean|x̂0^± − x0|, 1e-5))
    ℓ(i) = [ r(i)·e⁺(i) + (1 − r(i))·e⁻(i) ] / β

ℓ is affine in r, so the gradient of (1/N)·Σ_i ℓ(i) with respect to v_θ(i) is U_i + r(i)·W_i
with U, W independent of r: the basis of the single-backward fused update and of the exact
two-pass `affine` Gram.
"""

from __future__ import annotations

import torch

ADAPTIVE_WEIGHT_FLOOR = 1e-5


def _expand(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, 1, ...] broadcastable against ``like``."""
    return per_sample.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def implicit_predictions(v_theta, v_old, beta: float):
    """The implicit positive and negative policies v⁺, v⁻."""
    v_pos = (1.0 - beta) * v_old + beta * v_theta
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    return v_pos, v_neg


def _residual_and_weight(v, x_t, x0, t):
    """x̂0 − x0 and the stop-gradient adaptive weight max(mean|x̂0 − x0|, 1e-5)."""
    residual = (x_t - _expand(t, x_t) * v) - x0
    weight = residual.detach().abs().mean(dim=_reduce_dims(residual)).clamp_min(ADAPTIVE_WEIGHT_FLOOR)
    return residual, weight


def nft_errors(v_theta, v_old, x_t, x0, t, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample adaptive errors (e⁺, e⁻), each [B]."""
    v_pos, v_neg = implicit_predictions(v_theta, v_old, beta)
    errors = []
    for v in (v_pos, v_neg):
        residual, weight = _residual_and_weight(v, x_t, x0, t)
        errors.append(residual.pow(2).mean(dim=_reduce_dims(residual)) / weight)
    return errors[0], errors[1]


def nft_loss_per_sample(v_theta, v_old, x_t, x0, t, r, beta: float) -> torch.Tensor:
    """ℓ(i) of SPEC §1.4 for each sample, shape [B]. ``r`` is [B] (any real; affine in r)."""
    e_pos, e_neg = nft_errors(v_theta, v_old, x_t, x0, t, beta)
    r = r.to(e_pos.dtype)
    return (r * e_pos + (1.0 - r) * e_neg) / beta


def nft_cotangents(v_theta, v_old, x_t, x0, t, beta: float,
                   num_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U, W with ∂/∂v_θ [ (1/N)·Σ_i ℓ(i) ] = U + r·W (closed form, no autograd).

    ``num_samples`` is N, the denominator of the mean (default: this batch's size; pass the
    global batch size when the batch is split into micro-batches).
    Derivation: ∂e^±/∂v_θ = ∓(2β·t/D)·(x̂0^± − x0)/w^±, so with c = 2t/(N·D):
    U = (1/β)·∂e⁻/∂v_θ / N = c·(x̂0⁻ − x0)/w⁻ and W = (∂e⁺ − ∂e⁻)/(β·N) = −c·[(x̂0⁺ − x0)/w⁺ + (x̂0⁻ − x0)/w⁻].
    """
    v_theta = v_theta.detach()
    n = v_theta.shape[0] if num_samples is None else num_samples
    dims = v_theta[0].numel()
    v_pos, v_neg = implicit_predictions(v_theta, v_old, beta)
    residual_pos, weight_pos = _residual_and_weight(v_pos, x_t, x0, t)
    residual_neg, weight_neg = _residual_and_weight(v_neg, x_t, x0, t)
    c = _expand(2.0 * t / (n * dims), v_theta)
    scaled_pos = residual_pos / _expand(weight_pos, v_theta)
    scaled_neg = residual_neg / _expand(weight_neg, v_theta)
    return c * scaled_neg, -c * (scaled_pos + scaled_neg)


def anchor_loss(v_theta, v_ref, num_samples: int | None = None) -> torch.Tensor:
    """The unbalanced reference anchor mean_i ‖v_θ − v_ref‖² (mean over elements, then samples)."""
    n = v_theta.shape[0] if num_samples is None else num_samples
    per_sample = (v_theta - v_ref).pow(2).mean(dim=_reduce_dims(v_theta))
    return per_sample.sum() / n


def anchor_cotangent(v_theta, v_ref, num_samples: int | None = None) -> torch.Tensor:
    """∂ anchor_loss / ∂v_θ in closed form."""
    n = v_theta.shape[0] if num_samples is None else num_samples
    return 2.0 * (v_theta.detach() - v_ref) / (n * v_theta[0].numel())


def velocity_loss_per_sample(v_theta, v_old, x_t, x0, t, r, beta: float) -> torch.Tensor:
    """The plain velocity-space variant: [r·‖v⁺ − v‖² + (1−r)·‖v⁻ − v‖²]/β, v = (x_t − x0)/t."""
    v_pos, v_neg = implicit_predictions(v_theta, v_old, beta)
    target = (x_t - x0) / _expand(t.clamp_min(1e-6), x_t)
    dims = _reduce_dims(v_theta)
    e_pos = (v_pos - target).pow(2).mean(dim=dims)
    e_neg = (v_neg - target).pow(2).mean(dim=dims)
    r = r.to(e_pos.dtype)
    return (r * e_pos + (1.0 - r) * e_neg) / beta


def affine_cotangents_autograd(loss_of_r, v_theta) -> tuple[torch.Tensor, torch.Tensor]:
    """U, W for any loss affine in r, by autograd: U = ∂L(r=0)/∂v, W = ∂L(r=1)/∂v − U.

    ``loss_of_r(v, r)`` must return the scalar loss with per-sample probabilities ``r`` [B].
    Used for the velocity-space loss, whose closed form is not written out.
    """
    v = v_theta.detach().requires_grad_(True)
    zeros = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    (u,) = torch.autograd.grad(loss_of_r(v, zeros), v)
    (u_plus_w,) = torch.autograd.grad(loss_of_r(v, torch.ones_like(zeros)), v)
    return u, u_plus_w - u


# ------------------------------------------------------------ per-reward masks (SPEC §1.4–1.5)
def reward_row_coefficients(judged: torch.Tensor, judged_counts: torch.Tensor,
                            scale: float = 1.0) -> torch.Tensor:
    """coef [K, N] with L_k = Σ_i coef[k, i]·ℓ_k(i) the mean over the rows reward k judges.

    ``judged`` [K, N] bool (m_ki), ``judged_counts`` [K] the number n_k of rows reward k judges
    in the *global* batch. coef = scale·m_ki/n_k, and 0 for every row of a reward with n_k = 0
    (it has no loss this step). ``scale`` is the world size when each rank's share is averaged
    over ranks afterwards (mean over ranks of Σ_local = Σ_global / W).
    """
    counts = judged_counts.to(torch.float64).reshape(-1, 1)
    inverse = torch.where(counts > 0, scale / counts.clamp_min(1.0), torch.zeros_like(counts))
    return judged.to(torch.float64) * inverse


def fused_row_weights(weights: torch.Tensor, coef: torch.Tensor, r: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weight c and probability r_eff of the fused loss (SPEC §1.5):

        Σ_k w_k·L_k = Σ_i c_i·ℓ(i; r_eff(i)),   c_i = Σ_k w_k·coef_ki,
        r_eff(i) = Σ_k w_k·coef_ki·r_k(i) / c_i

    exact because ℓ is affine in r. Rows with c_i = 0 carry no policy term (r_eff = 0.5 there,
    any value would do). Returns (c [N], r_eff [N]) in float64.
    """
    w = weights.to(torch.float64).reshape(-1, 1).to(coef.device)
    weighted = w * coef
    c = weighted.sum(0)
    numerator = (weighted * r.to(torch.float64)).sum(0)
    r_eff = torch.where(c != 0, numerator / torch.where(c != 0, c, torch.ones_like(c)),
                        torch.full_like(c, 0.5))
    return c, r_eff
