"""Score image files with registered rewards (the library side of ``marble score``).

Also the one place that builds rewards by name: :func:`build_rewards` constructs every reward
up front, so missing weights or a bad option fail before any sampling or training starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from marble_kit import registry
from marble_kit.errors import MarbleError
from marble_kit.rewards import Reward

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ScoredImage:
    """One image file, its prompt and one score per reward (NaN: reward does not apply)."""

    path: str
    prompt: str
    scores: dict[str, float]


def build_rewards(names: Sequence[str], options: dict[str, dict[str, Any]] | None = None,
                  device: str | torch.device | None = None,
                  reg: registry.Registry | None = None) -> dict[str, Reward]:
    """Build the named rewards now (weights are checked at construction), optionally on ``device``.

    ``options`` maps a reward name to its factory options (``{"hps": {"weights": "/p"}}``);
    options for rewards that are not requested are an error, to catch typos.
    """
    names = list(names)
    if not names:
        raise MarbleError("no rewards given; pass --rewards NAME[,NAME...] (see `marble plugins`)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MarbleError(f"reward {duplicates[0]!r} is listed twice in --rewards; list each reward once")
    options = options or {}
    stray = sorted(set(options) - set(names))
    if stray:
        raise MarbleError(
            f"--reward-opt names reward {stray[0]!r}, which is not in --rewards ({', '.join(names)}); "
            "fix the name or add the reward"
        )
    rewards = {}
    for name in names:
        reward = registry.build("reward", name, options.get(name, {}), registry=reg)
        if device is not None:
            reward.to(device)
        rewards[name] = reward
    return rewards


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``paths``; directories contribute their PNG/JPEG files, sorted."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise MarbleError(f"{path} is not a PNG or JPEG file; pass images or directories of images")
            found.append(path)
        else:
            raise MarbleError(f"{path} does not exist; pass image files or directories")
    if not found:
        raise MarbleError(f"no PNG/JPEG images found in {', '.join(map(str, paths))}")
    return found


def load_image(path: Path) -> torch.Tensor:
    """An image file as a float tensor [3, H, W] in [0, 1] (alpha dropped, grayscale expanded)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise MarbleError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def read_prompts(count: int, prompt: str | None = None, prompts_file: str | Path | None = None
                 ) -> list[str]:
    """One prompt per image: the same ``prompt`` for all, or one line of ``prompts_file`` each."""
    if prompt is not None and prompts_file is not None:
        raise MarbleError("pass either --prompt or --prompts-file, not both")
    if prompts_file is None:
        return [prompt or ""] * count
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise MarbleError(f"prompts file {path} does not exist; pass a text file with one prompt per line")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != count:
        raise MarbleError(
            f"prompts file {path} has {len(lines)} lines for {count} images; give one prompt per "
            "image, in the sorted order of the image paths"
        )
    return lines


def _run_reward(name: str, reward: Reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    try:
        return reward(images, prompts)
    except MarbleError:
        raise
    except Exception as exc:  # a reward crash must name the reward (SPEC §1.2)
        raise MarbleError(f"reward {name!r} failed while scoring: {type(exc).__name__}: {exc}") from exc


def score_tensors(rewards: dict[str, Reward], images: Sequence[torch.Tensor], prompts: Sequence[str]
                  ) -> list[dict[str, float]]:
    """Scores of images that may differ in size: same-sized images are batched together."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    results: list[dict[str, float]] = [{} for _ in images]
    for indices in by_size.values():
        batch = torch.stack([images[i] for i in indices])
        batch_prompts = [prompts[i] for i in indices]
        for name, reward in rewards.items():
            scores = _run_reward(name, reward, batch, batch_prompts)
            for index, value in zip(indices, scores.tolist(), strict=True):
                results[index][name] = float(value)
    return results


def score_images(paths: Sequence[str | Path], rewards: Sequence[str], prompt: str | None = None,
                 prompts_file: str | Path | None = None,
                 reward_options: dict[str, dict[str, Any]] | None = None,
                 device: str | None = None) -> list[ScoredImage]:
    """Score the images in ``paths`` with the named rewards (built first, so errors come early)."""
    built = build_rewards(rewards, reward_options, device=device)
    files = find_images(paths)
    prompts = read_prompts(len(files), prompt, prompts_file)
    scores = score_tensors(built, [load_image(path) for path in files], prompts)
    return [ScoredImage(str(path), text, row) for path, text, row in zip(files, prompts, scores, strict=True)]


def mean_scores(rows: Sequence[ScoredImage]) -> dict[str, float]:
    """Per-reward mean over the images it applies to (NaN scores ignored; NaN if none apply)."""
    names = list(rows[0].scores) if rows else []
    means = {}
    for name in names:
        values = [row.scores[name] for row in rows if not math.isnan(row.scores[name])]
        means[name] = sum(values) / len(values) if values else math.nan
    return means
