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

Two more variants can be asked for by name (``--variants``): ``marble-affine-stacked`` and
``marble-rows-stacked``, (c) and (e) with ``gram_backward = "stacked"`` (the Gram's cotangent
passes as one backward over the rows repeated 2-3 times).

All variants see the same prompts and noise (same seed, same sampler), so their rollouts do
the same work. Per step the trainer's own clocks split the time into rollout, rewards and update
(everything after the rewards) and, inside the update, the gradient step (per-reward
gradients, Gram, balancer, fused gradient, optimizer step); on a GPU they are CUDA events, on
the CPU the wall clock. Speed ratios are single-reward time / variant time within each round,
median over rounds (1.0 = as fast as one reward; the paper reports 0.97× for MARBLE), each with
a 95 % bootstrap interval over the rounds (:func:`bootstrap_interval`). "step − rollout" leaves
out the rollout, identical work in every variant whose time still varies between them.

Rounds: at least ``min_rounds``, then until the interval of the periodic variant's whole-step
ratio is within ± ``target_halfwidth`` (default 1 %), at most ``rounds`` (and ``max_seconds``);
without the periodic variant, ``min_rounds`` (``target_halfwidth`` 0: always ``rounds``). A Ctrl-C
keeps the rounds finished before it (``stopping.reason`` "interrupted").
"""

from __future__ import annotations

import math
import random
import statistics
import time
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
RATIOS = ("step", "step_without_rewards", "step_without_rollout", "update", "gradient_step")
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    balancer: str
    gram: str
    single: bool = False
    gram_rows: float = 1.0
    gram_backward: str = "separate"


VARIANTS = (
    Variant("single", "(a) single reward", "weighted-sum", "none", single=True),
    Variant("weighted-sum", "(b) weighted sum, K=5", "weighted-sum", "none"),
    Variant("marble-affine", "(c) MARBLE affine, K=5", "marble", "affine"),
    Variant("marble-periodic", "(c') MARBLE periodic, K=5", "marble", "periodic"),
    Variant("marble-exact", "(d) MARBLE exact, K=5", "marble", "exact"),
    Variant("marble-rows", "(e) MARBLE rows 0.25, K=5", "marble", "affine", gram_rows=0.25),
    Variant("marble-affine-stacked", "(c+) affine, stacked passes", "marble", "affine",
            gram_backward="stacked"),
    Variant("marble-rows-stacked", "(e+) rows 0.25, stacked passes", "marble", "affine", gram_rows=0.25,
            gram_backward="stacked"),
)
DEFAULT_VARIANTS = [v.name for v in VARIANTS[:6]]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class SpeedSettings:
    """What `marble bench speed` runs (defaults: the tiny policy on the CPU, ~2 minutes)."""

    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=dict)
    rounds: int = 60                 # at most this many measured steps per variant
    warmup: int = 2                  # unmeasured rounds first (allocator, caches, OSQP set-up)
    min_rounds: int = 20             # at least this many, then stop once the target interval is reached
    target_halfwidth: float = 0.01   # periodic whole-step ratio: 95 % interval within ± this (0 = off)
    max_seconds: float = 0.0         # stop adding rounds after this long (0 = no limit)
    variants: list = field(default_factory=lambda: list(DEFAULT_VARIANTS))
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
        unknown = [name for name in self.variants if name not in VARIANT_BY_NAME]
        if unknown or "single" not in self.variants:
            raise MarbleError(f"speed bench: variants must include single and come from "
                              f"{', '.join(VARIANT_BY_NAME)}; got {unknown[0] if unknown else 'no single'!r}")
        if self.min_rounds < 1 or self.target_halfwidth < 0 or self.max_seconds < 0:
            raise MarbleError(f"speed bench: min_rounds must be ≥ 1, target_halfwidth and max_seconds ≥ 0 "
                              f"(got {self.min_rounds}, {self.target_halfwidth}, {self.max_seconds})")

    def config(self, variant: Variant) -> TrainConfig:
        """The TrainConfig of one variant (the same batch and prompts for all)."""
        return TrainConfig(
            policy=self.policy, policy_options=dict(self.policy_options),
            rewards=[self.single_reward] if variant.single else list(self.rewards),
            balancer=variant.balancer, gram=variant.gram, gram_period=self.gram_period, gram_rows=variant.gram_rows,
            gram_backward=variant.gram_backward,
            gram_solver="affine", prompts=list(self.prompts), seed=self.seed,
            steps=self.warmup + self.rounds, prompts_per_step=self.prompts_per_step,
            images_per_prompt=self.images_per_prompt, timesteps_per_image=self.timesteps_per_image,
            sample_steps=self.sample_steps, kl=self.kl, out="-", checkpoint_every=0, sample_every=0)


# Real models' architectures with random weights: timed on a GPU, with the settings below.
GPU_ARCH_POLICIES = ("sd3.5-arch", "flux-arch")


def sd35_arch_settings(**overrides: Any) -> SpeedSettings:
    """Defaults for SD3.5 Medium's architecture on one GPU: a smaller batch, bf16, checkpointing
    (also those of the other GPU architectures, e.g. ``policy="flux-arch"``)."""
    settings = {"policy": "sd3.5-arch", "rounds": 80, "min_rounds": 10, "warmup": 2, "prompts_per_step": 2,
                    "images_per_prompt": 4, "timesteps_per_image": 2, "sample_steps": 10,
                    "policy_options": {"device": "cuda", "mixed_precision": "bf16",
                                    "gradient_checkpointing": True}}
    settings.update(overrides)
    return SpeedSettings(**settings)


def build_trainers(settings: SpeedSettings, policy: Any = None,
                   names: list[str] | None = None) -> dict[str, Trainer]:
    """One trainer per variant (``names``: these only) around one shared policy (built here
    unless given)."""
    names = settings.variants if names is None else names
    configs = {v.name: settings.config(v) for v in VARIANTS if v.name in names}
    policy = policy if policy is not None else build_policy(next(iter(configs.values())))
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
            on_round: Callable[[int, int], None] | None = None,
            stop: Callable[[dict[str, list[dict[str, float]]]], bool] | None = None,
            max_seconds: float = 0.0) -> tuple[dict[str, list[dict[str, float]]], str]:
    """Alternating, repeated steps: per variant the list of measured step samples, and why the
    measurement ended: ``"stop"`` (after a measured round ``stop(samples)`` said so), ``"time
    limit"`` (``max_seconds``), ``"max rounds"`` or ``"interrupted"`` (a Ctrl-C: the rounds
    finished before it are kept, the one it cut is dropped so that every variant has the same
    rounds; a Ctrl-C before the first measured round is re-raised)."""
    names = list(trainers)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    started = time.perf_counter()
    try:
        for round_index in range(warmup + rounds):
            this_round = {name: time_one_step(trainers[name]) for name in round_order(names, round_index)}
            if round_index >= warmup:
                for name, sample in this_round.items():
                    samples[name].append(sample)
            if on_round is not None:
                on_round(round_index + 1, warmup + rounds)
            if round_index >= warmup:
                if stop is not None and stop(samples):
                    return samples, "stop"
                if max_seconds > 0 and time.perf_counter() - started >= max_seconds:
                    return samples, "time limit"
    except KeyboardInterrupt:
        if not samples[names[0]]:
            raise
        return samples, "interrupted"
    return samples, "max rounds"


def bootstrap_interval(values: list, statistic: Callable[[list], float] = statistics.median,
                       resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (one per round, floats or
    tuples; rounds drawn with replacement, seeded): (lower, upper); (nan, nan) for fewer than
    two finite values."""
    finite = [v for v in values if all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,)))]
    if len(finite) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    draws = sorted(statistic(rng.choices(finite, k=len(finite))) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return draws[int(tail * (resamples - 1))], draws[math.ceil((1.0 - tail) * (resamples - 1))]


def _ratio_of_sums(pairs: list[tuple[float, float]]) -> float:
    return sum(p[0] for p in pairs) / sum(p[1] for p in pairs)


def round_ratios(reference: list[dict[str, float]], runs: list[dict[str, float]], key: str) -> list[float]:
    """Per round: the single-reward time / this variant's time (> 1: faster)."""
    return [_phase(ref, key) / _phase(run, key) for ref, run in zip(reference, runs)]


def summarize(samples: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per variant: median phase times (s), mean step, peak memory and speed ratios vs single,
    each ratio with its 95 % bootstrap interval over the rounds (``ci_…``: [lower, upper])."""
    rows = []
    for variant in VARIANTS:
        if variant.name not in samples:
            continue
        runs = samples[variant.name]
        row: dict[str, Any] = {"variant": variant.name, "label": variant.label, "steps": len(runs),
                               "balancer": variant.balancer, "gram": variant.gram,
                               "gram_backward": variant.gram_backward}
        for phase in PHASES:
            row[f"median_{phase}_s"] = median([s[phase] for s in runs])
        row["median_step_without_rewards_s"] = median([_phase(s, "step_without_rewards") for s in runs])
        row["median_step_without_rollout_s"] = median([_phase(s, "step_without_rollout") for s in runs])
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
        for key in RATIOS:
            ratios = round_ratios(reference, runs, key)
            row[f"speed_{key}"] = median(ratios)
            row[f"ci_speed_{key}"] = list(bootstrap_interval(ratios))
        row["speed_mean_step"] = (sum(s["step"] for s in reference) / len(reference)) / row["mean_step_s"]
        pairs = [(ref["step"], run["step"]) for ref, run in zip(reference, runs)]
        row["ci_speed_mean_step"] = list(bootstrap_interval(pairs, _ratio_of_sums))
    return rows


def periodic_halfwidth(samples: dict[str, list[dict[str, float]]]) -> float:
    """Half the width of the periodic variant's whole-step ratio interval (inf before 2 rounds;
    NaN without the periodic variant: no interval to track)."""
    if "marble-periodic" not in samples:
        return float("nan")
    lower, upper = bootstrap_interval(round_ratios(samples["single"], samples["marble-periodic"], "step"),
                                      resamples=500)
    return (upper - lower) / 2.0 if math.isfinite(lower) else float("inf")


def _phase(sample: dict[str, float], key: str) -> float:
    if key == "step_without_rewards":
        return sample["step"] - sample["rewards"]
    if key == "step_without_rollout":
        return sample["step"] - sample["rollout"]
    return sample[key]


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


def check_targets(rows: list[dict[str, Any]], samples: dict[str, list[dict[str, float]]] | None = None
                  ) -> list[dict[str, Any]]:
    """The issues' targets, measured: each with its value, its 95 % bootstrap interval over the
    rounds where it is a ratio measured per round ([lower, upper], else None), whether it was
    met (by the value) and whether the interval decides it (lies wholly on one side). A target
    is checked when the variants it compares were measured (a subset checks fewer)."""
    by_name = {row["variant"]: row for row in rows}
    have = set(by_name).__contains__
    checks = []
    if have("marble-periodic"):
        periodic = by_name["marble-periodic"]
        checks += [("(c') periodic whole step ≥ 0.99× single", periodic["speed_step"],
                    periodic.get("ci_speed_step"), 0.99, True),
                   ("(c') periodic step − rollout ≥ 0.99× single", periodic["speed_step_without_rollout"],
                    periodic.get("ci_speed_step_without_rollout"), 0.99, True)]
    if have("marble-affine"):
        affine = by_name["marble-affine"]
        checks.append(("(c) affine whole step ≥ 0.80× single", affine["speed_step"], affine.get("ci_speed_step"),
                       0.80, True))
        if have("marble-exact"):
            limit = pass_count_limit(rows)
            checks.append(("(c) affine gradient step ≤ 1.10× its pass-count limit",
                           affine["median_gradient_step_s"] / limit if limit > 0 else float("nan"), None, 1.10,
                           False))
    if have("marble-rows"):
        sampled = by_name["marble-rows"]
        checks.append(("(e) rows 0.25 every step, whole step ≥ 0.90× single", sampled["speed_step"],
                       sampled.get("ci_speed_step"), 0.90, True))
        if have("marble-affine"):
            rows_vs_affine, rows_vs_affine_ci = float("nan"), None
            if samples is not None:
                per_round = [r["gradient_step"] / a["gradient_step"]
                             for r, a in zip(samples["marble-rows"], samples["marble-affine"])]
                rows_vs_affine, rows_vs_affine_ci = median(per_round), list(bootstrap_interval(per_round))
            elif affine["median_gradient_step_s"] > 0:
                rows_vs_affine = sampled["median_gradient_step_s"] / affine["median_gradient_step_s"]
            checks.append(("(e) rows 0.25 gradient step ≤ 0.6× affine's (1 + 2·0.25 passes)", rows_vs_affine,
                           rows_vs_affine_ci, 0.60, False))
    if have("marble-exact") and have("marble-affine"):
        exact = by_name["marble-exact"]
        checks += [("(d) exact update ≥ 2× slower than (c)", exact["median_update_s"] / affine["median_update_s"],
                    None, 2.0, True),
                   ("(d) exact gradient step ≥ 2× slower than (c)",
                    exact["median_gradient_step_s"] / affine["median_gradient_step_s"], None, 2.0, True)]
    out = []
    for name, value, interval, threshold, at_least in checks:
        met = bool(value >= threshold if at_least else value <= threshold)
        decided = None
        if interval is not None and all(math.isfinite(v) for v in interval):
            lower, upper = interval
            decided = bool(lower >= threshold or upper < threshold) if at_least else \
                bool(upper <= threshold or lower > threshold)
        out.append({"target": name, "value": value, "interval": interval, "threshold": threshold,
                    "met": met, "decided": decided})
    return out


def run_speed_benchmark(settings: SpeedSettings | None = None, policy: Any = None,
                        on_round: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build the trainers, measure them alternately until the rounds suffice, return the report
    (rows with intervals, targets, how the measurement stopped, machine, every sample)."""
    settings = settings or SpeedSettings()
    trainers = build_trainers(settings, policy)
    shared_policy = next(iter(trainers.values())).policy
    minimum = min(settings.min_rounds, settings.rounds)
    # The adaptive rule tracks periodic's whole-step interval; without that variant there is no
    # interval to track, and the minimum number of rounds is what the measurement gets.
    tracked = "marble-periodic" in trainers

    def enough(samples: dict[str, list[dict[str, float]]]) -> bool:
        return (settings.target_halfwidth > 0 and len(samples["single"]) >= minimum
                and (not tracked or periodic_halfwidth(samples) <= settings.target_halfwidth))

    started = time.perf_counter()
    samples, ended = measure(trainers, settings.rounds, settings.warmup, on_round, stop=enough,
                             max_seconds=settings.max_seconds)
    rounds = len(samples["single"])
    halfwidth = periodic_halfwidth(samples) if tracked else None
    reason = ended if ended != "stop" else "interval" if tracked else "min rounds (no marble-periodic variant)"
    rows = summarize(samples)
    return {
        "benchmark": "speed",
        "settings": asdict(settings),
        "machine": machine_description(shared_policy.device),
        "clock": "CUDA events per phase" if shared_policy.device.type == "cuda" else "wall clock (perf_counter)",
        "policy_fingerprint": policy_fingerprint(shared_policy),
        "stopping": {"rounds": rounds, "reason": reason, "periodic_halfwidth": halfwidth,
                     "seconds": time.perf_counter() - started},
        "rows": rows,
        "targets": check_targets(rows, samples),
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
                              (0.0, "speed_step_without_rollout", "step − rollout"),
                              (width, "speed_gradient_step", "gradient step")):
        values = [row[key] for row in rows]
        errors = [[max(v - (row.get(f"ci_{key}") or [v, v])[0], 0.0) for v, row in zip(values, rows)],
                  [max((row.get(f"ci_{key}") or [v, v])[1] - v, 0.0) for v, row in zip(values, rows)]]
        errors = [[e if math.isfinite(e) else 0.0 for e in side] for side in errors]
        axes[0][1].barh([p + offset for p in positions], values, height=width, label=name, xerr=errors,
                        error_kw={"elinewidth": 0.8, "capsize": 2})
    axes[0][1].axvline(1.0, color="black", lw=0.8)
    axes[0][1].set(yticks=list(positions), yticklabels=labels, xlabel="speed vs single reward (×)",
                   title="Speed ratio (higher is faster)")
    axes[0][1].invert_yaxis()
    axes[0][1].legend(fontsize=8)
    return save_figure(fig, path)


def ensure_device(policy_options: dict, policy: str, bench: str = "speed") -> dict:
    """The GPU architectures default to CUDA; on a machine without one say so (as `marble bench
    BENCH`) before building billions of weights."""
    options = dict(policy_options)
    if policy in GPU_ARCH_POLICIES and str(options.get("device", "cuda")).startswith("cuda") \
            and not torch.cuda.is_available():
        raise MarbleError(f"marble bench {bench}: --policy {policy} needs a CUDA GPU (none is visible); run it "
                          "on a GPU machine, or pass --device cpu with MARBLE_ALLOW_CPU_ARCH=1 to insist")
    return options
