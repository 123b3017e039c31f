"""`upgrad`: UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization").

Each active reward gradient g_i is projected onto the dual cone {d : ⟨g_k, d⟩ ≥ 0 ∀k} of the
active reward gradients, and the projections are averaged over the n active rewards (as the
paper and torchjd do over their m rows; an inactive reward is not one of the rows). In weight
space the projection of g_i/n is Σ_l v_l g_l with v = argmin_{v ≥ e_i/n} vᵀGv (its KKT
conditions give Gv ≥ 0), so the aggregation needs only the Gram — the same contract as MGDA.
Unlike MGDA the weights do not sum to one: UPGrad keeps the size of the average gradient when
the rewards agree, and shrinks only the conflicting parts.

Bounded weights: each projection's weights are capped, v ≤ max_weight/n, so every loss weight
is at most ``max_weight`` (default 1000). Without the cap, protecting a reward whose gradient
is a fraction r of the others takes a weight ∝ 1/r (4.6e4 at r = 1e-6, 4e10 at r = 1e-12):
it multiplies that gradient's float32 round-off into the update, and the trainer's single
fused backward (Σw)·L(r_eff) loses the other rewards in r_eff. The cap binds only for such
tiny gradients (measured: never for norm ratios ≥ 1e-3 on random conflicting gradients); where
it binds, that reward's ⟨g_k, d⟩ ≥ 0 is no longer enforced (``balancer/capped`` counts it),
and every other reward keeps it. The cap also makes d continuous: as a gradient's norm goes to
0 its contribution (≤ max_weight·‖g_k‖) vanishes, and an exactly zero gradient is the limit —
the zero vector, counted among the n rewards, its own projection 0.

Exact: the K projections share one Hessian and are solved together by block principal
pivoting (:func:`marble_kit.balancing.box_qp_batch`) to round-off, from the lower bounds —
no warm start, so the answer is a function of the Gram alone (a resumed run cannot differ).
"""

from __future__ import annotations

import numpy as np

from marble_kit.balancing import (
    WeightsBalancer,
    balancer_metrics,
    box_qp_batch,
    check_max_weight,
    check_normalize,
    sanitize_gram,
)
from marble_kit.hookspecs import hookimpl


def upgrad_projections(unit: np.ndarray, scale: np.ndarray, count: int, max_weight: float
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """The projections of the rows of the unit-diagonal Gram H in scaled weights μ = v·scale.

    Row i: argmin μᵀHμ s.t. scale_i/count·e_i ≤ μ ≤ scale·max_weight/count (scale_k =
    ‖g_k‖/max‖g‖, or 1 for unit-norm gradients). Returns (M [n, n] with row i the projection
    of g_i, capped mask [n, n], iterations).
    """
    n = unit.shape[0]
    lower = np.diag(scale) / count
    upper = np.broadcast_to(scale * (max_weight / count), (n, n)).copy()
    mu, iterations, _ = box_qp_batch(unit, lower, upper)
    capped = np.isfinite(upper) & (mu >= upper * (1 - 1e-12)) & (upper > lower)
    return mu, capped, iterations


class UPGrad(WeightsBalancer):
    """UPGrad weights w = Σ_i v_i over the n active rewards, v_i = argmin_{e_i/n ≤ v ≤ max_weight/n}
    vᵀGv; ⟨g_k, Σ_l w_l g_l⟩ ≥ 0 for every active reward whose weights are below the cap."""

    name = "upgrad"

    def __init__(self, num_rewards: int, normalize: str = "none", max_weight: float = 1000.0):
        super().__init__(num_rewards)
        where = f"balancer {self.name!r}"
        self.normalize = check_normalize(normalize, where)
        self.max_weight = check_max_weight(max_weight, where)

    def solve(self, gram: np.ndarray, active: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """(K,) loss weights and this solve's metrics for a float64 Gram."""
        clean = sanitize_gram(gram, active)
        nonzero = clean.nonzero
        # normalize="unit": a zero gradient has no direction and is left out.
        members = nonzero if self.normalize == "unit" else clean.included
        weights = np.zeros(self.num_rewards)
        capped_rewards = iterations = 0
        if members.any():
            count = int(members.sum())
            weights[members & ~nonzero] = 1.0 / count  # a zero gradient's own share; it adds nothing to d
            if nonzero.any():
                norms = clean.norms[nonzero]
                scale = norms / norms.max() if self.normalize == "none" else np.ones_like(norms)
                mu, capped, iterations = upgrad_projections(clean.unit, scale, count, self.max_weight)
                capped_rewards = int(capped.any(axis=0).sum())
                if self.normalize == "none":
                    weights[nonzero] = mu.sum(axis=0) / scale
                else:  # unit-norm gradients, rescaled to the mean norm (SPEC §1.7)
                    weights[nonzero] = norms.mean() * mu.sum(axis=0) / norms
        metrics = balancer_metrics(clean.flags, clean.included)
        metrics["balancer/capped"] = float(capped_rewards)
        metrics["balancer/qp_iterations"] = float(iterations)
        return weights, metrics

@hookimpl
def register_balancers(register):
    register("upgrad", UPGrad,
             description="UPGrad (Jacobian descent): average of the gradients projected onto the dual cone "
                         "(exact; weights ≤ max_weight=1000).")
