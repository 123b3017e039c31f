"""`marble bench fidelity`: how far `affine` and `periodic` balancing are from `exact` every step.

One training run per seed is driven by MARBLE with the `exact` Gram (K + 1 backward passes, the
reference). On every step, on the very same batch and weights, :class:`FidelityTrainer` also
computes the `affine` per-reward gradients, and shadow balancers (fresh instances of the same
balancer, with their own EMA state) say what each mode would have done:

* ``exact``    the driving balancer on the exact Gram, every step;
* ``affine``   a shadow balancer on the affine Gram, every step;
* ``periodic`` a shadow balancer on the affine Gram every n steps; between solves it keeps its
  last weights (stale λ), as ``--gram periodic`` does;
* ``uniform``  fixed 1/K weights, for scale.

Per step and mode: the cosine between the mode's fused direction d and exact's, |Δλ|₁ against
exact's λ, and the worst reward cosine min_k cos(g_k, d) measured with the exact gradients g_k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from marble_kit import gram as gram_ops
from marble_kit.bench.common import (
    build_policy,
    components_for,
    fraction,
    machine_description,
    mean_and_spread,
    new_figure,
    save_figure,
    weights_fingerprint,
)
from marble_kit.config import DEFAULT_REWARDS, TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.registry import build
from marble_kit.trainer import TrainBatch, Trainer

MODES = ("exact", "affine", "periodic", "uniform")
# affine overlaps exact almost everywhere: dashed on top so both stay visible
MODE_STYLE = {"exact": {"color": "C0", "lw": 2.4}, "affine": {"color": "C1", "lw": 1.4, "ls": "--"},
              "periodic": {"color": "C2", "lw": 1.5}, "uniform": {"color": "C3", "lw": 1.2, "alpha": 0.8}}


@dataclass
class FidelitySettings:
    """What `marble bench fidelity` runs (defaults: 3 seeds × 40 steps, a few minutes on 2 cores)."""

    steps: int = 40
    seeds: int = 3
    balancer: str = "marble"
    balancer_options: dict = field(default_factory=dict)
    gram_period: int = 10
    rewards: list = field(default_factory=lambda: list(DEFAULT_REWARDS))
    prompts: list = field(default_factory=lambda: ["default"])
    prompts_per_step: int = 4
    images_per_prompt: int = 4
    timesteps_per_image: int = 4
    sample_steps: int = 8
    lr: float = 5e-3
    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seeds < 1 or self.gram_period < 1:
            raise MarbleError("fidelity bench: steps, seeds and the period must be ≥ 1")

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            policy=self.policy, policy_options=dict(self.policy_options), rewards=list(self.rewards),
            balancer=self.balancer, balancer_options=dict(self.balancer_options), gram="exact",
            prompts=list(self.prompts), seed=seed, steps=self.steps,
            prompts_per_step=self.prompts_per_step, images_per_prompt=self.images_per_prompt,
            timesteps_per_image=self.timesteps_per_image, sample_steps=self.sample_steps, lr=self.lr,
            out="-", checkpoint_every=0, sample_every=0)


class FidelityTrainer(Trainer):
    """Trains with the `exact` Gram and keeps, per step, the exact and the `affine` per-reward
    gradients of the same batch (``self.gradients``) for the comparison."""

    gradients: tuple[torch.Tensor, torch.Tensor] | None = None

    def _exact_gradients(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        grads, anchor = super()._exact_gradients(batch)
        affine, _ = self._affine_gradients(batch)
        self.gradients = (grads.detach().double(), affine.detach().double())
        return grads, anchor


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def compare_step(exact_grads: torch.Tensor, directions: dict[str, torch.Tensor],
                 lams: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per mode: cos(d_mode, d_exact), |λ_mode − λ_exact|₁ and min_k cos(g_k, d_mode)."""
    out = {}
    for mode, direction in directions.items():
        worst = gram_ops.update_cosines(exact_grads, direction).min()
        out[mode] = {"cos_to_exact": cosine(direction, directions["exact"]),
                     "lambda_l1": float((lams[mode] - lams["exact"]).abs().sum()),
                     "worst_cos": float(worst)}
    return out


@dataclass
class ShadowBalancers:
    """The affine-every-step and periodic shadows of the driving balancer."""

    affine: Any
    periodic: Any
    period: int
    periodic_weights: torch.Tensor | None = None
    periodic_lam: torch.Tensor | None = None

    def step(self, affine_gram: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], bool]:
        """This step's loss weights and λ of both shadows; whether periodic solved now."""
        affine_weights = self.affine.weights(affine_gram, step).double()
        solve = step % self.period == 0 or self.periodic_weights is None
        if solve:
            self.periodic_weights = self.periodic.weights(affine_gram, step).double()
            self.periodic_lam = _lam(self.periodic, self.periodic_weights)
        return {"affine": affine_weights, "affine_lam": _lam(self.affine, affine_weights),
                "periodic": self.periodic_weights, "periodic_lam": self.periodic_lam}, solve


def _lam(balancer: Any, weights: torch.Tensor) -> torch.Tensor:
    lam = getattr(balancer, "lam", None)
    return (lam if lam is not None else weights).detach().double().clone()


def run_seed(settings: FidelitySettings, seed: int) -> dict[str, Any]:
    """One exact-driven run with its per-step comparison records."""
    config = settings.config(seed)
    policy = build_policy(config)
    trainer = FidelityTrainer(config, components_for(config, policy))
    if getattr(trainer.balancer, "gram_metric", "euclidean") != "euclidean":
        raise MarbleError("fidelity bench compares Euclidean Grams; drop the balancer's metric option")
    num_rewards = len(config.rewards)

    def shadow():
        return build("balancer", config.balancer, config.balancer_options, num_rewards)

    shadows = ShadowBalancers(shadow(), shadow(), settings.gram_period)
    uniform = torch.full((num_rewards,), 1.0 / num_rewards, dtype=torch.float64)
    records = []
    for step in range(settings.steps):
        trainer.step()
        exact_grads, affine_grads = trainer.gradients
        affine_gram = gram_ops.gram_matrix(affine_grads)
        exact_gram = gram_ops.gram_matrix(exact_grads)
        shadow_weights, solved = shadows.step(affine_gram, step)
        exact_weights = trainer.loss_weights.double()
        directions = {
            "exact": exact_weights @ exact_grads,
            "affine": shadow_weights["affine"] @ affine_grads,
            # reuse steps train on one backward of L(r_eff), i.e. Σ w_k g_k with the true g_k
            "periodic": shadow_weights["periodic"] @ (affine_grads if solved else exact_grads),
            "uniform": uniform @ exact_grads,
        }
        lams = {"exact": _lam(trainer.balancer, exact_weights), "affine": shadow_weights["affine_lam"],
                "periodic": shadow_weights["periodic_lam"], "uniform": uniform}
        record = {"step": step + 1, "periodic_solved": solved,
                  "gram_relative_error": float((affine_gram - exact_gram).norm() / exact_gram.norm()),
                  **compare_step(exact_grads, directions, lams)}
        records.append(record)
    return {"seed": seed, "steps": records, "fingerprint": weights_fingerprint(policy.trainable_module()),
            "device": str(policy.device)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        entries = [step[mode] for run in runs for step in run["steps"]]
        reuse = [step[mode] for run in runs for step in run["steps"] if not step["periodic_solved"]]
        rows.append({
            "mode": mode,
            "mean_cos_to_exact": mean_and_spread([e["cos_to_exact"] for e in entries])[0],
            "min_cos_to_exact": min(e["cos_to_exact"] for e in entries),
            "mean_lambda_l1": mean_and_spread([e["lambda_l1"] for e in entries])[0],
            "max_lambda_l1": max(e["lambda_l1"] for e in entries),
            "mean_lambda_l1_between_solves": mean_and_spread([e["lambda_l1"] for e in reuse])[0],
            "negative_worst_cos": fraction([e["worst_cos"] < 0 for e in entries]),
            "mean_worst_cos": mean_and_spread([e["worst_cos"] for e in entries])[0],
            "steps": len(entries),
        })
    return rows


def run_fidelity_benchmark(settings: FidelitySettings | None = None,
                           on_seed: Callable[[int], None] | None = None) -> dict[str, Any]:
    settings = settings or FidelitySettings()
    runs = []
    for seed in range(settings.seeds):
        if on_seed is not None:
            on_seed(seed)
        runs.append(run_seed(settings, seed))
    errors = [step["gram_relative_error"] for run in runs for step in run["steps"]]
    return {
        "benchmark": "fidelity",
        "settings": asdict(settings),
        "machine": machine_description(runs[0]["device"]),
        "policy_fingerprint": runs[0]["fingerprint"],
        "max_gram_relative_error": max(errors),
        "rows": summarize(runs),
        "runs": runs,
    }


def plot_fidelity(report: dict[str, Any], path) -> Any:
    """Per step (mean over seeds): cos to exact's direction, |Δλ|₁ and the worst reward cosine."""
    fig, axes = new_figure(1, 3, width=5.0)
    runs = report["runs"]
    steps = [s["step"] for s in runs[0]["steps"]]
    panels = (("cos_to_exact", "cos(d_mode, d_exact)"), ("lambda_l1", "|λ_mode − λ_exact|₁"),
              ("worst_cos", "worst reward cos (exact g_k)"))
    for ax, (key, title) in zip(axes[0], panels):
        for mode in MODES:
            if mode == "exact" and key != "worst_cos":
                continue
            curve = [sum(run["steps"][i][mode][key] for run in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, curve, label=mode, **MODE_STYLE[mode])
        ax.set(title=title + " (mean over seeds)", xlabel="step")
        ax.grid(alpha=0.3)
        if key == "worst_cos":
            ax.axhline(0.0, color="black", lw=0.8)
    axes[0][2].legend(fontsize=8)
    return save_figure(fig, path)
