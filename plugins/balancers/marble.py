"""`marble`: MARBLE — MGDA min-norm weights smoothed by an EMA on λ (SPEC §2)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from marble_kit.balancing import ema_update, loss_weights, state_tensor, to_tensor
from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_plugins.balancers.mgda import MgdaQP


class MarbleEMA(MgdaQP):
    """λ_t = ρ·λ_{t−1} + (1−ρ)·λ*_t with λ* the min-norm solution (optionally λ*_k ≥ λ_min).

    The EMA runs on λ (the simplex weights of the normalized problem when normalize="unit");
    the loss weights are then formed with this step's gradient norms, so solve and reuse
    steps stay consistent. ρ = 0.7 as in the paper. The EMA state is checkpointed.

    An inactive reward has λ*_k = 0 in this solve and the EMA is updated with it (as the
    official release does); the λ used this step is the EMA restricted to the active rewards
    and renormalized (this solve's λ* if the EMA has no weight on them). With no active reward
    the weights are all zero and the EMA is left as it was. The EMA moves λ off the min-norm
    point, so metric="adam-momentum" (whose guarantee needs the exact λ*) takes only rho=0
    (and raw gradients: normalize defaults to "none" with it).

    Otherwise normalize="unit" by default, as in the paper's recipe (the release balances unit-norm
    gradients): raw min-norm λ give nearly all the weight to the reward with the smallest
    gradient (docs/world.md); `mgda-qp` keeps the textbook raw problem.
    """

    name = "marble"

    def __init__(self, num_rewards: int, rho: float = 0.7, min_weight: float = 0.0,
                 normalize: str | None = None, metric: str = "euclidean"):
        if normalize is None:  # unit-norm gradients, except for the metric that needs raw ones
            normalize = "none" if metric == "adam-momentum" else "unit"
        super().__init__(num_rewards, normalize=normalize, metric=metric, min_weight=min_weight)
        if not 0.0 <= float(rho) < 1.0:
            raise MarbleError(f"balancer 'marble': rho={rho} must be in [0, 1) (the paper uses 0.7)")
        if self.gram_metric == "adam-momentum" and float(rho) > 0:
            raise MarbleError(f"balancer 'marble': metric=\"adam-momentum\" guarantees the step only for "
                              f"the fresh min-norm λ; the EMA (rho={rho}) moves λ off it (use rho=0 or mgda-qp)")
        self.rho = float(rho)
        self.ema: np.ndarray | None = None

    def weights(self, gram: Tensor | None, step: int, active: Tensor | None = None) -> Tensor:
        result = self.solve(gram, active)
        if not result.active.any():  # nothing to balance this step: state untouched
            self.lam, self.last_weights = to_tensor(result.lam), to_tensor(result.weights)
            self.metrics["balancer/ema_lag_l1"] = 0.0
            return self.last_weights.clone()
        self.ema = ema_update(self.ema, result.lam, self.rho)
        lam = np.where(result.active, self.ema, 0.0)
        lam = lam / lam.sum() if lam.sum() > 0 else result.lam
        self.lam = to_tensor(lam)
        self.last_weights = to_tensor(loss_weights(lam, result.norms, self.normalize))
        # How stale the smoothed λ is against this minibatch's optimum (notes: EMA lag).
        self.metrics["balancer/ema_lag_l1"] = float(np.abs(lam - result.lam).sum())
        return self.last_weights.clone()

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        initialized = self.ema is not None
        state["ema"] = to_tensor(self.ema) if initialized else torch.zeros(self.num_rewards, dtype=torch.float64)
        state["ema_initialized"] = torch.tensor(float(initialized))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        ema = state_tensor(state, "ema", (self.num_rewards,), "balancer 'marble'")
        initialized = bool(state_tensor(state, "ema_initialized", (), "balancer 'marble'"))
        self.ema = ema.numpy().copy() if initialized else None


@hookimpl
def register_balancers(register):
    register("marble", MarbleEMA,
             description="MARBLE: MGDA min-norm weights of unit-norm gradients with an EMA on λ (rho=0.7), "
             "optional min_weight floor.")
