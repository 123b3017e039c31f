"""An exponential moving average of the trainable weights (the release's EMAModuleWrapper schedule).

After optimizer step n (1-based) every tensor moves to ``ema ← d_n·ema + (1 − d_n)·θ`` with
``d_n = min((1 + n)/(10 + n), decay)``: a short memory while the weights change fast, ``decay``
(the release: 0.9, reached at n = 80) later. It starts as a copy of the initial weights. Training
never reads it; evaluation, sample grids and the checkpoint's ``ema_adapter/`` swap it in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from marble_kit.errors import MarbleError
from marble_kit.policy import swapped_data


def ema_decay_at(step: int, decay: float) -> float:
    """The decay applied after optimizer step ``step`` (1-based): min((1+n)/(10+n), decay)."""
    return min((1.0 + step) / (10.0 + step), decay)


class WeightEMA:
    """EMA copies of ``params`` (same devices and dtypes), updated with :meth:`update`."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise MarbleError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0  # optimizer steps folded in

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Fold in the current weights after optimizer step ``step`` (1-based); returns the decay."""
        decay = ema_decay_at(step, self.decay)
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach(), 1.0 - decay)
        self.updates = step
        return decay

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in place of the trainable ones for the block (no grad work inside:
        the parameters' ``.data`` pointers are swapped, nothing is copied, and put back after)."""
        with swapped_data(self.params, self.shadow):
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"decay": torch.tensor(self.decay, dtype=torch.float64),
                "updates": torch.tensor(self.updates, dtype=torch.int64),
                "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state.get("shadow")
        if not isinstance(shadow, list) or len(shadow) != len(self.params) or any(
                tuple(s.shape) != tuple(p.shape) for s, p in zip(shadow, self.params)):
            raise MarbleError("the checkpoint's weight EMA does not match this policy's trainable weights; "
                              "resume with the same policy, rank and target modules")
        with torch.no_grad():
            for target, saved in zip(self.shadow, shadow):
                target.copy_(saved)
        self.updates = int(state["updates"])
