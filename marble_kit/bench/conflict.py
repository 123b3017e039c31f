"""`marble bench conflict`: do balanced updates stop leaving rewards behind? (tiny policy)

Six methods train from the same seeds, the same LoRA initialisation and the same prompt and
noise draws, on the default specialist-prompt rewards (SPEC §1.2: each world reward judges its
own prompt set, `centering` judges all):

* ``weighted-sum``   uniform weights over the per-reward advantages (one backward);
* ``summed-reward``  DiffusionNFT's baseline: one advantage of the summed reward;
* ``mgda``           MGDA min-norm weights every step (`affine` Gram);
* ``marble``         MARBLE: MGDA + EMA on λ (ρ = 0.7), every step;
* ``marble-periodic`` MARBLE solving every n = 10 steps, stale λ between solves;
* ``marble-adam-momentum`` MARBLE with the optimizer-aware (momentum) Gram (rho = 0: its guarantee needs the fresh λ).

Per step: the worst-aligned reward's cosine with the fused gradient d and with the actual
parameter update −Δθ (AdamW's step). On the steps where the trainer computes no per-reward
gradients (periodic reuse steps, the summed baseline) :class:`DiagnosedTrainer` measures them
with the `affine` gradients of the same batch. At the end: each reward's change over the base
policy on held-out prompts and a held-out noise seed, in units of the base policy's std.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from marble_kit import gram as gram_ops
from marble_kit.advantages import group_advantages
from marble_kit.bench.common import (
    build_policy,
    components_for,
    fraction,
    machine_description,
    mean_and_spread,
    new_figure,
    policy_fingerprint,
    save_figure,
)
from marble_kit.config import DEFAULT_REWARDS, TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.evaluate import run_scoring, score_policy
from marble_kit.nft import reward_row_coefficients
from marble_kit.prompts import applicability_mask, load_prompt_sets
from marble_kit.trainer import RewardScoring, TrainBatch, Trainer


@dataclass(frozen=True)
class Method:
    name: str
    balancer: str
    gram: str
    balancer_options: dict = field(default_factory=dict)
    baseline: bool = False   # a weighted-sum baseline (the paper's targets differ)


METHODS = (
    Method("weighted-sum", "weighted-sum", "affine", baseline=True),
    Method("summed-reward", "weighted-sum", "affine", {"mode": "summed-reward"}, baseline=True),
    Method("mgda", "mgda-qp", "affine"),
    Method("marble", "marble", "affine"),
    Method("marble-periodic", "marble", "periodic"),
    Method("marble-adam-momentum", "marble", "affine", {"metric": "adam-momentum", "rho": 0.0}),
    # not run by default: the two gradient normalizations side by side (the `marble` default's choice)
    Method("marble-unit", "marble", "affine", {"normalize": "unit"}),
    Method("marble-none", "marble", "affine", {"normalize": "none"}),
)
METHOD_NAMES = tuple(m.name for m in METHODS)
DEFAULT_METHODS = METHOD_NAMES[:6]


def _train_default(name: str):
    return getattr(TrainConfig(), name)


@dataclass
class ConflictSettings:
    """What `marble bench conflict` trains (defaults: 3 seeds × 6 methods × 30 steps, the
    trainer's batch and learning rate; one method × 3 seeds × 150 steps, the default run's
    length, took ~15 min on the shipped prior, docs/benchmarks.md)."""

    steps: int = 30
    seeds: int = 3
    methods: list = field(default_factory=lambda: list(DEFAULT_METHODS))
    rewards: list = field(default_factory=lambda: list(DEFAULT_REWARDS))
    prompts: list = field(default_factory=lambda: ["default"])
    eval_prompts: list = field(default_factory=lambda: ["world_eval"])
    eval_images_per_prompt: int = 4
    eval_seed: int = 1234          # held-out noise: training draws come from seeds 0, 1, 2, ...
    # the batch shape and learning rate of `marble train`'s defaults (TrainConfig)
    prompts_per_step: int = field(default_factory=lambda: _train_default("prompts_per_step"))
    images_per_prompt: int = field(default_factory=lambda: _train_default("images_per_prompt"))
    timesteps_per_image: int = field(default_factory=lambda: _train_default("timesteps_per_image"))
    sample_steps: int = field(default_factory=lambda: _train_default("sample_steps"))
    gram_period: int = 10
    lr: float = field(default_factory=lambda: _train_default("lr"))
    reward_scope: str = "judged"   # rows of each reward's loss (TrainConfig.reward_scope)
    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise MarbleError(f"conflict bench: unknown method {unknown[0] if unknown else '(none)'}; "
                              f"choose from {', '.join(METHOD_NAMES)}")
        if self.steps < 1 or self.seeds < 1 or self.eval_images_per_prompt < 1:
            raise MarbleError("conflict bench: steps, seeds and eval images per prompt must be ≥ 1")

    def config(self, method: Method, seed: int) -> TrainConfig:
        return TrainConfig(
            policy=self.policy, policy_options=dict(self.policy_options), rewards=list(self.rewards),
            balancer=method.balancer, balancer_options=dict(method.balancer_options), gram=method.gram,
            gram_period=self.gram_period, prompts=list(self.prompts), seed=seed, steps=self.steps,
            prompts_per_step=self.prompts_per_step, images_per_prompt=self.images_per_prompt,
            timesteps_per_image=self.timesteps_per_image, sample_steps=self.sample_steps, lr=self.lr,
            reward_scope=self.reward_scope, out="-", checkpoint_every=0, sample_every=0)


class DiagnosedTrainer(Trainer):
    """A :class:`Trainer` that also reports the per-reward cosines on the steps where the trainer
    computes no per-reward gradients (periodic reuse steps, the summed-reward baseline).

    There it takes the `affine` per-reward gradients of the very batch being trained on (two
    extra backward passes, exact to ~1e-6), keeps the fused gradient d and the weights before
    the optimizer step, and reports cos(g_k, d) and cos(g_k, −Δθ) under the same keys as the
    trainer (``cos/…``, ``cos_update/…``). For the measurement only: the update is unchanged.
    """

    _scored: torch.Tensor | None = None
    _diagnosis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _score(self, images, prompts, set_ids):
        rewards = super()._score(images, prompts, set_ids)
        self._scored = rewards
        return rewards

    def _per_reward_rows(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r_k, the loss coefficients and the preference of every reward on the training rows
        (the summed baseline trains on one advantage of the summed reward)."""
        rewards = self._scored
        groups = torch.arange(rewards.shape[1]) // self.config.images_per_prompt
        adv = group_advantages(rewards, groups, std_scope=self.config.adv_std, clip=self.config.adv_clip)
        judgement = self._judgement(adv)
        rows = torch.arange(rewards.shape[1]).repeat(self.config.timesteps_per_image)
        coef = reward_row_coefficients(judgement.judged[:, rows], judgement.counts())
        return adv.probabilities[:, rows].to(batch.r), coef.to(batch.coef), judgement.candidates()

    def _fused_backward(self, batch: TrainBatch, weights: torch.Tensor, anchor_rows: int | None = None) -> None:
        summed = self.summed_weights is not None
        if summed:
            r, coef, candidates = self._per_reward_rows(batch)
            rows = dataclasses.replace(batch, r=torch.cat([r, batch.r]), coef=torch.cat([coef, batch.coef]))
        else:
            rows, candidates = batch, batch.candidates
        grads, _ = self._affine_gradients(rows, anchor=False)
        num_rewards = len(self.reward_names)
        weights_ = weights.to(grads)
        fused = weights_ @ grads[num_rewards:] if summed else weights_ @ grads
        before = torch.cat([p.detach().reshape(-1).clone() for p in self.params])
        self._diagnosis = (grads[:num_rewards], fused, before, self._active(candidates, grads[:num_rewards]))
        super()._fused_backward(batch, weights, anchor_rows)

    def step(self) -> dict[str, Any]:
        self._diagnosis = None
        metrics = super().step()
        if self._diagnosis is not None:
            grads, fused, before, active = self._diagnosis
            delta = torch.cat([p.detach().reshape(-1) for p in self.params]) - before
            for prefix, direction in (("cos", fused), ("cos_update", -delta)):
                cos = gram_ops.update_cosines(grads, direction.to(grads))
                metrics.update({f"{prefix}/{n}": float(c) for n, c in zip(self.reward_names, cos)})
                metrics[f"{prefix}/worst"] = float(cos[active].min()) if active.any() else float("nan")
            metrics["cos_measured_by_bench"] = True
        return metrics


# ---------------------------------------------------------------- held-out evaluation
@dataclass
class HeldOut:
    prompts: list[str]
    mask: torch.Tensor


def held_out_prompts(settings: ConflictSettings, reward_names: list[str]) -> HeldOut:
    sets = load_prompt_sets(settings.eval_prompts)
    pairs = [(p, i) for i, s in enumerate(sets) for p in s.prompts]
    if not pairs:
        raise MarbleError(f"conflict bench: eval prompt sets {settings.eval_prompts} are empty")
    repeat = settings.eval_images_per_prompt
    prompts = [p for p, _ in pairs for _ in range(repeat)]
    set_ids = torch.tensor([i for _, i in pairs for _ in range(repeat)])
    return HeldOut(prompts, applicability_mask(set_ids, reward_names, sets))


def reward_summary(scores: torch.Tensor) -> tuple[list[float], list[float]]:
    """NaN-aware per-reward mean and std of [K, N] scores."""
    means, stds = [], []
    for row in scores:
        values = row[torch.isfinite(row)].double()
        means.append(float(values.mean()) if values.numel() else float("nan"))
        stds.append(float(values.std(unbiased=False)) if values.numel() > 1 else float("nan"))
    return means, stds


def change_in_base_std(base: torch.Tensor, tuned: torch.Tensor) -> list[float]:
    """(tuned mean − base mean) / base std, per reward."""
    base_mean, base_std = reward_summary(base)
    tuned_mean, _ = reward_summary(tuned)
    return [(t - b) / s if s and s > 0 else float("nan") for t, b, s in zip(tuned_mean, base_mean, base_std)]


# ---------------------------------------------------------------- the run
STEP_KEYS = ("cos/worst", "cos_update/worst")


def train_method(settings: ConflictSettings, method: Method, seed: int, policy: Any,
                 initial_state: dict[str, torch.Tensor], held_out: HeldOut,
                 base_scores: torch.Tensor) -> dict[str, Any]:
    """Train one method from the seed's initial LoRA; per-step cosines and held-out changes."""
    policy.load_state_dict(initial_state)
    config = settings.config(method, seed)
    trainer = DiagnosedTrainer(config, components_for(config, policy))
    steps = []
    for _ in range(settings.steps):
        metrics = trainer.step()
        steps.append({
            "cos_worst": metrics.get("cos/worst", float("nan")),
            "cos_update_worst": metrics.get("cos_update/worst", float("nan")),
            "gram_mode": metrics["gram_mode"],
            **{f"weight/{n}": metrics.get(f"weight/{n}", float("nan")) for n in config.rewards},
            **{f"reward/{n}": metrics.get(f"reward/{n}", float("nan")) for n in config.rewards},
        })
    tuned, _ = score_policy(policy, run_scoring(trainer.scoring, trainer.reward_names, trainer.rewards),
                            held_out.prompts, held_out.mask,
                            settings.eval_seed, settings.sample_steps)
    return {"method": method.name, "seed": seed, "steps": steps,
            "change_in_base_std": change_in_base_std(base_scores, tuned)}


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def summarize(runs: list[dict[str, Any]], reward_names: list[str], methods: list[Method]
              ) -> list[dict[str, Any]]:
    """Per method: conflict rates over all (seed, step) pairs and held-out changes over seeds."""
    rows = []
    for method in methods:
        mine = [run for run in runs if run["method"] == method.name]
        cos = finite([s["cos_worst"] for run in mine for s in run["steps"]])
        cos_update = finite([s["cos_update_worst"] for run in mine for s in run["steps"]])
        row: dict[str, Any] = {
            "method": method.name, "seeds": len(mine),
            "negative_fused": fraction([c < 0 for c in cos]),
            "negative_update": fraction([c < 0 for c in cos_update]),
            "mean_worst_cos_fused": mean_and_spread(cos)[0],
            "mean_worst_cos_update": mean_and_spread(cos_update)[0],
            "min_worst_cos_fused": min(cos, default=float("nan")),
            "changes": {},
        }
        for k, name in enumerate(reward_names):
            mean, spread = mean_and_spread([run["change_in_base_std"][k] for run in mine])
            row["changes"][name] = {"mean": mean, "spread": spread,
                                    "per_seed": [run["change_in_base_std"][k] for run in mine]}
        row["left_behind"] = [n for n, c in row["changes"].items() if not c["mean"] > 0]
        rows.append(row)
    return rows


def check_targets(rows: list[dict[str, Any]], methods: list[Method]) -> list[dict[str, Any]]:
    """The paper's claims, per method: baselines conflict in most steps and leave a reward
    behind; MARBLE variants stay positive in every step and improve every reward."""
    by_name = {m.name: m for m in methods}
    checks = []
    for row in rows:
        if by_name[row["method"]].baseline:
            checks.append({"method": row["method"], "target": "worst cos < 0 in most steps",
                           "value": row["negative_fused"], "met": row["negative_fused"] > 0.5})
            checks.append({"method": row["method"], "target": "at least one reward left behind",
                           "value": row["left_behind"], "met": bool(row["left_behind"])})
        else:
            checks.append({"method": row["method"], "target": "worst cos > 0 in every step",
                           "value": row["negative_fused"], "met": row["negative_fused"] == 0.0})
            checks.append({"method": row["method"], "target": "every reward improved",
                           "value": row["left_behind"], "met": not row["left_behind"]})
    return checks


def run_conflict_benchmark(settings: ConflictSettings | None = None,
                           on_run: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Train every method from every seed; return per-step records, summary rows and targets."""
    settings = settings or ConflictSettings()
    methods = [m for m in METHODS if m.name in settings.methods]
    runs, fingerprint, device = [], None, None
    for seed in range(settings.seeds):
        first = settings.config(methods[0], seed)
        policy = build_policy(first)
        device, fingerprint = policy.device, policy_fingerprint(policy)
        initial_state = policy.state_dict()
        held_out = held_out_prompts(settings, list(settings.rewards))
        rewards = components_for(first, policy).rewards
        score = run_scoring(RewardScoring(first, policy.device), list(first.rewards), rewards)
        base_scores, _ = score_policy(policy, score, held_out.prompts, held_out.mask,
                                      settings.eval_seed, settings.sample_steps)
        for method in methods:
            if on_run is not None:
                on_run(method.name, seed)
            runs.append(train_method(settings, method, seed, policy, initial_state, held_out, base_scores))
    rows = summarize(runs, list(settings.rewards), methods)
    return {
        "benchmark": "conflict",
        "settings": asdict(settings),
        "machine": machine_description(device),
        "policy_fingerprint": fingerprint,
        "rows": rows,
        "targets": check_targets(rows, methods),
        "runs": runs,
    }


def mean_curve(runs: list[dict[str, Any]], method: str, key: str) -> list[float]:
    """Per step, the mean over seeds of ``key``."""
    mine = [run["steps"] for run in runs if run["method"] == method]
    return [sum(steps[i][key] for steps in mine) / len(mine) for i in range(len(mine[0]))]


def plot_conflict(report: dict[str, Any], path) -> Any:
    """Worst cosine per step (fused gradient, actual update) and held-out changes per method."""
    fig, axes = new_figure(1, 3, width=5.2)
    methods = [row["method"] for row in report["rows"]]
    for method in methods:
        for ax, key in ((axes[0][0], "cos_worst"), (axes[0][1], "cos_update_worst")):
            curve = mean_curve(report["runs"], method, key)
            ax.plot(range(1, len(curve) + 1), curve, label=method, lw=1.4)
    for ax, title in ((axes[0][0], "worst reward cos vs fused gradient"),
                      (axes[0][1], "worst reward cos vs actual update")):
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set(title=title + " (mean over seeds)", xlabel="step", ylabel="cosine")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    rewards = list(report["rows"][0]["changes"])
    width = 0.8 / len(methods)
    for index, row in enumerate(report["rows"]):
        positions = [k + (index - (len(methods) - 1) / 2) * width for k in range(len(rewards))]
        axes[0][2].bar(positions, [row["changes"][n]["mean"] for n in rewards], width=width,
                       yerr=[row["changes"][n]["spread"] for n in rewards], label=row["method"])
    axes[0][2].axhline(0.0, color="black", lw=0.8)
    axes[0][2].set(xticks=range(len(rewards)), xticklabels=rewards, ylabel="change (base std)",
                   title="held-out change over the base policy (± spread)")
    axes[0][2].legend(fontsize=7)
    return save_figure(fig, path)
