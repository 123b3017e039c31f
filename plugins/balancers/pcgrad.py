"""`pcgrad`: PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", Algorithm 1).

For each reward i, its gradient is projected, in a random order of the other rewards j, off
every g_j it conflicts with: g_i ← g_i − min(⟨g_i, g_j⟩, 0)/‖g_j‖²·g_j (using the running,
already projected g_i). The update is the sum of the projected gradients. Every quantity is an
inner product, so the weights follow from the Gram alone: the projected g_i is Σ_l W_il g_l
with ⟨g_j, Σ_l W_il g_l⟩ = (G W_i)_j.

Random order: drawn from numpy's PCG64 seeded with (seed, step), so a run is reproducible,
every process draws the same order, and a resumed run continues exactly (no state to carry).
The paper's method is scale-free in each conflicting direction: a conflicting g_j of any
nonzero norm removes its direction from the others (its weight grows like 1/‖g_j‖ while its
contribution stays ≤ ‖g_i‖), while an exactly zero g_j removes nothing — so, unlike MGDA and
UPGrad here, d jumps when a conflicting gradient reaches exactly 0 (the trainer marks
numerically zero gradients inactive before they get there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from marble_kit.balancing import (
    WeightsBalancer,
    balancer_metrics,
    sanitize_gram,
    state_tensor,
)
from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl

REDUCTIONS = ("sum", "mean")


def pcgrad_weights(gram: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Weights W [n, n] of the projected gradients (row i: g_i^PC = Σ_l W_il g_l) for a finite
    Gram; ``orders[i]`` lists the other rewards in the order g_i is projected off them."""
    n = gram.shape[0]
    projected = np.eye(n)
    for i in range(n):
        row = projected[i]
        for j in orders[i]:
            inner = gram[j] @ row
            if inner < 0.0:  # ⟨g_j, g_i^PC⟩ < 0 implies ‖g_j‖ > 0
                row[j] -= inner / gram[j, j]
    return projected


def random_orders(num_rewards: int, seed: int, step: int) -> list[list[int]]:
    """For each reward i, a random order of the others, from PCG64 seeded with (seed, step)."""
    generator = np.random.default_rng([seed, step])
    return [[j for j in generator.permutation(num_rewards) if j != i] for i in range(num_rewards)]


class PCGrad(WeightsBalancer):
    """PCGrad weights from the Gram over the active rewards: w = Σ_i W_i (reduction="sum",
    the paper's update) or the mean over the n active rewards (reduction="mean": the scale of
    the other built-ins, e.g. uniform weighted-sum or UPGrad, for a like-for-like comparison)."""

    name = "pcgrad"

    def __init__(self, num_rewards: int, seed: int = 0, reduction: str = "sum"):
        super().__init__(num_rewards)
        where = f"balancer {self.name!r}"
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise MarbleError(f"{where}: seed={seed!r} must be an integer ≥ 0 (e.g. --balancer-opt seed=1)")
        if reduction not in REDUCTIONS:
            raise MarbleError(f"{where}: reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
        self.seed, self.reduction = seed, reduction

    def solve(self, gram: np.ndarray, step: int, active: np.ndarray | None = None
              ) -> tuple[np.ndarray, dict[str, float]]:
        clean = sanitize_gram(gram, active, unit=False)
        members = clean.included
        weights = np.zeros(self.num_rewards)
        if members.any():
            sub = gram[np.ix_(members, members)]
            sub = 0.5 * (sub + sub.T)
            n = int(members.sum())
            projected = pcgrad_weights(sub, random_orders(n, self.seed, step))
            weights[members] = projected.sum(axis=0) / (n if self.reduction == "mean" else 1)
        return weights, balancer_metrics(clean.flags, members)

    def solve_step(self, gram: np.ndarray, step: int, active: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return self.solve(gram, step, active)

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), "seed": torch.tensor(self.seed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        where = f"balancer {self.name!r}"
        seed = int(state_tensor(state, "seed", (), where))
        if seed != self.seed:  # the seed is configuration: a different one would change the run
            raise MarbleError(f"{where}: the checkpoint was trained with seed={seed} but this run has "
                              f"seed={self.seed}; pass --balancer-opt seed={seed} to resume")


@hookimpl
def register_balancers(register):
    register("pcgrad", PCGrad,
             description="PCGrad (gradient surgery): project each gradient off the ones it conflicts with, "
                         "random order (seed=0), sum.")
