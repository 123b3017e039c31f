"""`upgrad`: UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization").

Each reward gradient g_i is projected onto the dual cone {d : ⟨g_k, d⟩ ≥ 0 ∀k} of all
reward gradients, and the projections are averaged. In weight space the projection of g_i is
Σ_l v_l g_l with v = argmin_{v ≥ e_i} vᵀGv (its KKT conditions give Gv ≥ 0), so the whole
aggregation only needs the Gram — the same contract as MGDA, solved with the same OSQP QP.
Unlike MGDA the weights do not sum to one: UPGrad keeps the size of the average gradient
when the rewards agree, and shrinks only the conflicting parts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from marble_kit.balancing import (
    DenseQP,
    as_gram_array,
    check_normalize,
    check_num_rewards,
    finite_or_uniform,
    refine_active_set,
    sanitize_gram,
    state_tensor,
    to_tensor,
    uniform,
    warn_degenerate,
)
from marble_kit.hookspecs import hookimpl


def upgrad_weights_unit(unit: np.ndarray, lower_scale: np.ndarray, qp: DenseQP) -> tuple[np.ndarray, bool]:
    """Weights μ on unit-diagonal H: mean_i argmin_{μ ≥ lower_scale_i·e_i/n} μᵀHμ."""
    n = unit.shape[0]
    total = np.zeros(n)
    failed = False
    P = 2.0 * unit
    for i in range(n):
        lower = np.zeros(n)
        lower[i] = lower_scale[i] / n
        result = qp.solve(P, np.eye(n), lower, np.full(n, np.inf))
        candidate = np.maximum(result.x, lower) if result.solved else lower.copy()
        failed |= not result.solved
        refined = refine_active_set(P, None, 0.0, lower, candidate)
        if refined is not None and refined @ unit @ refined <= candidate @ unit @ candidate * (1 + 1e-9) + 1e-15:
            candidate = refined
        total += candidate
    return total, failed


class UPGrad:
    """UPGrad weights w = (1/K)·Σ_i v_i, v_i = argmin_{v ≥ e_i} vᵀGv; ⟨g_k, Σ w_l g_l⟩ ≥ 0 ∀k."""

    needs_gram = True
    summed_reward_weights = None
    gram_metric = "euclidean"
    name = "upgrad"

    def __init__(self, num_rewards: int, normalize: str = "none"):
        where = f"balancer {self.name!r}"
        self.num_rewards = check_num_rewards(num_rewards, where)
        self.normalize = check_normalize(normalize, where)
        self.qp = DenseQP(polish=False)  # bound-only QPs: see DenseQP
        self.lam = uniform(num_rewards)
        self.degenerate_steps = 0
        self.metrics: dict[str, float] = {}

    def weights(self, gram: Tensor | None, step: int) -> Tensor:
        array = as_gram_array(gram, self.num_rewards, f"balancer {self.name!r}")
        clean = sanitize_gram(array)
        weights = np.zeros(self.num_rewards)
        if clean.active.any():
            norms = clean.norms[clean.active]
            # Scaled variables μ = v·‖g‖ (unit-diagonal Hessian); the bound v_i ≥ 1/K becomes μ_i ≥ ‖g_i‖/K.
            scale = norms / norms.max() if self.normalize == "none" else np.ones_like(norms)
            mu, clean.flags["solver_fallback"] = upgrad_weights_unit(clean.unit, scale, self.qp)
            if self.normalize == "none":
                weights[clean.active] = mu / scale
            else:  # unit-norm gradients, rescaled to the mean norm (SPEC §1.7)
                weights[clean.active] = norms.mean() * mu / norms
        else:
            clean.flags["all_zero"] = True
        weights = finite_or_uniform(weights)
        metrics = {f"balancer/{k}": float(v) for k, v in clean.flags.items()}
        metrics["balancer/degenerate"] = float(any(clean.flags.values()))
        self.degenerate_steps += int(metrics["balancer/degenerate"])
        metrics["balancer/degenerate_steps"] = float(self.degenerate_steps)
        metrics["balancer/weight_sum"] = float(weights.sum())
        self.metrics = metrics
        warn_degenerate(self.name, metrics)
        self.lam = to_tensor(weights / weights.sum())
        return to_tensor(weights)

    def state_dict(self) -> dict[str, Tensor]:
        return {"lam": self.lam.clone(), "degenerate_steps": torch.tensor(float(self.degenerate_steps)),
                **self.qp.state_dict()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.lam = state_tensor(state, "lam", (self.num_rewards,), f"balancer {self.name!r}")
        self.degenerate_steps = int(state_tensor(state, "degenerate_steps", (), f"balancer {self.name!r}"))
        self.qp.load_state_dict(state)


@hookimpl
def register_balancers(register):
    register("upgrad", UPGrad,
             description="UPGrad (Jacobian descent): average of the gradients projected onto the dual cone.")
