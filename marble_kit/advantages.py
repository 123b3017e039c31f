"""NaN-aware per-reward group advantages and reward probabilities (SPEC §1.3).

For each reward k and each prompt group g (the G images of one prompt):

    A_k(i) = (R_k(i) − mean_{j∈g(i)} R_k(j)) / (std(R_k) + eps),   clipped to ±A_max
    r_k(i) = clip(0.5 + A_k(i) / (2·A_max), 0, 1)

``std`` is taken over the whole (gathered) batch by default — DiffusionNFT's choice — or per
group. NaN marks "this reward does not judge this sample": NaNs are left out of every statistic
and give A = 0, i.e. r = 0.5; the trainer leaves such rows out of the reward's loss altogether
(L_k is the mean over the rows reward k judges, SPEC §1.4). A group whose judged scores are all
equal has advantages exactly 0: it prefers none of its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_SCOPES = ("global", "group")


@dataclass
class Advantages:
    advantages: torch.Tensor       # [K, B], 0 where the reward is NaN
    probabilities: torch.Tensor    # [K, B], r_k in [0, 1], 0.5 where the reward is NaN
    valid: torch.Tensor            # [K, B] bool, False where the reward is NaN/inf

    def judged(self) -> torch.Tensor:
        """[K] number of samples each reward judges."""
        return self.valid.sum(dim=1)

    def expresses_preference(self) -> torch.Tensor:
        """[K] bool: the reward judges at least one sample with a nonzero advantage, i.e. its
        loss prefers some images of a group over others (else its gradient is only the r = 0.5
        pull towards the old policy)."""
        return (self.valid & (self.advantages != 0)).any(dim=1)


def _nan_group_mean(values: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                    num_groups: int) -> torch.Tensor:
    """Per-sample mean of its group's valid values ([K, B] → [K, B])."""
    filled = torch.where(valid, values, torch.zeros_like(values))
    sums = torch.zeros(values.shape[0], num_groups, dtype=values.dtype).index_add_(1, group_ids, filled)
    counts = torch.zeros_like(sums).index_add_(1, group_ids, valid.to(values.dtype))
    return (sums / counts.clamp_min(1))[:, group_ids]


def _group_is_constant(values: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                       num_groups: int) -> torch.Tensor:
    """[K, B] bool: the sample's group has no two different valid values."""
    big = torch.finfo(values.dtype).max
    shape = (values.shape[0], num_groups)
    high = torch.full(shape, -big, dtype=values.dtype).scatter_reduce(
        1, group_ids.expand_as(values), torch.where(valid, values, torch.full_like(values, -big)), "amax")
    low = torch.full(shape, big, dtype=values.dtype).scatter_reduce(
        1, group_ids.expand_as(values), torch.where(valid, values, torch.full_like(values, big)), "amin")
    return (high <= low)[:, group_ids]


def _nan_std(values: torch.Tensor, valid: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Population std over valid entries along ``dim`` (0 when fewer than two)."""
    count = valid.sum(dim, keepdim=True).clamp_min(1).to(values.dtype)
    filled = torch.where(valid, values, torch.zeros_like(values))
    mean = filled.sum(dim, keepdim=True) / count
    var = (torch.where(valid, values - mean, torch.zeros_like(values)) ** 2).sum(dim, keepdim=True) / count
    return var.sqrt()


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, std_scope: str = "global",
                     eps: float = 1e-4, clip: float = 5.0) -> Advantages:
    """Advantages and reward probabilities for rewards ``[K, B]`` and prompt groups ``[B]``."""
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    if rewards.ndim == 1:
        rewards = rewards.unsqueeze(0)
    values = rewards.to(torch.float64)
    valid = torch.isfinite(values)
    group_ids = torch.as_tensor(group_ids, dtype=torch.long)
    _, group_ids = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0

    centered = values - _nan_group_mean(values, valid, group_ids, num_groups)
    # A group whose valid scores are all equal carries no preference: its advantages are exactly
    # 0 (its mean may differ from the common value by round-off, which std + eps would amplify).
    centered = torch.where(_group_is_constant(values, valid, group_ids, num_groups),
                           torch.zeros_like(centered), centered)
    if std_scope == "global":
        std = _nan_std(values, valid)                                      # [K, 1]
    else:
        group_mean_sq = _nan_group_mean(centered.nan_to_num(0.0) ** 2, valid, group_ids, num_groups)
        std = group_mean_sq.sqrt()                                          # [K, B]
    advantages = torch.where(valid, centered / (std + eps), torch.zeros_like(values))
    advantages = advantages.clamp(-clip, clip)
    probabilities = (0.5 + advantages / (2.0 * clip)).clamp(0.0, 1.0)
    return Advantages(advantages.float(), probabilities.float(), valid)


def summed_rewards(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k R_k per sample, NaN-aware (a NaN reward contributes nothing; all-NaN stays NaN)."""
    weights = weights.to(rewards.dtype).reshape(-1, 1)
    valid = torch.isfinite(rewards)
    total = (torch.where(valid, rewards, torch.zeros_like(rewards)) * weights).sum(0, keepdim=True)
    return torch.where(valid.any(0, keepdim=True), total, torch.full_like(total, float("nan")))


def reward_statistics(rewards: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Per-reward NaN-aware mean/std and the fraction of samples it judged."""
    stats: dict[str, float] = {}
    valid = torch.isfinite(rewards)
    for k, name in enumerate(names):
        values = rewards[k][valid[k]].double()
        stats[f"reward/{name}"] = float(values.mean()) if values.numel() else float("nan")
        stats[f"reward_std/{name}"] = float(values.std(unbiased=False)) if values.numel() else float("nan")
        stats[f"reward_coverage/{name}"] = float(valid[k].double().mean()) if rewards.shape[1] else 0.0
    return stats
