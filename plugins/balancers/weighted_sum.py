"""`weighted-sum`: fixed user weights (SPEC §2), including DiffusionNFT's summed-reward baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from marble_kit.balancing import check_num_rewards, state_tensor
from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl

MODES = ("per-reward", "summed-reward")


def normalized_user_weights(weights: Sequence[float] | None, num_rewards: int, where: str) -> Tensor:
    """User weights → a float64 tensor summing to 1 (default: uniform)."""
    if weights is None:
        return torch.full((num_rewards,), 1.0 / num_rewards, dtype=torch.float64)
    if isinstance(weights, (int, float)) or len(weights) != num_rewards:
        raise MarbleError(f"{where}: weights={weights!r} needs one number per reward ({num_rewards}), "
                          "e.g. --balancer-opt weights=[1,2,1]")
    values = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise MarbleError(f"{where}: weights={list(weights)} must be finite, ≥ 0 and not all 0")
    return values / values.sum()


class WeightedSum:
    """Fixed weights.

    mode="per-reward": loss weights w over the per-reward probabilities r_k (one backward on
    L(Σ w_k r_k)). mode="summed-reward": DiffusionNFT's baseline — the trainer sums the raw
    rewards Σ w_k R_k and computes one advantage of the sum (``summed_reward_weights``).
    """

    needs_gram = False
    gram_metric = "euclidean"

    def __init__(self, num_rewards: int, weights: Sequence[float] | None = None,
                 mode: str = "per-reward"):
        where = "balancer 'weighted-sum'"
        self.num_rewards = check_num_rewards(num_rewards, where)
        if mode not in MODES:
            raise MarbleError(f"{where}: mode={mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.lam = normalized_user_weights(weights, num_rewards, where)
        self.summed_reward_weights: Tensor | None = self.lam.clone() if mode == "summed-reward" else None
        self.metrics: dict[str, float] = {}

    def weights(self, gram: Tensor | None, step: int, active: Tensor | None = None) -> Tensor:
        """The fixed weights; ``active`` is ignored (the objective is fixed; an inactive reward's
        gradient is zero or left out by the trainer)."""
        return self.lam.clone()

    def state_dict(self) -> dict[str, Tensor]:
        return {"lam": self.lam.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        # The weights are configuration: check that the checkpoint agrees instead of overriding.
        saved = state_tensor(state, "lam", (self.num_rewards,), "balancer 'weighted-sum'")
        if not torch.allclose(saved, self.lam):
            raise MarbleError(f"balancer 'weighted-sum': checkpoint weights {saved.tolist()} differ "
                              f"from the configured {self.lam.tolist()}; pass the same weights to resume")


@hookimpl
def register_balancers(register):
    register("weighted-sum", WeightedSum,
             description="Fixed weights (default uniform); mode=\"summed-reward\" is the DiffusionNFT "
                         "baseline (advantage of Σ w_k R_k).")
