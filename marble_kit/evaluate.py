"""`marble eval`: a checkpoint against its base policy, same prompts, same noise.

Writes ``eval.json`` (per-reward mean ± std, deltas, deltas in base-std units) and
``eval_grid.png`` (one column per prompt: base image above the fine-tuned image) into the
output directory. Any step's checkpoint works: the checkpoint carries its run's config.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marble_kit.checkpoint import load_checkpoint, resolve_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.images import save_grid
from marble_kit.prompts import applicability_mask, load_prompt_sets, resolve_prompt_sets, tagged_rewards
from marble_kit.registry import build
from marble_kit.run import CONFIG_FILE, check_compatible, read_run_config

EVAL_JSON = "eval.json"
EVAL_GRID = "eval_grid.png"


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


def score_policy(policy, rewards: Sequence[Any], prompts: Sequence[str], mask: torch.Tensor, seed: int,
                 steps: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [K, N] (NaN where not applicable) and images of the policy's current weights."""
    generator = torch.Generator().manual_seed(seed)
    scores, images = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        with torch.no_grad():
            rollout = policy.sample(chunk, generator=generator, steps=steps, use_old=False)
        images.append(rollout.images)
        scores.append(torch.stack([reward(rollout.images, chunk).float() for reward in rewards]))
    values = torch.cat(scores, dim=1)
    return torch.where(mask, values, torch.full_like(values, float("nan"))), torch.cat(images)


def paired_standard_error(base: torch.Tensor, tuned: torch.Tensor) -> float:
    """Standard error of mean(tuned − base) over the images both scored (same prompt and noise,
    so the pairs share everything but the weights); NaN with fewer than two pairs."""
    paired = torch.isfinite(base) & torch.isfinite(tuned)
    if int(paired.sum()) < 2:
        return float("nan")
    differences = (tuned[paired] - base[paired]).double()
    return float(differences.std(unbiased=True) / math.sqrt(differences.numel()))


def reward_rows(names: Sequence[str], base: torch.Tensor, tuned: torch.Tensor) -> list[dict[str, Any]]:
    """One row per reward: base / fine-tuned mean ± std over the images it judges, the delta,
    its paired standard error, and the delta in base-std units."""
    rows = []
    for k, name in enumerate(names):
        base_mean, base_std, count = _stats(base[k])
        tuned_mean, tuned_std, _ = _stats(tuned[k])
        delta = tuned_mean - base_mean
        rows.append({"reward": name, "n": count, "base_mean": base_mean, "base_std": base_std,
                     "tuned_mean": tuned_mean, "tuned_std": tuned_std, "delta": delta,
                     "delta_se": paired_standard_error(base[k], tuned[k]),
                     "delta_in_base_std": delta / base_std if base_std > 0 else float("nan")})
    return rows


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
    """(prompt, set index) pairs, round-robin over the sets so the cap keeps every set represented."""
    by_set = [[(p, i) for p in s.prompts] for i, s in enumerate(prompt_sets)]
    return [pair for group in itertools.zip_longest(*by_set) for pair in group if pair][:max_prompts]


def evaluate(target: str | Path, prompts: list[str] | None = None, rewards: list[str] | None = None,
             reward_options: dict | None = None, images_per_prompt: int = 4, max_prompts: int = 32,
             seed: int = 1234, out: str | Path | None = None, grid_prompts: int = 8) -> EvalReport:
    """Score checkpoint (or a run's latest checkpoint) ``target`` and the base policy.

    Every check (checkpoint, prompts, rewards) runs before the first write.
    """
    if images_per_prompt < 1 or max_prompts < 1:
        raise MarbleError(f"eval: --images-per-prompt ({images_per_prompt}) and --max-prompts "
                          f"({max_prompts}) must be ≥ 1")
    checkpoint = resolve_checkpoint(target)
    meta, state = load_checkpoint(checkpoint)
    config = checkpoint_config(checkpoint, meta)

    prompt_sets = load_prompt_sets(prompts) if prompts else _eval_prompt_sets(config)
    reward_names = rewards or list(config.rewards)
    options = {**config.reward_options, **(reward_options or {})}
    reward_models = [build("reward", name, options.get(name, {})) for name in reward_names]
    pairs = select_prompts(prompt_sets, max_prompts)
    all_prompts = [p for p, _ in pairs for _ in range(images_per_prompt)]
    set_ids = torch.tensor([i for _, i in pairs for _ in range(images_per_prompt)])
    mask = applicability_mask(set_ids, reward_names, prompt_sets)

    policy = build("policy", config.policy, {"seed": config.seed, **config.policy_options})
    reward_device = policy.device if config.reward_device == "policy" else torch.device(config.reward_device)
    for reward in reward_models:
        reward.to(reward_device)
    base_scores, base_images = score_policy(policy, reward_models, all_prompts, mask, seed, config.sample_steps)
    policy.load_state_dict(state["policy"])
    tuned_scores, tuned_images = score_policy(policy, reward_models, all_prompts, mask, seed, config.sample_steps)
    rows = reward_rows(reward_names, base_scores, tuned_scores)

    out_dir = Path(out) if out else checkpoint.parent.parent / "eval" / checkpoint.name
    shown = min(grid_prompts, len(pairs))
    picks = [i * images_per_prompt for i in range(shown)]
    grid = torch.cat([base_images[picks], tuned_images[picks]])
    captions = [f"base: {all_prompts[i]}" for i in picks] + [f"step {meta['step']}" for _ in picks]
    grid_path = save_grid(grid, out_dir / EVAL_GRID, captions=captions, ncol=shown)
    json_path = out_dir / EVAL_JSON
    report = EvalReport(str(checkpoint), int(meta["step"]), rows, json_path, grid_path)
    document = {**report.as_dict(), "policy": config.policy, "prompts": [p for p, _ in pairs],
                "images_per_prompt": images_per_prompt, "seed": seed, "sample_steps": config.sample_steps}
    document["rewards"] = [{k: _finite_or_none(v) for k, v in row.items()} for row in rows]
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False))
    tmp.replace(json_path)
    return report


def _eval_prompt_sets(config: TrainConfig) -> list:
    """Held-out world prompts for a world-reward run on `default`; otherwise the run's own sets."""
    if list(config.prompts) == ["default"] and set(tagged_rewards(load_prompt_sets(["default"]))) & set(config.rewards):
        return load_prompt_sets(["world_eval"])
    return resolve_prompt_sets(config.prompts, config.rewards)
