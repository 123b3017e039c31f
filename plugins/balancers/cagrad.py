"""`cagrad`: CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning").

The update d maximizes the worst reward's rate of improvement min_k ⟨g_k, d⟩ inside the ball
‖d − g0‖ ≤ c·‖g0‖ around the average gradient g0 (c ∈ [0, 1); c = 0 is the plain average).
Its dual: w* = argmin_{w ∈ Δ} ⟨g_w, g0⟩ + c‖g0‖·‖g_w‖ with g_w = Σ w_k g_k, and then
d = g0 + c‖g0‖·g_w/‖g_w‖ — loss weights 1/n + (c‖g0‖/‖g_w‖)·w*, from the Gram alone.

Exact solve: for t > 0 let w(t) = argmin_{w ∈ Δ} ⟨g_w, g0⟩ + (t/2)‖g_w‖², an exact simplex QP
(:func:`marble_kit.balancing.active_set_qp`); its KKT conditions are CAGrad's exactly when
t·‖g_{w(t)}‖ = c‖g0‖, and t·‖g_{w(t)}‖ is the norm of the projection of −g0 onto t·hull(g),
which never decreases in t. So the solve brackets that root, and on the active set found
solves the piece in closed form: with the support's Gram block S, α = 1ᵀS⁻¹1, β = 1ᵀS⁻¹b,
γ = bᵀS⁻¹b (b = G·1/n), t² = β² − α(γ − c²‖g0‖²). It is accepted when the QP at that t has
the same active set (KKT verified); otherwise the bracket shrinks (bisection in log t).

Averages run over the n active rewards. rescale=True divides d by 1 + c², as the official
code does in its experiments (the paper's Algorithm 1 and torchjd do not).
"""

from __future__ import annotations

import numpy as np

from marble_kit.balancing import (
    WeightsBalancer,
    active_set_qp,
    balancer_metrics,
    sanitize_gram,
)
from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl


def _simplex_qp(gram: np.ndarray, b: np.ndarray, t: float, start: np.ndarray | None) -> np.ndarray | None:
    n = len(b)
    return active_set_qp(t * gram, b, np.zeros(n), None, np.ones(n), 1.0, x0=start)


def _closed_form_t(gram: np.ndarray, b: np.ndarray, radius: float, support: np.ndarray) -> float | None:
    """The t of the CAGrad solution if its support is ``support`` (None: no such piece)."""
    block = gram[np.ix_(support, support)]
    try:
        inverse_ones, inverse_b = np.linalg.solve(block, np.stack([np.ones(support.sum()), b[support]], axis=1)).T
    except np.linalg.LinAlgError:
        return None
    alpha, beta, gamma = inverse_ones.sum(), inverse_ones @ b[support], b[support] @ inverse_b
    squared = beta * beta - alpha * (gamma - radius * radius)
    return float(np.sqrt(squared)) if np.isfinite(squared) and squared > 0 else None


def cagrad_weights(gram: np.ndarray, c: float, max_rounds: int = 200) -> tuple[np.ndarray, int]:
    """CAGrad loss weights (1/n + t·w*) for a finite PSD Gram of n ≥ 1 rewards → (weights, rounds)."""
    n = gram.shape[0]
    mean = np.full(n, 1.0 / n)
    top = float(np.diag(gram).max())
    if not top > 0 or c == 0.0:
        return mean, 0
    gram = gram / top  # scale-free: w* and t do not change
    b = gram @ mean
    g0_squared = float(mean @ b)
    if not g0_squared > 0:
        return mean, 0  # g0 = 0: the ball is the point d = 0
    radius = c * np.sqrt(g0_squared)

    def h(w: np.ndarray, t: float) -> float:
        return t * np.sqrt(max(float(w @ gram @ w), 0.0))

    low, high = 0.0, np.inf
    t, w, rounds = 1.0, None, 0
    best = None
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (the count is returned)
        w = _simplex_qp(gram, b, t, w)
        if w is None:
            break
        value = h(w, t)
        best = (t, w)
        if abs(value - radius) <= 1e-15 * radius:
            break
        if value < radius:
            low = t
        else:
            high = t
        support = w > 0
        guess = _closed_form_t(gram, b, radius, support)
        if guess is not None and low < guess < high:
            candidate = _simplex_qp(gram, b, guess, w)
            if candidate is not None and np.array_equal(candidate > 0, support):
                best = (guess, candidate)  # same active set: CAGrad's KKT conditions hold
                break
        if high == np.inf:
            t = 4.0 * t
            if t > 1e15:  # h stays below the radius: g0 is on the Pareto set's boundary; t → ∞ is the limit
                break
        else:
            t = np.sqrt(low * high) if low > 0 else high / 4.0
        if high < np.inf and high - low <= 1e-15 * high:
            break
    if best is None:
        return mean, rounds
    t, w = best
    return mean + t * w, rounds


class CAGrad(WeightsBalancer):
    """CAGrad weights from the Gram over the active rewards (c = 0.4 by default, in [0, 1))."""

    name = "cagrad"

    def __init__(self, num_rewards: int, c: float = 0.4, rescale: bool = False):
        super().__init__(num_rewards)
        where = f"balancer {self.name!r}"
        if not 0.0 <= float(c) < 1.0:
            raise MarbleError(f"{where}: c={c} must be in [0, 1) (the radius of the ball around the mean "
                              "gradient, in units of its norm; e.g. --balancer-opt c=0.4)")
        if not isinstance(rescale, bool):
            raise MarbleError(f"{where}: rescale={rescale!r} must be true or false")
        self.c, self.rescale = float(c), rescale

    def solve(self, gram: np.ndarray, active: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
        clean = sanitize_gram(gram, active, unit=False)
        members = clean.included
        weights = np.zeros(self.num_rewards)
        rounds = 0
        if members.any():
            sub = gram[np.ix_(members, members)]
            sub = 0.5 * (sub + sub.T)
            values, vectors = np.linalg.eigh(sub)  # round-off may leave it slightly indefinite
            sub = (vectors * np.maximum(values, 0.0)) @ vectors.T
            member_weights, rounds = cagrad_weights(sub, self.c)
            weights[members] = member_weights / (1.0 + self.c ** 2 if self.rescale else 1.0)
        metrics = balancer_metrics(clean.flags, members)
        metrics["balancer/qp_rounds"] = float(rounds)
        return weights, metrics

@hookimpl
def register_balancers(register):
    register("cagrad", CAGrad,
             description="CAGrad: best worst-reward improvement within c·‖g0‖ of the mean gradient (c=0.4), exact.")
