"""Checks every diffusers policy must pass, shared by the SD3 and FLUX.1 policy tests."""

from __future__ import annotations

import torch


def perturb(policy, seed: int, scale: float = 0.1) -> None:
    """Move the trainable LoRA weights away from their zero-B initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def assert_checkpointing_keeps_gradients(plain, checkpointed, x_t, t, cond) -> None:
    """The same LoRA gradients with and without gradient checkpointing (``plain`` perturbed,
    ``checkpointed`` given its weights)."""
    perturb(plain, seed=5)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.transformer.is_gradient_checkpointing
    grads = []
    for policy in (plain, checkpointed):
        policy.transformer.train()  # checkpointing is active in training mode
        policy.velocity(x_t, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
