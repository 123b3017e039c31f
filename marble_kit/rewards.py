"""The reward contract and helpers shared by reward plugins.

A reward maps ``(images, prompts)`` to one score per image (higher is better):

* ``images``: float tensor ``[B, 3, H, W]`` in ``[0, 1]`` (any device);
* ``prompts``: list of ``B`` strings; a prompt from a .jsonl line with extra keys is a
  :class:`marble_kit.prompts.Prompt` (still a ``str``) whose metadata :func:`prompt_metadata`
  returns (e.g. GenEval's ``tag`` / ``include``); plain strings have none;
* result: float32 tensor ``[B]`` on the CPU; ``NaN`` marks a sample the reward does not apply
  to (e.g. OCR for a prompt without quoted text).

Subclass :class:`Reward` and implement :meth:`score`; ``__call__`` adds batching, ``no_grad``,
device placement and validation. A factory may also return any plain callable
``reward(images, prompts) -> scores``: :func:`as_reward` (called by the registry) wraps it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from marble_kit.errors import MarbleError
from marble_kit.prompts import prompt_metadata

__all__ = ["CallableReward", "Reward", "as_reward", "prompt_metadata", "quoted_text"]


class Reward(abc.ABC):
    """Base class of reward models.

    Attributes:
        name: registry name (set by the factory or the class).
        batch_size: preferred number of images per forward pass.
        device: where the model runs; images are moved there batch by batch.
    """

    name: str = "reward"
    batch_size: int = 32
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores for one batch (already on ``self.device``)."""

    def to(self, device: torch.device | str) -> Reward:
        """Move the reward's model (if any) to ``device``; subclasses with modules extend this."""
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise MarbleError(
                f"reward {self.name!r}: expected images [B, 3, H, W], got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise MarbleError(
                f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts"
            )
        images = images.float().clamp(0, 1)
        size = max(1, self.batch_size if self.batch_size > 0 else images.shape[0])  # 0: all at once
        chunks = []
        for start in range(0, images.shape[0], size):
            batch = images[start:start + size].to(self.device)
            scores = self.score(batch, list(prompts[start:start + size]))
            chunks.append(torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu())
        result = torch.cat(chunks) if chunks else torch.zeros(0)
        if result.shape[0] != images.shape[0]:
            raise MarbleError(
                f"reward {self.name!r} returned {result.shape[0]} scores for {images.shape[0]} images"
            )
        return result


class CallableReward(Reward):
    """A plain callable ``reward(images, prompts) -> scores`` as a :class:`Reward`.

    The callable gets the whole batch at once (``batch_size`` 0) under ``no_grad``, images
    float in [0, 1]; its scores (tensor, array or list) become float32 on the CPU. ``.to`` moves
    the callable when it has a ``to`` method of its own (e.g. an ``nn.Module``), and the images
    follow it; otherwise ``.to`` is a no-op and the images stay on the CPU.
    """

    batch_size = 0

    def __init__(self, function: Callable[..., Any], name: str):
        self.function, self.name = function, name
        self.movable = callable(getattr(function, "to", None))

    def to(self, device: torch.device | str) -> CallableReward:
        if self.movable:
            self.function.to(device)
            self.device = torch.device(device)
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> Any:
        return self.function(images, list(prompts))


def as_reward(built: Any, name: str, provider: str = "") -> Reward:
    """What a reward factory returned, as a :class:`Reward` (the registry calls this)."""
    if isinstance(built, Reward):
        return built
    if not callable(built):
        source = f" (registered by {provider})" if provider else ""
        raise MarbleError(
            f"reward {name!r}{source}: its factory returned {type(built).__name__}, which is not callable; "
            "a reward factory returns a marble_kit.rewards.Reward or a callable "
            "reward(images, prompts) -> Tensor[B]"
        )
    return CallableReward(built, name)


def quoted_text(prompt: str) -> str | None:
    """The text inside the prompt's first pair of double quotes (None when there is no ``"``).

    An unclosed quote quotes the rest of the prompt, as Flow-GRPO's ``prompt.split('"')[1]``
    does. Only the straight ``"`` counts (curly quotes do not, in the reference either).
    """
    start = prompt.find('"')
    if start < 0:
        return None
    end = prompt.find('"', start + 1)
    return prompt[start + 1:] if end < 0 else prompt[start + 1:end]
