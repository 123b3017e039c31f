"""`mgda-qp`: MGDA's min-norm weights, min λᵀGλ on the simplex, solved with OSQP (SPEC §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from marble_kit.balancing import (
    MinNormQP,
    MinNormResult,
    as_active_mask,
    as_gram_array,
    check_gram_metric,
    check_min_weight,
    check_normalize,
    check_num_rewards,
    state_tensor,
    to_tensor,
    uniform,
    warn_degenerate,
)
from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl


class MgdaQP:
    """λ* = argmin_{λ ∈ Δ} λᵀGλ over the active rewards every solve; loss weights w = λ* (or
    s·λ*_k/‖g_k‖ with normalize="unit"). Exact: OSQP's answer is refined by an active-set
    solve to round-off (:class:`marble_kit.balancing.MinNormQP`).

    A vanishing gradient is a real reward: as its norm goes to 0 the hull's min-norm point d
    goes to 0 continuously, and an exactly zero gradient gives d = 0 (λ on the zero gradients).
    ``metric`` picks the Gram the trainer passes (euclidean, Adam's preconditioner, or the
    momentum-aware one of :func:`marble_kit.gram.metric_gram`); "adam-momentum" needs the plain
    min-norm λ (normalize="none", min_weight=0), the conditions its guarantee is proved under.
    """

    needs_gram = True
    summed_reward_weights = None
    name = "mgda-qp"

    def __init__(self, num_rewards: int, normalize: str = "none", metric: str = "euclidean",
                 min_weight: float = 0.0):
        where = f"balancer {self.name!r}"
        self.num_rewards = check_num_rewards(num_rewards, where)
        self.normalize = check_normalize(normalize, where)
        self.gram_metric = check_gram_metric(metric, where)
        self.min_weight = check_min_weight(min_weight, num_rewards, where)
        if self.gram_metric == "adam-momentum" and self.normalize != "none":
            # The momentum-shifted hull needs weights summing to 1 on the raw gradients.
            raise MarbleError(f"{where}: metric=\"adam-momentum\" works on raw gradients; "
                              "use normalize=\"none\" with it")
        if self.gram_metric == "adam-momentum" and self.min_weight > 0:
            raise MarbleError(f"{where}: metric=\"adam-momentum\" guarantees the step only for the exact "
                              f"min-norm λ; min_weight={self.min_weight} moves λ off it (use min_weight=0)")
        self.solver = MinNormQP()
        self.lam = uniform(num_rewards)
        self.last_weights = uniform(num_rewards)
        self.degenerate_steps = 0
        self.metrics: dict[str, float] = {}

    def solve(self, gram: Tensor | None, active: Tensor | None = None) -> MinNormResult:
        """The min-norm solution for this Gram; records metrics and warns on degenerate input."""
        where = f"balancer {self.name!r}"
        array = as_gram_array(gram, self.num_rewards, where)
        mask = as_active_mask(active, self.num_rewards, where)
        result = self.solver.solve(array, self.normalize, self.min_weight, mask)
        self.degenerate_steps += int(result.metrics["balancer/degenerate"])
        self.metrics = dict(result.metrics, **{"balancer/degenerate_steps": float(self.degenerate_steps)})
        warn_degenerate(self.name, result.metrics, stacklevel=4)  # weights → solve → here
        return result

    def weights(self, gram: Tensor | None, step: int, active: Tensor | None = None) -> Tensor:
        result = self.solve(gram, active)
        self.lam, self.last_weights = to_tensor(result.lam), to_tensor(result.weights)
        return self.last_weights.clone()

    def state_dict(self) -> dict[str, Tensor]:
        return {"lam": self.lam.clone(), "degenerate_steps": torch.tensor(float(self.degenerate_steps)),
                **self.solver.state_dict()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        where = f"balancer {self.name!r}"
        self.lam = state_tensor(state, "lam", (self.num_rewards,), where)
        self.degenerate_steps = int(state_tensor(state, "degenerate_steps", (), where))
        self.solver.load_state_dict(state)


@hookimpl
def register_balancers(register):
    register("mgda-qp", MgdaQP,
             description="MGDA min-norm weights (OSQP, refined exactly); normalize=\"unit\", "
                         "metric=\"adam\"|\"adam-momentum\".")
