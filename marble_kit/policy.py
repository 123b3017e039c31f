"""The policy contract: a trainable rectified-flow text-to-image model.

Convention (SD3): ``x_t = (1 - t) * x0 + t * noise`` with ``t`` in ``[0, 1]``; the model predicts
the velocity ``v = noise - x0``. A policy holds three views of one network:

* ``velocity``      — the trainable policy v_θ (adapter active, gradients flow);
* ``old_velocity``  — the sampling policy v_old, an EMA of the trainable weights (no grad);
* ``ref_velocity``  — the frozen reference v_ref (adapters disabled, no grad).

Optional (the trainer asks with ``getattr`` and says what is missing when a config needs it):

* ``sampling_timesteps(steps) -> Tensor [steps]`` — the t ∈ [0, 1] at which ``sample`` evaluates
  the velocity with ``steps`` sampler steps, first to last (float32, CPU); for a flow-matching
  scheduler its shifted σ's. ``timestep_schedule = "grid"`` trains on these.
* ``autocast_dtype`` — the half-precision dtype of the forward passes, if any (round-off bounds).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class Rollout:
    """Samples of the old policy for a batch of prompts (one row per image)."""

    prompts: list[str]
    x0: torch.Tensor          # [B, C, h, w] clean latents (what the loss regresses to)
    images: torch.Tensor      # [B, 3, H, W] decoded images, float in [0, 1], on the CPU
    cond: Any                 # policy-specific conditioning: `cond.index(rows)` selects samples


@runtime_checkable
class Policy(Protocol):
    name: str
    device: torch.device

    def sample(self, prompts: Sequence[str], generator: torch.Generator, steps: int | None = None,
               use_old: bool = True, noise: torch.Tensor | None = None) -> Rollout:
        """One image per prompt (prompts already repeated G times) with the old policy, or with
        the current trainable weights when ``use_old`` is False (evaluation); ``noise`` fixes
        the initial latents (shape ``latent_shape(len(prompts))``)."""

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the initial noise for ``batch`` images."""

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Conditioning for ``prompts`` (no grad)."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """v_θ(x_t, t, c) with gradients to the trainable parameters."""

    def old_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """v_old(x_t, t, c), no grad."""

    def ref_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """v_ref(x_t, t, c): the frozen base model, no grad."""

    def update_old(self, decay: float) -> None:
        """θ_old ← decay·θ_old + (1 − decay)·θ."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (LoRA A/B matrices)."""

    def trainable_module(self) -> nn.Module:
        """The module holding the LoRA layers (for hooks in the `affine` Gram)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable and old-policy weights (everything a checkpoint needs)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_adapter(self, directory: str) -> Any:
        """Write the LoRA adapter as safetensors that diffusers `load_lora_weights` accepts."""

    def load_adapter(self, path: str) -> None:
        """Load an adapter written by ``save_adapter`` into the trainable and old weights."""


@contextmanager
def offloaded(modules: Iterable[Any], device: torch.device | str, enabled: bool = True
              ) -> Iterator[None]:
    """Move ``modules`` (anything with ``.to``, e.g. nn.Modules or rewards) to ``device`` for the
    block and back to the CPU after it: big components stay off the GPU while idle."""
    modules = list(modules)
    if not enabled:
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def swapped_data(params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """``tensors`` in place of the parameters' values for the block, put back after it.

    Swapping ``.data`` pointers is O(1) (measured 0.1 ms for a LoRA), copies nothing and leaves
    autograd's version counters alone: the views of a policy (old weights, a weight EMA) share
    one network this way."""
    current = [p.data for p in params]
    for p, tensor in zip(params, tensors):
        p.data = tensor
    try:
        yield
    finally:
        for p, data in zip(params, current):
            p.data = data


def iter_lora_pairs(module: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, float]]:
    """(name, lora_A, lora_B, scaling) for every active peft LoRA linear layer in ``module``."""
    from peft.tuners.lora import LoraLayer  # peft is a hard dependency; imported lazily

    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and layer.lora_A[adapter].weight.requires_grad:
                yield name, layer.lora_A[adapter], layer.lora_B[adapter], layer.scaling[adapter]


def has_cross_sample_ops(module: nn.Module) -> str | None:
    """Name of the first layer that mixes samples within a batch (batch-norm), if any."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            return name or type(layer).__name__
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats is False:
            return name or type(layer).__name__
    return None


# ---------------------------------------------------------------- execution helpers (diffusers + peft)
_LORA_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its peft layers


@contextmanager
def lora_inputs_uncast(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """peft's LoRA layers without their cast of the input to the LoRA weights' dtype.

    peft casts a layer's input to the dtype of its LoRA weights (float32 here) before ``lora_A``;
    under autocast ``F.linear`` casts it straight back to the autocast dtype — two copies of
    every LoRA layer's input in the forward and two of its gradient in the backward, and the
    values are the same without them (bf16 → fp32 → bf16 is exact). Use it with autocast on
    (``enabled``); without autocast the input already has the LoRA dtype and peft casts nothing.
    """
    if not enabled:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module not in _LORA_LAYERS:
        _LORA_LAYERS[module] = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    with attributes_set(_LORA_LAYERS[module], "cast_input_dtype_enabled", False):
        yield


@contextmanager
def attributes_set(objects: Sequence[Any], name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` on every object for the block, each one's own value put back after."""
    before = [getattr(obj, name, True) for obj in objects]
    for obj in objects:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, old in zip(objects, before):
            setattr(obj, name, old)


class AutoCheckpointing:
    """``gradient_checkpointing = "auto"``: per training forward, keep the activations when they
    fit, else recompute them in the backward (diffusers' checkpointing).

    On a GPU the first call measures what one row's activations take (a forward of one row
    without checkpointing, its graph dropped at once) and each call then keeps the activations
    of its ``rows`` when rows × that × ``margin`` (the backward's own temporaries) fits in
    ``fraction`` of the memory free to the allocator (the device's free memory plus what the
    allocator caches unused). On the CPU there is no allocator to ask: activations are kept.
    ``decisions`` counts the calls per choice ("kept", "checkpointed").
    """

    def __init__(self, module: nn.Module, device: torch.device, fraction: float = 0.8, margin: float = 1.5):
        self.module = module
        self.device = torch.device(device)
        self.fraction, self.margin = fraction, margin
        self.row_bytes: float | None = None
        self.decisions = {"kept": 0, "checkpointed": 0}
        self._flags = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]
        if not self._flags:
            raise ValueError(f"{type(module).__name__} has no gradient checkpointing to switch")
        module.enable_gradient_checkpointing()  # installs diffusers' checkpoint function

    def keep(self, rows: int, probe) -> bool:
        """Whether a forward of ``rows`` rows keeps its activations; ``probe()`` runs a one-row
        forward with grad (called once, on a GPU, to measure a row)."""
        if self.device.type != "cuda":
            return True
        if self.row_bytes is None:
            with self.switched(False):
                torch.cuda.synchronize(self.device)
                before = torch.cuda.memory_allocated(self.device)
                output = probe()
                self.row_bytes = float(max(torch.cuda.memory_allocated(self.device) - before, 1))
                del output
        free, _total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return rows * self.row_bytes * self.margin <= self.fraction * (free + cached)

    def switched(self, checkpointing: bool):
        return attributes_set(self._flags, "gradient_checkpointing", checkpointing)

    @contextmanager
    def __call__(self, rows: int, probe) -> Iterator[None]:
        keep = self.keep(rows, probe)
        self.decisions["kept" if keep else "checkpointed"] += 1
        with self.switched(not keep):
            yield
