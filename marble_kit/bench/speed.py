"""`marble bench speed`: time per training step of single-reward and K = 5 balancing variants.

Six trainers share ONE policy and take turns, one step each per round, in a freshly shuffled
order every round, so that load changes on the machine hit every variant alike:

* (a) ``single``           one reward, one backward pass (the reference speed);
* (b) ``weighted-sum``     K = 5, fixed uniform weights, one backward pass;
* (c) ``marble-affine``    K = 5, MARBLE with the `affine` Gram every step (two backward passes,
  three with the reference anchor, kl > 0);
* (c') ``marble-periodic`` K = 5, MARBLE solving every n steps with `affine`, one backward between;
* (d) ``marble-exact``     K = 5, MARBLE with the `exact` Gram every step (K backward passes,
  K + 1 with the anchor);
* (e) ``marble-rows``      K = 5, MARBLE every step with the Gram of a per-group sample of a
  quarter of the rows (``gram_rows`` = 0.25), then one backward over all rows with the fresh
  weights (≈ 1 + 2f passes, the anchor riding on the last).

All variants see the same prompts and noise (same seed, same sampler), so their rollouts cost
the same. Per step the trainer's own clocks split the time into rollout, rewards and update
(everything after the rewards) and, inside the update, the gradient step (per-reward
gradients, Gram, balancer, fused gradient, optimizer step). Speed ratios are single-reward
time / variant time within each round, median over rounds (1.0 = as fast as one reward; the
paper reports 0.97× for MARBLE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from marble_kit.bench.common import (
    build_policy,
    components_for,
    machine_description,
    median,
    new_figure,
    peak_memory_mb,
    policy_fingerprint,
    reset_peak_memory,
    save_figure,
    synchronize,
)
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.trainer import Trainer

# K = 5: the default world rewards plus `background`. With the untagged world prompt sets every
# world reward judges the prompts that name its attribute and `sharpness` judges all.
K5_REWARDS = ["color", "shape", "word", "sharpness", "background"]
SPEED_PROMPTS = ["colors", "shapes", "words"]
PHASES = ("step", "rollout", "rewards", "update", "gradient_step")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    balancer: str
    gram: str
    single: bool = False
    gram_rows: float = 1.0


VARIANTS = (
    Variant("single", "(a) single reward", "weighted-sum", "none", single=True),
    Variant("weighted-sum", "(b) weighted sum, K=5", "weighted-sum", "none"),
    Variant("marble-affine", "(c) MARBLE affine, K=5", "marble", "affine"),
    Variant("marble-periodic", "(c') MARBLE periodic, K=5", "marble", "periodic"),
    Variant("marble-exact", "(d) MARBLE exact, K=5", "marble", "exact"),
    Variant("marble-rows", "(e) MARBLE rows 0.25, K=5", "marble", "affine", gram_rows=0.25),
)


@dataclass
class SpeedSettings:
    """What `marble bench speed` runs (defaults: the tiny policy on the CPU, ~2 minutes)."""

    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=dict)
    rounds: int = 40                 # measured steps per variant
    warmup: int = 2                  # unmeasured rounds first (allocator, caches, OSQP set-up)
    prompts_per_step: int = 4
    images_per_prompt: int = 4
    timesteps_per_image: int = 4
    sample_steps: int = 8
    rewards: list = field(default_factory=lambda: list(K5_REWARDS))
    single_reward: str = "color"
    prompts: list = field(default_factory=lambda: list(SPEED_PROMPTS))
    gram_period: int = 10
    kl: float = TrainConfig.kl       # the trainer's default; 0 drops the anchor (and its backward pass)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.warmup < 0:
            raise MarbleError(f"speed bench: rounds must be ≥ 1 and warmup ≥ 0 "
                              f"(got {self.rounds}, {self.warmup})")
        if self.single_reward not in self.rewards:
            raise MarbleError(f"speed bench: the single reward {self.single_reward!r} must be one of "
                              f"the K rewards {self.rewards}, so both runs judge the same images")

    def config(self, variant: Variant) -> TrainConfig:
        """The TrainConfig of one variant (the same batch and prompts for all)."""
        return TrainConfig(
            policy=self.policy, policy_options=dict(self.policy_options),
            rewards=[self.single_reward] if variant.single else list(self.rewards),
            balancer=variant.balancer, gram=variant.gram, gram_period=self.gram_period, gram_rows=variant.gram_rows,
            gram_solver="affine", prompts=list(self.prompts), seed=self.seed,
            steps=self.warmup + self.rounds, prompts_per_step=self.prompts_per_step,
            images_per_prompt=self.images_per_prompt, timesteps_per_image=self.timesteps_per_image,
            sample_steps=self.sample_steps, kl=self.kl, out="-", checkpoint_every=0, sample_every=0)


def sd35_arch_settings(**overrides: Any) -> SpeedSettings:
    """Defaults for SD3.5 Medium's architecture on one GPU: a smaller batch, bf16, checkpointing."""
    settings = {"policy": "sd3.5-arch", "rounds": 10, "warmup": 2, "prompts_per_step": 2,
                    "images_per_prompt": 4, "timesteps_per_image": 2, "sample_steps": 10,
                    "policy_options": {"device": "cuda", "mixed_precision": "bf16",
                                    "gradient_checkpointing": True}}
    settings.update(overrides)
    return SpeedSettings(**settings)


def build_trainers(settings: SpeedSettings, policy: Any = None) -> dict[str, Trainer]:
    """One trainer per variant around one shared policy (built here unless given)."""
    configs = {v.name: settings.config(v) for v in VARIANTS}
    policy = policy if policy is not None else build_policy(configs["single"])
    return {name: Trainer(config, components_for(config, policy)) for name, config in configs.items()}


def round_order(names: list[str], round_index: int, seed: int = 0) -> list[str]:
    """A seeded shuffle per round: no variant always runs first, or always right after a
    memory-hungry one (a fixed rotation would keep the same neighbours every round)."""
    import random

    order = list(names)
    random.Random(seed * 1_000_003 + round_index).shuffle(order)
    return order


def time_one_step(trainer: Trainer) -> dict[str, float]:
    """One training step: its wall time, the trainer's phase timings and the peak memory."""
    import time

    device = trainer.policy.device
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    metrics = trainer.step()
    synchronize(device)
    sample = {"step": time.perf_counter() - start, "peak_memory_mb": peak_memory_mb(device),
              "gram_mode": metrics["gram_mode"], "backward_passes": float(metrics["backward_passes"])}
    for phase in PHASES[1:]:
        sample[phase] = float(metrics.get(f"time/{phase}", float("nan")))
    return sample


def measure(trainers: dict[str, Trainer], rounds: int, warmup: int,
            on_round: Callable[[int, int], None] | None = None) -> dict[str, list[dict[str, float]]]:
    """Alternating, repeated steps: per variant the list of measured step samples."""
    names = list(trainers)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        for name in round_order(names, round_index):
            sample = time_one_step(trainers[name])
            if round_index >= warmup:
                samples[name].append(sample)
        if on_round is not None:
            on_round(round_index + 1, warmup + rounds)
    return samples


def summarize(samples: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per variant: median phase times (s), mean step, peak memory and speed ratios vs single."""
    rows = []
    for variant in VARIANTS:
        runs = samples[variant.name]
        row: dict[str, Any] = {"variant": variant.name, "label": variant.label, "steps": len(runs),
                               "balancer": variant.balancer, "gram": variant.gram}
        for phase in PHASES:
            row[f"median_{phase}_s"] = median([s[phase] for s in runs])
        row["median_step_without_rewards_s"] = median([s["step"] - s["rewards"] for s in runs])
        row["mean_step_s"] = sum(s["step"] for s in runs) / len(runs)
        row["peak_memory_mb"] = max(s["peak_memory_mb"] for s in runs)
        row["solve_steps"] = sum(s["gram_mode"] in ("affine", "exact") for s in runs)
        row["mean_backward_passes"] = sum(s.get("backward_passes", float("nan")) for s in runs) / len(runs)
        rows.append(row)
    reference = samples[VARIANTS[0].name]
    for row in rows:
        # Speed relative to single reward (> 1 faster, < 1 slower; the paper's "0.97×"): the
        # median over rounds of the ratio within each round, so that load drifting between
        # rounds cancels (every variant takes one step per round).
        runs = samples[row["variant"]]
        for key in ("step", "step_without_rewards", "update", "gradient_step"):
            row[f"speed_{key}"] = median([_phase(ref, key) / _phase(run, key)
                                          for ref, run in zip(reference, runs)])
        row["speed_mean_step"] = (sum(s["step"] for s in reference) / len(reference)) / row["mean_step_s"]
    return rows


def _phase(sample: dict[str, float], key: str) -> float:
    return sample["step"] - sample["rewards"] if key == "step_without_rewards" else sample[key]


def pass_count_limit(rows: list[dict[str, Any]]) -> float:
    """The gradient step `affine` would take if its passes cost what single's and exact's do.

    A gradient step is one forward plus n backward passes (plus the small optimizer step and
    bookkeeping): t = F + n·B. Single reward (n₁) and exact (n_K) measured in the same rounds give
    B = (t_exact − t_single)/(n_K − n₁) and F = t_single − n₁·B; affine's limit is F + n_affine·B.
    """
    by_name = {row["variant"]: row for row in rows}
    single, exact, affine = by_name["single"], by_name["marble-exact"], by_name["marble-affine"]
    extra_passes = exact["mean_backward_passes"] - single["mean_backward_passes"]
    if not extra_passes > 0:
        return float("nan")
    per_pass = (exact["median_gradient_step_s"] - single["median_gradient_step_s"]) / extra_passes
    forward = single["median_gradient_step_s"] - single["mean_backward_passes"] * per_pass
    return forward + affine["mean_backward_passes"] * per_pass


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issues' targets, measured: each with its value and whether it was met."""
    by_name = {row["variant"]: row for row in rows}
    affine, exact = by_name["marble-affine"], by_name["marble-exact"]
    limit = pass_count_limit(rows)
    checks = [
        ("(c') periodic whole step ≥ 0.99× single", by_name["marble-periodic"]["speed_step"], 0.99, True),
        ("(c) affine whole step ≥ 0.85× single", affine["speed_step"], 0.85, True),
        ("(c) affine gradient step ≤ 1.10× its pass-count limit",
         affine["median_gradient_step_s"] / limit if limit > 0 else float("nan"), 1.10, False),
        ("(e) rows 0.25 every step, whole step ≥ 0.90× single", by_name["marble-rows"]["speed_step"], 0.90, True),
        ("(d) exact update ≥ 2× slower than (c)", exact["median_update_s"] / affine["median_update_s"], 2.0, True),
        ("(d) exact gradient step ≥ 2× slower than (c)",
         exact["median_gradient_step_s"] / affine["median_gradient_step_s"], 2.0, True),
    ]
    return [{"target": name, "value": value, "threshold": threshold,
             "met": bool(value >= threshold if at_least else value <= threshold)}
            for name, value, threshold, at_least in checks]


def run_speed_benchmark(settings: SpeedSettings | None = None, policy: Any = None,
                        on_round: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build the five trainers, measure them alternately, return the report (rows, targets, machine)."""
    settings = settings or SpeedSettings()
    trainers = build_trainers(settings, policy)
    shared_policy = next(iter(trainers.values())).policy
    samples = measure(trainers, settings.rounds, settings.warmup, on_round)
    rows = summarize(samples)
    return {
        "benchmark": "speed",
        "settings": asdict(settings),
        "machine": machine_description(shared_policy.device),
        "policy_fingerprint": policy_fingerprint(shared_policy),
        "rows": rows,
        "targets": check_targets(rows),
        "samples": samples,
    }


def plot_speed(report: dict[str, Any], path) -> Any:
    """Stacked median phase times per variant and the speed ratios vs single reward."""
    rows = report["rows"]
    fig, axes = new_figure(1, 2)
    labels = [row["label"] for row in rows]
    positions = range(len(rows))
    bottom = [0.0] * len(rows)
    rollout = [row["median_rollout_s"] for row in rows]
    rewards = [row["median_rewards_s"] for row in rows]
    update = [row["median_update_s"] for row in rows]
    for values, name in ((rollout, "rollout"), (rewards, "rewards"), (update, "update")):
        axes[0][0].barh(list(positions), values, left=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[0][0].set(yticks=list(positions), yticklabels=labels, xlabel="median seconds per step",
                   title="Time per training step")
    axes[0][0].invert_yaxis()
    axes[0][0].legend(fontsize=8)
    width = 0.27
    for offset, key, name in ((-width, "speed_step", "whole step"),
                              (0.0, "speed_step_without_rewards", "step − rewards"),
                              (width, "speed_update", "update alone")):
        axes[0][1].barh([p + offset for p in positions], [row[key] for row in rows], height=width, label=name)
    axes[0][1].axvline(1.0, color="black", lw=0.8)
    axes[0][1].set(yticks=list(positions), yticklabels=labels, xlabel="speed vs single reward (×)",
                   title="Speed ratio (higher is faster)")
    axes[0][1].invert_yaxis()
    axes[0][1].legend(fontsize=8)
    return save_figure(fig, path)


def ensure_device(policy_options: dict, policy: str) -> dict:
    """`sd3.5-arch` defaults to CUDA; on a machine without one say so before building 2 B weights."""
    options = dict(policy_options)
    if policy == "sd3.5-arch" and str(options.get("device", "cuda")).startswith("cuda") \
            and not torch.cuda.is_available():
        raise MarbleError("speed bench: --policy sd3.5-arch needs a CUDA GPU (none is visible); run it "
                          "on a GPU machine, or pass --device cpu with MARBLE_ALLOW_CPU_ARCH=1 to insist")
    return options
