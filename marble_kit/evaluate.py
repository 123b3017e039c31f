"""`marble eval`: a checkpoint against its base policy, same prompts, same noise.

Writes ``eval.json`` (per-reward mean ± std, deltas, deltas in base-std units) and
``eval_grid.png`` (one column per prompt: base image above the fine-tuned image) into the
output directory. Any step's checkpoint works: the checkpoint carries its run's config.

The held-out evaluation during training (``eval_every``, :class:`TrainingEvaluation`) is the
same measurement with the same defaults (prompts, images per prompt, noise seed, sampler
steps, the EMA weights when there are any): ``marble eval RUN/checkpoints/step-N`` repeats the
numbers the run logged at step N.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marble_kit.checkpoint import load_checkpoint, resolve_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.images import save_grid
from marble_kit.prompts import (
    applicability_mask,
    configured_reward,
    load_prompt_sets,
    resolve_prompt_sets,
    tagged_rewards,
)
from marble_kit.registry import build
from marble_kit.run import CONFIG_FILE, check_compatible, read_run_config
from marble_kit.trainer import RewardScoring, reward_device

EVAL_JSON = "eval.json"
EVAL_GRID = "eval_grid.png"
EVAL_DIR = "eval"
EVAL_SEED = 1234          # the held-out noise seed, during training and in `marble eval`
GRID_PROMPTS = 8
WEIGHTS = ("auto", "ema", "raw")


@dataclass
class EvalReport:
    checkpoint: str
    step: int
    rewards: list[dict[str, Any]]
    json_path: Path
    grid_path: Path

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "step": self.step, "rewards": self.rewards,
                "json": str(self.json_path), "grid": str(self.grid_path)}


def _stats(values: torch.Tensor) -> tuple[float, float, int]:
    values = values[torch.isfinite(values)].double()
    if values.numel() == 0:
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(unbiased=False)), int(values.numel())


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a reward that judged no image gets null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def eval_noise(policy, count: int, seed: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The initial latents of evaluation images ``start:stop`` of ``count``: one stream from
    ``seed``, image after image (so an image's noise does not depend on how the prompts are
    batched or split across ranks), drawn in blocks of 16 images and kept only for the slice."""
    stop = count if stop is None else stop
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for first in range(0, stop, 16):
        block = torch.randn(policy.latent_shape(min(16, count - first)), generator=generator)
        kept.append(block[max(start - first, 0):stop - first])
    return torch.cat(kept) if kept else torch.zeros(policy.latent_shape(0))


def score_images(policy, score: Callable[[torch.Tensor, list[str]], torch.Tensor], prompts: Sequence[str],
                 mask: torch.Tensor, noise: torch.Tensor, steps: int, batch_size: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [K, N] (NaN where not applicable) and images of the policy's current weights,
    one image per prompt from the given initial latents. ``score(images, prompts)`` gives [K, B]:
    the run's :class:`~marble_kit.trainer.RewardScoring` (:func:`run_scoring`), so rewards
    score here exactly as in training (threads, offload, a RewardFailure naming the reward)."""
    generator = torch.Generator().manual_seed(0)  # unused by deterministic samplers: noise is given
    scores, images = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        with torch.no_grad():
            rollout = policy.sample(chunk, generator=generator, steps=steps, use_old=False,
                                    noise=noise[start:start + len(chunk)])
        images.append(rollout.images)
        scores.append(score(rollout.images, chunk))
    if not scores:
        return torch.zeros(mask.shape[0], 0), torch.zeros(0)
    values = torch.cat(scores, dim=1)
    return torch.where(mask, values, torch.full_like(values, float("nan"))), torch.cat(images)


def score_policy(policy, score: Callable[[torch.Tensor, list[str]], torch.Tensor], prompts: Sequence[str],
                 mask: torch.Tensor, seed: int, steps: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [K, N] (NaN where not applicable) and images of the policy's current weights."""
    return score_images(policy, score, prompts, mask, eval_noise(policy, len(prompts), seed), steps,
                        batch_size)


def run_scoring(scoring: RewardScoring, names: Sequence[str], rewards: Sequence[Any]
                ) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """``score(images, prompts)`` of :func:`score_images`: these rewards through a run's scoring."""
    return functools.partial(scoring, list(names), list(rewards))


def paired_standard_error(base: torch.Tensor, tuned: torch.Tensor) -> float:
    """Standard error of mean(tuned − base) over the images both scored (same prompt and noise,
    so the pairs share everything but the weights); NaN with fewer than two pairs."""
    paired = torch.isfinite(base) & torch.isfinite(tuned)
    if int(paired.sum()) < 2:
        return float("nan")
    differences = (tuned[paired] - base[paired]).double()
    return float(differences.std(unbiased=True) / math.sqrt(differences.numel()))


def reward_rows(names: Sequence[str], base: torch.Tensor, tuned: torch.Tensor) -> list[dict[str, Any]]:
    """One row per reward over the images both evaluations scored (a NaN in either — not
    judged, or a batch lost with ``on_error = "nan"`` — drops the pair): base / fine-tuned
    mean ± std, the delta, its paired standard error and the delta in base-std units; ``n``
    counts those pairs, ``n_base`` / ``n_tuned`` what each evaluation scored."""
    rows = []
    for k, name in enumerate(names):
        paired = torch.isfinite(base[k]) & torch.isfinite(tuned[k])
        base_mean, base_std, count = _stats(base[k][paired])
        tuned_mean, tuned_std, _ = _stats(tuned[k][paired])
        delta = tuned_mean - base_mean
        rows.append({"reward": name, "n": count, "n_base": int(torch.isfinite(base[k]).sum()),
                     "n_tuned": int(torch.isfinite(tuned[k]).sum()), "base_mean": base_mean, "base_std": base_std,
                     "tuned_mean": tuned_mean, "tuned_std": tuned_std, "delta": delta,
                     "delta_se": paired_standard_error(base[k], tuned[k]),
                     "delta_in_base_std": delta / base_std if base_std > 0 else float("nan")})
    return rows


def unscored(rows: Sequence[dict[str, Any]], trained: Sequence[str]) -> list[str]:
    """The trained rewards with no image both evaluations scored (or not evaluated at all)."""
    counts = {row["reward"]: row["n"] for row in rows}
    return [name for name in trained if not counts.get(name)]


def composite_score(rows: Sequence[dict[str, Any]], trained: Sequence[str]) -> float:
    """The best-checkpoint score: the mean Δ / base std over the trained rewards (eval-only
    rewards are tracked, not optimized for); one whose base scores do not vary (std 0) is
    left out. NaN — no composite, no best checkpoint — when a trained reward scored no image
    pair (:func:`unscored`) or none has a Δ / base std: a mean over the others would rank
    checkpoints by a different measure."""
    if unscored(rows, trained):
        return float("nan")
    values = [row["delta_in_base_std"] for row in rows if row["reward"] in trained
              and isinstance(row["delta_in_base_std"], float) and math.isfinite(row["delta_in_base_std"])]
    return sum(values) / len(values) if values else float("nan")


def checkpoint_config(checkpoint: Path, meta: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with; when it sits in a run directory, the two must agree."""
    run_dir = checkpoint.parent.parent
    run_config = read_run_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
    saved = meta.get("config")
    if run_config is not None:
        check_compatible(meta, run_config, f"checkpoint {checkpoint}")
        return run_config
    if not isinstance(saved, dict):
        raise MarbleError(f"checkpoint {checkpoint} records no config and sits in no run directory; "
                          "evaluate it inside its run directory")
    return TrainConfig.from_dict(saved, source=f"{checkpoint}/meta.json")


def select_prompts(prompt_sets, max_prompts: int) -> list[tuple[str, int]]:
    """(prompt, set index) pairs, round-robin over the sets so the cap keeps every set represented
    (``max_prompts`` 0: every prompt)."""
    by_set = [[(p, i) for p in s.prompts] for i, s in enumerate(prompt_sets)]
    pairs = [pair for group in itertools.zip_longest(*by_set) for pair in group if pair]
    return pairs[:max_prompts] if max_prompts else pairs


@dataclass
class EvalPlan:
    """What one evaluation samples and scores: images (prompt, set) and the reward mask."""

    names: list[str]
    pairs: list[tuple[str, int]]
    prompts: list[str]          # one per image: each prompt images_per_prompt times
    mask: torch.Tensor          # [K, N]: reward k judges image n
    images_per_prompt: int
    seed: int
    steps: int

    @classmethod
    def build(cls, prompt_sets, names: Sequence[str], images_per_prompt: int, max_prompts: int,
              seed: int, steps: int) -> EvalPlan:
        for prompt_set in prompt_sets:
            unknown = [name for name in prompt_set.rewards or [] if not configured_reward(name, names)]
            if unknown:
                raise MarbleError(f"eval prompt set {prompt_set.name!r} is tagged with reward {unknown[0]!r}, "
                                  f"which is not evaluated ({','.join(names)}); add it to eval_rewards or "
                                  "change the tags")
        pairs = select_prompts(prompt_sets, max_prompts)
        prompts = [p for p, _ in pairs for _ in range(images_per_prompt)]
        set_ids = torch.tensor([i for _, i in pairs for _ in range(images_per_prompt)], dtype=torch.long)
        return cls(list(names), pairs, prompts, applicability_mask(set_ids, names, prompt_sets),
                   images_per_prompt, seed, steps)

    @property
    def grid_picks(self) -> list[int]:
        """The images of the grid: the first image of each of the first GRID_PROMPTS prompts."""
        return [i * self.images_per_prompt for i in range(min(GRID_PROMPTS, len(self.pairs)))]


def save_eval_report(out_dir: Path, plan: EvalPlan, rows: list[dict[str, Any]], base_grid: torch.Tensor,
                     tuned_grid: torch.Tensor, extra: dict[str, Any]) -> EvalReport:
    """eval.json and eval_grid.png (base row above the evaluated row), both written atomically."""
    picks = plan.grid_picks
    captions = [f"base: {plan.prompts[i]}" for i in picks] + [f"step {extra['step']}" for _ in picks]
    grid_path = save_grid(torch.cat([base_grid, tuned_grid]), out_dir / EVAL_GRID, captions=captions,
                          ncol=max(1, len(picks)))
    json_path = out_dir / EVAL_JSON
    report = EvalReport(str(extra.pop("checkpoint")), int(extra["step"]), rows, json_path, grid_path)
    document = {**report.as_dict(), **extra, "prompts": [p for p, _ in plan.pairs],
                "images_per_prompt": plan.images_per_prompt, "seed": plan.seed, "sample_steps": plan.steps}
    document["rewards"] = [{k: _finite_or_none(v) for k, v in row.items()} for row in rows]
    document = {k: _finite_or_none(v) for k, v in document.items()}
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False))
    tmp.replace(json_path)
    return report


def apply_ema_weights(policy, state: dict[str, Any], where: str) -> None:
    """Copy a checkpoint's weight EMA into the policy's trainable weights."""
    shadow = state["ema"]["shadow"]
    params = list(policy.trainable_parameters())
    if len(shadow) != len(params) or any(tuple(s.shape) != tuple(p.shape) for s, p in zip(shadow, params)):
        raise MarbleError(f"{where}: its weight EMA does not match the policy's trainable weights")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            p.copy_(s)


def evaluate(target: str | Path, prompts: list[str] | None = None, rewards: list[str] | None = None,
             reward_options: dict | None = None, images_per_prompt: int | None = None,
             max_prompts: int | None = None, seed: int = EVAL_SEED, out: str | Path | None = None,
             sample_steps: int | None = None, weights: str = "auto") -> EvalReport:
    """Score checkpoint (or a run's latest checkpoint) ``target`` and the base policy.

    Defaults come from the run's config, as its evaluation during training uses them: the
    eval prompts, its rewards and eval-only rewards, ``eval_images_per_prompt``,
    ``eval_max_prompts`` and ``eval_sample_steps`` (else ``sample_steps``); ``weights`` "auto"
    evaluates the weight EMA when the run kept one ("ema"), else the trained weights ("raw").
    Every check (checkpoint, prompts, rewards) runs before the first write.
    """
    checkpoint = resolve_checkpoint(target)
    meta, state = load_checkpoint(checkpoint)
    config = checkpoint_config(checkpoint, meta)
    images_per_prompt = config.eval_images_per_prompt if images_per_prompt is None else images_per_prompt
    max_prompts = config.eval_max_prompts if max_prompts is None else max_prompts
    steps = sample_steps or eval_sample_steps(config)
    if images_per_prompt < 1 or max_prompts < 0 or steps < 1:
        raise MarbleError(f"eval: --images-per-prompt ({images_per_prompt}) and --sample-steps ({steps}) "
                          f"must be ≥ 1, --max-prompts ({max_prompts}) ≥ 0 (0 = all)")
    if weights not in WEIGHTS:
        raise MarbleError(f"eval: --weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "ema" and "ema" not in state:
        raise MarbleError(f"eval: checkpoint {checkpoint} holds no weight EMA (its run had ema_decay = 0); "
                          "use --weights raw")
    use_ema = weights == "ema" or (weights == "auto" and "ema" in state)

    prompt_sets = load_prompt_sets(prompts) if prompts else eval_prompt_sets(config)
    reward_names = rewards or [*config.rewards, *config.eval_rewards]
    options = {**config.reward_options, **(reward_options or {})}
    reward_models = [build("reward", name, options.get(name, {})) for name in reward_names]
    plan = EvalPlan.build(prompt_sets, reward_names, images_per_prompt, max_prompts, seed, steps)

    policy = build("policy", config.policy, {"seed": config.seed, **config.policy_options})
    device = reward_device(config, policy)
    for reward in reward_models:
        reward.to(device)
    score = run_scoring(RewardScoring(config, policy.device), reward_names, reward_models)  # as in training
    noise = eval_noise(policy, len(plan.prompts), seed)
    base_scores, base_images = score_images(policy, score, plan.prompts, plan.mask, noise, steps)
    policy.load_state_dict(state["policy"])
    if use_ema:
        apply_ema_weights(policy, state, f"checkpoint {checkpoint}")
    tuned_scores, tuned_images = score_images(policy, score, plan.prompts, plan.mask, noise, steps)
    rows = reward_rows(reward_names, base_scores, tuned_scores)

    out_dir = Path(out) if out else checkpoint.parent.parent / EVAL_DIR / checkpoint.name
    picks = plan.grid_picks
    return save_eval_report(out_dir, plan, rows, base_images[picks], tuned_images[picks], {
        "checkpoint": checkpoint, "step": int(meta["step"]), "policy": config.policy,
        "weights": "ema" if use_ema else "raw", "composite": composite_score(rows, config.rewards),
        "unscored": unscored(rows, config.rewards)})


def eval_sample_steps(config: TrainConfig) -> int:
    return config.eval_sample_steps or config.sample_steps


def eval_prompt_sets(config: TrainConfig) -> list:
    """The run's held-out prompts: ``eval_prompts``; else world_eval for a world-reward run on
    `default`; else the run's own sets."""
    names = [*config.rewards, *config.eval_rewards]
    if config.eval_prompts:
        return resolve_prompt_sets(config.eval_prompts, names)
    world_rewards = tagged_rewards(load_prompt_sets(["default"]))
    if list(config.prompts) == ["default"] and any(configured_reward(name, config.rewards) for name in world_rewards):
        return load_prompt_sets(["world_eval"])
    return resolve_prompt_sets(config.prompts, names)


class TrainingEvaluation:
    """The held-out evaluation during training (``eval_every``; SPEC-free, the release's eval_fn).

    At step 0 and every ``eval_every`` steps (and the last) the weights evaluation uses (the
    weight EMA when ``ema_decay`` > 0) sample the held-out plan — the same prompts, noise and
    sampler steps each time — and every trained and eval-only reward scores them. Step 0 is the
    base: each reward's Δ / base std is measured against it (paired, image by image), and the
    composite (mean Δ / base std over the trained rewards) picks the ``best`` checkpoint.
    Every rank samples its share of the images; the scores are gathered, so every rank takes
    the same decision. Training's RNG is never touched. The base scores, its grid and the best
    score so far are checkpointed (:meth:`state_dict`), so a resumed run continues the record.
    """

    def __init__(self, config: TrainConfig, rewards: Sequence[Any], names: Sequence[str], prompt_sets,
                 dist: Any):
        self.config, self.rewards, self.names, self.dist = config, list(rewards), list(names), dist
        self.plan = EvalPlan.build(prompt_sets, names, config.eval_images_per_prompt,
                                   config.eval_max_prompts, EVAL_SEED, eval_sample_steps(config))
        if not self.plan.prompts:
            raise MarbleError("eval_prompts hold no prompt; pass prompt sets with prompts")
        judged = self.plan.mask.any(dim=1)
        blind = [name for k, name in enumerate(self.names) if name in config.rewards and not judged[k]]
        if blind:  # the composite needs every trained reward: it would never exist, nor a best checkpoint
            raise MarbleError(
                f"eval_prompts: trained reward {blind[0]!r} judges none of the {len(self.plan.pairs)} held-out "
                f"prompts, so the evaluation could never score the run; add a held-out set it judges (tagged "
                f"{blind[0]}, or untagged) or raise eval_max_prompts (now {config.eval_max_prompts})")
        self.base: torch.Tensor | None = None       # [K, N] scores of step 0
        self.base_grid: torch.Tensor | None = None  # uint8 [G, 3, H, W]: the grid's base row
        self.best_step: int | None = None
        self.best_score = float("-inf")
        self.last_step: int | None = None           # the step of the last evaluation that completed

    def due(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(every) and (step % every == 0 or step == self.config.steps)

    def _sample_share(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank: its contiguous share of the images; gathered scores [K, N] and grid images."""
        plan, policy = self.plan, trainer.policy
        count, world, rank = len(plan.prompts), self.dist.world_size, self.dist.rank
        lo, hi = rank * count // world, (rank + 1) * count // world
        noise = eval_noise(policy, count, plan.seed, lo, hi)
        with trainer.eval_weights():
            scores, images = score_images(policy, run_scoring(trainer.scoring, self.names, self.rewards),
                                          plan.prompts[lo:hi], plan.mask[:, lo:hi], noise, plan.steps)
        picks = [i - lo for i in plan.grid_picks if lo <= i < hi]
        shares = self.dist.gather_objects((scores.cpu(), images[picks].cpu() if picks else None))
        scores = torch.cat([s for s, _ in shares], dim=1)
        grid = torch.cat([g for _, g in shares if g is not None])
        return scores, grid

    def run(self, trainer, step: int, run_dir: Path) -> tuple[dict[str, float], bool]:
        """Evaluate now (every rank); returns the eval metrics and whether this is the new best.
        Rank 0 writes RUN/eval/step-N/eval.json and eval_grid.png."""
        from marble_kit.checkpoint import checkpoint_name
        from marble_kit.images import to_uint8

        scores, grid = self._sample_share(trainer)
        if self.base is None:
            self.base = scores.clone()
            self.base_grid = torch.from_numpy(to_uint8(grid)).permute(0, 3, 1, 2).contiguous()
        rows = reward_rows(self.names, self.base, scores)
        composite = composite_score(rows, self.config.rewards)
        best = math.isfinite(composite) and composite > self.best_score
        if best:
            self.best_step, self.best_score = step, composite
        self.last_step = step
        self._unscored = unscored(rows, self.config.rewards)
        metrics: dict[str, float] = {"eval/composite": composite}
        for row in rows:
            metrics[f"eval/{row['reward']}"] = row["tuned_mean"]
            metrics[f"eval_delta/{row['reward']}"] = row["delta_in_base_std"]
        if self.dist.is_main:
            save_eval_report(Path(run_dir) / EVAL_DIR / checkpoint_name(step), self.plan, rows,
                             self.base_grid.float() / 255.0, grid, {
                                 "checkpoint": f"{run_dir} (training, step {step})", "step": step,
                                 "policy": self.config.policy, "during_training": True,
                                 "weights": "ema" if self.config.ema_decay > 0 else "raw",
                                 "composite": composite, "unscored": self._unscored,
                                 "best_step": self.best_step})
        return metrics, best

    def summary(self, metrics: dict[str, float], step: int, best: bool) -> str:
        parts = [f"{name} {metrics[f'eval_delta/{name}']:+.2f}" for name in self.names
                 if math.isfinite(metrics.get(f"eval_delta/{name}", float("nan")))]
        note = " (best)" if best else ""
        composite = metrics["eval/composite"]
        if math.isfinite(composite):
            shown = f"{composite:+.3f}"
        elif getattr(self, "_unscored", None):
            shown = f"– ({', '.join(self._unscored)} scored no image: no best checkpoint)"
        else:
            shown = "–"
        return f"eval step {step:>5} · composite {shown}{note} · Δ/std " + " ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "base_grid": self.base_grid,
                "best_step": torch.tensor(-1 if self.best_step is None else self.best_step),
                "best_score": torch.tensor(self.best_score, dtype=torch.float64),
                "last_step": torch.tensor(-1 if self.last_step is None else self.last_step)}

    def pending(self, step: int) -> bool:
        """Whether the evaluation of ``step`` (a resumed run's first) is due but did not complete:
        a reward failed in it, after the step's checkpoint was written. (A checkpoint made before
        ``last_step`` was recorded counts as evaluated.)"""
        return step > 0 and self.due(step) and self.last_step is not None and self.last_step != step

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state or state.get("base") is None:
            raise MarbleError("the checkpoint holds no held-out evaluation record, but eval_every > 0; "
                              "resume with the run's own config")
        if tuple(state["base"].shape) != (len(self.names), len(self.plan.prompts)):
            raise MarbleError(f"the checkpoint's evaluation scored {tuple(state['base'].shape)} (rewards × "
                              f"images), this run's plan is {(len(self.names), len(self.plan.prompts))}; "
                              "resume with the same eval prompts")
        self.base, self.base_grid = state["base"].clone(), state["base_grid"].clone()
        best_step = int(state["best_step"])
        self.best_step = None if best_step < 0 else best_step
        self.best_score = float(state["best_score"])
        last_step = int(state["last_step"]) if "last_step" in state else None
        self.last_step = None if last_step is None or last_step < 0 else last_step
