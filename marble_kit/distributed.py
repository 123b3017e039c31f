"""Rank helpers and the reductions the training step needs (torch.distributed underneath).

Single-process runs use the same code: every reduction is the identity when the world size is 1.
Data-parallel semantics (SPEC §1.6): each rank holds P/W prompt groups whole; the advantage
statistics see the gathered rewards of all ranks; the K per-reward gradient vectors are
averaged across ranks *before* the Gram is formed (summing per-rank Grams would drop the
cross-rank terms), so every rank solves the same QP and takes the same step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Distributed:
    """This process's place in the job; world_size 1 when torch.distributed is not initialized."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls, backend: str | None = None, timeout_s: float = 300.0) -> "Distributed":
        """Join the process group that torchrun / accelerate describe in the environment."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not torch_dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            torch_dist.init_process_group(backend=backend,
                                          timeout=datetime.timedelta(seconds=timeout_s))
        return cls(torch_dist.get_rank(), torch_dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def gather_rewards(self, rewards: torch.Tensor, group_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' rewards [K, W·B] (rank-major) and globally unique group ids."""
        if not self.active:
            return rewards, group_ids
        pieces = [torch.empty_like(rewards) for _ in range(self.world_size)]
        torch_dist.all_gather(pieces, rewards.contiguous())
        groups_per_rank = int(group_ids.max()) + 1
        ids = torch.cat([group_ids + rank * groups_per_rank for rank in range(self.world_size)])
        return torch.cat(pieces, dim=1), ids

    def local_rows(self, gathered: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a gathered [K, W·B] tensor."""
        if not self.active:
            return gathered
        per_rank = gathered.shape[1] // self.world_size
        return gathered[:, self.rank * per_rank:(self.rank + 1) * per_rank]

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return tensor
        tensor = tensor.contiguous()
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor / self.world_size

    def all_reduce_mean_grads(self, params) -> None:
        """Average ``.grad`` over ranks (one flat all-reduce)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = self.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()
