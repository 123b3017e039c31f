"""Rank helpers and the reductions the training step needs (torch.distributed underneath).

Single-process runs use the same code: every reduction is the identity when the world size is 1.
Data-parallel semantics (SPEC §1.6): each rank holds P/W prompt groups whole; the advantage
statistics see the gathered rewards of all ranks; the K per-reward gradient vectors are
averaged across ranks *before* the Gram is formed (summing per-rank Grams would drop the
cross-rank terms), so every rank solves the same QP and takes the same step.

Launchers: ``torchrun`` and ``accelerate launch`` both describe the job in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:meth:`Distributed.from_environment` joins that process group. Failure handling: a rank that
exits non-zero makes torchrun's agent stop the others; without an agent, gloo peers see the
closed connection and every collective times out after ``MARBLE_DIST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as torch_dist

from marble_kit.errors import MarbleError

TIMEOUT_ENV = "MARBLE_DIST_TIMEOUT"
# torch's own default. Rank 0 alone writes checkpoints and sample grids while the others wait
# in the next collective, so the timeout must exceed the slowest of those writes.
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died, stopped responding past the timeout, or the
    connection broke. ``marble train`` reports it in one line and exits without teardown."""


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message (backend errors carry long C++ traces), capped."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _collective(name: str):
    """Re-raise the backend's error (gloo raises a bare RuntimeError on a timeout) as a
    :class:`CollectiveError` naming the collective."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:
        raise CollectiveError(f"{name} failed: {_first_line(exc)}") from exc


def timeout_from_environment(default: float = DEFAULT_TIMEOUT_S) -> float:
    """Seconds a collective may wait: ``$MARBLE_DIST_TIMEOUT`` or ``default``."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise MarbleError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds; "
                          f"set e.g. {TIMEOUT_ENV}=600 or unset it")
    return seconds


@dataclass
class Distributed:
    """This process's place in the job; world_size 1 when torch.distributed is not initialized.

    ``device`` is where collectives run: the rank's GPU under NCCL (which cannot reduce CPU
    tensors), the CPU under gloo. The reductions move tensors there and back.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_environment(cls, backend: str | None = None, timeout_s: float | None = None) -> Distributed:
        """Join the process group that torchrun / accelerate describe in the environment.

        One GPU per rank: ``LOCAL_RANK`` becomes the current CUDA device *before* the policy
        loads, so ``"cuda"`` means this rank's GPU everywhere. ``timeout_s`` (default
        ``$MARBLE_DIST_TIMEOUT`` or 600 s) bounds every collective: a rank that never arrives
        ends the job with an error instead of a hang.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cpu")
        if backend == "nccl":
            if local_rank >= torch.cuda.device_count():
                raise MarbleError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs "
                                  "are visible; start at most one process per GPU (--nproc-per-node)")
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not torch_dist.is_initialized():
            seconds = timeout_s if timeout_s is not None else timeout_from_environment()
            torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ tensor reductions
    def gather_rewards(self, rewards: torch.Tensor, group_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' rewards [K, W·B] (rank-major) and globally unique group ids."""
        if not self.active:
            return rewards, group_ids
        local = rewards.contiguous().to(self.device)
        pieces = [torch.empty_like(local) for _ in range(self.world_size)]
        with _collective("all_gather"):
            torch_dist.all_gather(pieces, local)
        groups_per_rank = int(group_ids.max()) + 1  # the same on every rank: P/W groups each
        ids = torch.cat([group_ids + rank * groups_per_rank for rank in range(self.world_size)])
        return torch.cat(pieces, dim=1).to(rewards.device), ids

    def local_rows(self, gathered: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a gathered [K, W·B] tensor."""
        if not self.active:
            return gathered
        per_rank = gathered.shape[1] // self.world_size
        return gathered[:, self.rank * per_rank:(self.rank + 1) * per_rank]

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
        if not self.active:
            return tensor
        buffer = tensor.detach().to(self.device, copy=True).contiguous()
        with _collective("all_reduce"):
            torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
        return (buffer / self.world_size).to(tensor.device)

    def all_reduce_mean_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over ranks (one flat all-reduce; a missing grad counts as zero,
        so every rank reduces a vector of the same length)."""
        if not self.active:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.all_reduce_mean(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (a new tensor on ``tensor``'s device)."""
        if not self.active:
            return tensor
        buffer = tensor.detach().to(self.device, copy=True).contiguous()
        with _collective("broadcast"):
            torch_dist.broadcast(buffer, src=0)
        return buffer.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a Ctrl-C seen by one)."""
        if not self.active:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with _collective("all_reduce"):
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.active:
            with _collective("barrier"):
                torch_dist.barrier()

    # ------------------------------------------------------------------ agreement checks
    def check_device(self, device: torch.device) -> None:
        """Under NCCL every rank trains on its own GPU (``LOCAL_RANK``), never a shared one."""
        device = torch.device(device)
        if self.device.type == "cuda" and device.type == "cuda" and device.index not in (None, self.local_rank):
            raise MarbleError(f"rank {self.rank} (LOCAL_RANK {self.local_rank}) was told to train on {device}; "
                              "leave the policy option `device` unset (or 'cuda') under torchrun/accelerate "
                              "so that each rank uses its own GPU")

    def gather_objects(self, value: Any) -> list[Any]:
        """``value`` of every rank, rank-ordered (picklable objects)."""
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        with _collective("all_gather_object"):
            torch_dist.all_gather_object(gathered, value)
        return gathered

    def check_same(self, value: Any, what: str, fix: str) -> None:
        """Raise the same MarbleError on every rank when ranks disagree about ``value``."""
        values = self.gather_objects(value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise MarbleError(f"{what} differs between rank 0 ({values[0]}) and rank {differing[0]} "
                              f"({values[differing[0]]}); {fix}")

    def run_on_main(self, action: Callable[[], T]) -> T | None:
        """Run ``action`` on rank 0 only; a MarbleError it raises is raised on every rank.

        For rank-0-only work that can fail on user input (e.g. preparing the run directory):
        the other ranks learn of the failure at once instead of waiting at the next collective.
        """
        result, message = None, None
        if self.is_main:
            try:
                result = action()
            except MarbleError as exc:
                message = str(exc)
        if self.active:
            box = [message]
            with _collective("broadcast_object_list"):
                torch_dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message is not None:
            raise MarbleError(message)
        return result

    def consolidate_optimizer(self, optimizer: Any) -> None:
        """Gather a ZeroRedundancyOptimizer's shards on rank 0 (a collective: every rank calls it)."""
        with _collective("consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)

    def exit_after_collective_failure(self, exc: BaseException, code: int = 1) -> NoReturn:
        """Report a failed collective in one line and end this process at once.

        After a gloo/NCCL timeout the process group still owns threads blocked on the dead peer;
        tearing it down (``destroy_process_group`` or interpreter shutdown) can hang or abort
        with SIGABRT. So the message is flushed and the process leaves via ``os._exit`` without
        running destructors; checkpoints already on disk are complete (they are written atomically).
        """
        print(f"error: rank {self.rank}: {_first_line(exc)}; another "
              f"rank failed or stopped responding; see its log, or raise {TIMEOUT_ENV} if rank 0 needs "
              "longer for checkpoints", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)

    def close(self) -> None:
        """Leave the process group (at the end of a run)."""
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of the exact bytes of ``tensors`` (to check that ranks hold the same weights)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str((tuple(data.shape), data.dtype)).encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
