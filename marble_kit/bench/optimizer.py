"""`marble bench optimizer --policy tiny-sd3`: the adam-momentum guarantee on a real training run.

The toy problem (:func:`marble_kit.bench.balancers.optimizer_conflict_benchmark`) measures the
margin of the momentum guarantee on noisy least squares; this is the same measurement on the
tiny policy, through the trainer itself: fresh MGDA every step (`affine` Gram, no EMA) in the
euclidean metric and in the adam-momentum metric, with everything the trainer adds around the
balanced part (the reference anchor, AdamW's weight decay, gradient clipping with this step's
factor). Per step, with the trainer's per-reward gradients g_k, its min-norm λ (normalized
over the active rewards), d = Σ λ_k g_k and AdamW's actual direction u = −Δθ:

* conflict against d and against u: the worst active reward's cosine is negative;
* the margin min_k (⟨g_k, u⟩ − ⟨d, u⟩)/(‖g_k‖·‖u‖), worst over steps 0–1, 2–10 and after 10
  (the guarantee says ≥ 0 with Adam's preconditioner frozen at its value before the step).
"""

from __future__ import annotations

from typing import Any

import torch

from marble_kit.bench.common import build_policy, components_for, machine_description, policy_fingerprint
from marble_kit.bench.conflict import METHODS, ConflictSettings
from marble_kit.trainer import Trainer

# metric name → the conflict bench's method (fresh λ every step, no EMA)
POLICY_METHODS = {"euclidean": "mgda", "adam-momentum": "marble-adam-momentum"}


class MarginTrainer(Trainer):
    """A :class:`Trainer` that keeps, on every Gram step, the per-reward gradients, the active
    set and the balancer's weights, and reports the margin of the actual optimizer step."""

    _captured: dict[str, torch.Tensor] | None = None

    def _solve_gram(self, gram, grads, anchor, active):
        self._captured = {"grads": grads.detach().double().cpu(), "active": active.detach().cpu()}
        return super()._solve_gram(gram, grads, anchor, active)

    def _balance(self, gram, step, active):
        weights = super()._balance(gram, step, active)
        if self._captured is not None:
            self._captured["weights"] = weights.detach().double().cpu()
        return weights

    def step(self) -> dict[str, Any]:
        self._captured = None
        before = torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])
        metrics = super().step()
        captured = self._captured
        if captured is None or "weights" not in captured:
            return metrics
        after = torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])
        update = before - after
        active = captured["active"] & (captured["grads"].norm(dim=1) > 0)
        if not active.any() or update.norm() == 0:
            return metrics
        grads = captured["grads"][active]
        lam = captured["weights"][active].clamp_min(0)
        lam = lam / lam.sum() if lam.sum() > 0 else torch.full_like(lam, 1.0 / len(lam))
        fused = lam @ grads
        margin = (grads @ update - fused @ update) / (grads.norm(dim=1) * update.norm())
        metrics["margin_update/worst"] = float(margin.min())
        return metrics


def policy_optimizer_benchmark(metrics: tuple[str, ...] = ("euclidean", "adam-momentum"), steps: int = 30,
                               seeds: tuple[int, ...] = (0, 1, 2), weight_decay: float | None = None,
                               grad_clip: float | None = None, kl: float | None = None,
                               policy: str = "tiny-sd3", rewards: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Conflict rates and the momentum guarantee's margin of real training steps per Gram metric
    (the trainer's defaults unless ``weight_decay``, ``grad_clip`` or ``kl`` are given)."""
    settings = ConflictSettings(steps=steps, seeds=len(seeds), methods=[POLICY_METHODS[m] for m in metrics],
                                policy=policy)
    if rewards is not None:
        settings.rewards = list(rewards)
    methods = {m.name: m for m in METHODS}
    overrides = {key: value for key, value in (("weight_decay", weight_decay), ("grad_clip", grad_clip),
                                               ("kl", kl)) if value is not None}
    rows, fingerprint = [], None
    for metric in metrics:
        buckets: dict[str, list[float]] = {"0-1": [], "2-10": [], ">10": []}
        fused_conflicts, update_conflicts, measured, worst_update = 0, 0, 0, []
        for seed in seeds:
            config = settings.config(methods[POLICY_METHODS[metric]], seed)
            for key, value in overrides.items():
                setattr(config, key, value)
            network = build_policy(config)  # the seed's own base weights and LoRA initialisation
            fingerprint = fingerprint or policy_fingerprint(network)
            trainer = MarginTrainer(config, components_for(config, network))
            for step in range(steps):
                record = trainer.step()
                if "margin_update/worst" not in record:
                    continue
                measured += 1
                buckets["0-1" if step < 2 else "2-10" if step <= 10 else ">10"].append(record["margin_update/worst"])
                fused_conflicts += record["cos/worst"] < -1e-9
                update_conflicts += record["cos_update/worst"] < -1e-9
                worst_update.append(record["cos_update/worst"])
        rows.append({
            "metric": metric,
            "conflict_rate_fused": fused_conflicts / measured if measured else None,
            "conflict_rate_update": update_conflicts / measured if measured else None,
            "mean_worst_cos_update": sum(worst_update) / len(worst_update) if worst_update else None,
            "steps": measured,
            **{f"worst_margin_steps_{bucket}": (min(values) if values else None)
               for bucket, values in buckets.items()},
        })
    return {"policy": policy, "prior": fingerprint, "steps": steps, "seeds": list(seeds),
            "overrides": overrides, "machine": machine_description(), "rows": rows}
