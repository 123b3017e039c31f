"""Does the tiny prior follow its prompts? Per-attribute accuracy and prompt-vs-noise variation.

Used by the tests (on the shipped prior) and to write ``docs/tiny-sd3.md``::

    python -m marble_plugins.policies.prior_eval --grid docs/img/tiny_prior_samples.png

On the 54 shape prompts of the world (every colour × shape × background) at fixed noises:

* colour accuracy: the dominant foreground colour (nearest world palette colour, majority vote
  over pixels that differ from the border's median) equals the colour the prompt names;
  chance is 1/6.
* shape accuracy: the foreground's fill ratio of its bounding box (square 1.0, circle π/4,
  triangle 0.5) classifies the shape; chance is 1/3.
* variation: at fixed initial noise, the pixel std across prompts, versus at a fixed prompt,
  the pixel std across noises. A prior that ignores its prompts has a ratio near 0.

On the held-out evaluation prompts (``world_eval``: shapes and words), every attribute a world
reward judges (:func:`measure_attributes`): colour as above; shape by the best-matching
silhouette template (the `shape` reward's IoU, argmax over the three shapes); the word by the
best normalized cross-correlation with the world's word renders (the `word` reward's match,
argmax over the six words; chance 1/6); the background by the colour most of the border shows
(chance 1/3); plus the mean of every default reward.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from marble_plugins import world

PALETTE_NAMES = list(world.COLORS)
PALETTE = torch.tensor([world.COLORS[name] for name in PALETTE_NAMES], dtype=torch.float32) / 255
SHAPE_FILL = {"square": 1.0, "circle": 3.14159 / 4, "triangle": 0.5}


def color_prompts() -> list[str]:
    """Every shape prompt of the world: 6 colours × 3 shapes × 3 backgrounds."""
    return [world.Scene(color=c, shape=s, background=b).prompt()
            for c in world.COLORS for s in world.SHAPES for b in world.BACKGROUNDS]


MARGIN = 3  # the tiny VAE draws a faint frame in the outermost pixels: ignore them


def foreground_mask(image: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Pixels [H-2m, W-2m] far (RGB distance) from the median colour of the inner border ring."""
    image = image[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
    border = torch.cat([image[:, :2].reshape(3, -1), image[:, -2:].reshape(3, -1),
                        image[:, :, :2].reshape(3, -1), image[:, :, -2:].reshape(3, -1)], dim=1)
    background = border.median(dim=1).values.view(3, 1, 1)
    return (image - background).norm(dim=0) > threshold


def dominant_color(image: torch.Tensor, min_fraction: float = 0.02) -> str | None:
    """The world colour most foreground pixels are nearest to (None without a foreground)."""
    mask = foreground_mask(image)
    if mask.float().mean() < min_fraction:
        return None
    pixels = image[:, MARGIN:-MARGIN, MARGIN:-MARGIN][:, mask].T     # [N, 3]
    nearest = torch.cdist(pixels, PALETTE).argmin(dim=1)
    return PALETTE_NAMES[int(torch.bincount(nearest, minlength=len(PALETTE)).argmax())]


def fill_ratio(image: torch.Tensor, min_run: int = 3) -> float | None:
    """Foreground fraction of the foreground's bounding box (None without a foreground).

    Rows and columns with fewer than ``min_run`` foreground pixels do not extend the box, so
    isolated speckles do not inflate it.
    """
    mask = foreground_mask(image)
    rows = (mask.sum(dim=1) >= min_run).nonzero()
    cols = (mask.sum(dim=0) >= min_run).nonzero()
    if len(rows) == 0 or len(cols) == 0:
        return None
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float().mean().item()


def shape_of(image: torch.Tensor, min_fraction: float = 0.02) -> str | None:
    """Square / circle / triangle: the shape whose true fill ratio is nearest."""
    fill = fill_ratio(image) if foreground_mask(image).float().mean() >= min_fraction else None
    if fill is None:
        return None
    return min(SHAPE_FILL, key=lambda name: abs(SHAPE_FILL[name] - fill))


@dataclass
class PriorReport:
    color_accuracy: float       # chance 1/6
    shape_accuracy: float       # chance 1/3
    fill_by_shape: dict[str, float]  # mean fill ratio per prompted shape (true: 1.0 / 0.785 / 0.5)
    prompt_std: float           # pixel std across prompts at fixed noise
    noise_std: float            # pixel std across noises at a fixed prompt
    variation_ratio: float      # prompt_std / noise_std
    samples: int
    seconds: float


def fixed_noise_images(policy, prompts: list[str], noises: int, seed: int) -> torch.Tensor:
    """Images [noises, prompts, 3, H, W]: row n uses the same initial noise for every prompt."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(policy.latent_shape(noises), generator=generator)
    rows = []
    for n in range(noises):
        noise = base[n:n + 1].expand(len(prompts), *base.shape[1:])
        rows.append(policy.sample(prompts, generator, noise=noise).images)
    return torch.stack(rows)


def measure_prior(policy, noises: int = 4, seed: int = 0, prompts: list[str] | None = None
                  ) -> tuple[PriorReport, torch.Tensor]:
    """Accuracy and variation of ``policy``'s samples on the world's colour prompts."""
    start = time.perf_counter()
    prompts = prompts or color_prompts()
    images = fixed_noise_images(policy, prompts, noises, seed)
    wanted = [world.parse_prompt(p) for p in prompts]
    flat = images.reshape(-1, *images.shape[2:])
    targets = wanted * noises
    colors = [dominant_color(image) == t["color"] for image, t in zip(flat, targets)]
    shapes = [shape_of(image) == t["shape"] for image, t in zip(flat, targets)]
    fills: dict[str, list[float]] = {shape: [] for shape in world.SHAPES}
    for image, target in zip(flat, targets):
        if (fill := fill_ratio(image)) is not None:
            fills[target["shape"]].append(fill)
    prompt_std = images.std(dim=1).mean().item()
    noise_std = images.std(dim=0).mean().item()
    report = PriorReport(
        color_accuracy=sum(colors) / len(colors), shape_accuracy=sum(shapes) / len(shapes),
        fill_by_shape={shape: sum(v) / max(1, len(v)) for shape, v in fills.items()},
        prompt_std=prompt_std, noise_std=noise_std, variation_ratio=prompt_std / noise_std,
        samples=len(flat), seconds=time.perf_counter() - start)
    return report, images


def renders_accuracy(count: int = 300, seed: int = 0) -> dict[str, float]:
    """The classifiers' accuracy on true renders (their ceiling, independent of any model)."""
    import random

    rng = random.Random(seed)
    scenes = [world.random_scene(rng, "shape") for _ in range(count)]
    images = [torch.from_numpy(world.render_array(scene)) for scene in scenes]
    return {
        "color": sum(dominant_color(i) == s.color for i, s in zip(images, scenes)) / count,
        "shape": sum(shape_of(i) == s.shape for i, s in zip(images, scenes)) / count,
    }


@dataclass
class AttributeReport:
    """Accuracy per attribute (share of images whose attribute is recognised as the named one)
    and mean reward per reward, on the prompts that name the attribute."""

    accuracy: dict[str, float]
    counts: dict[str, int]
    rewards: dict[str, float]
    samples: int
    seconds: float


def held_out_prompts() -> list[str]:
    """The held-out evaluation prompts of the default run (``world_eval``)."""
    from marble_kit.prompts import load_prompt_sets

    return [p for prompt_set in load_prompt_sets(["world_eval"]) for p in prompt_set.prompts]


def recognised(images: torch.Tensor) -> dict[str, list[str | None]]:
    """The shape (template IoU), word (NCC) and background (border colour) each image shows."""
    from marble_plugins.rewards import world as rewards

    lab = rewards.srgb_to_lab(images)
    mask = rewards.foreground_mask(lab)
    iou = rewards.soft_iou(mask, rewards.shape_templates(mask))
    has_foreground = mask.mean(dim=(1, 2)) >= 0.02
    shapes = [world.SHAPES[int(i)] if ok else None for i, ok in zip(iou.argmax(1), has_foreground)]
    templates = rewards.word_templates(list(world.WORDS))
    ncc = rewards.max_normalized_cross_correlation(images.mean(dim=1), templates)
    words = [world.WORDS[int(i)] for i in ncc.argmax(1)]
    names, palette, first_background = rewards.world_palette()
    frame = rewards.srgb_to_lab(rewards.border_pixels(images, 3).unsqueeze(-1))
    share = rewards.colour_probabilities(frame, palette).mean(dim=(2, 3))[:, first_background:]
    backgrounds = [names[first_background + int(i)] for i in share.argmax(1)]
    return {"shape": shapes, "word": words, "background": backgrounds}


def measure_attributes(policy, prompts: list[str] | None = None, noises: int = 4, seed: int = 0,
                       rewards: list[str] | None = None) -> tuple[AttributeReport, torch.Tensor]:
    """Per-attribute accuracy and mean rewards of ``policy``'s samples (``noises`` per prompt)."""
    from marble_kit.registry import build

    start = time.perf_counter()
    prompts = prompts or held_out_prompts()
    generator = torch.Generator().manual_seed(seed)
    repeated = [p for p in prompts for _ in range(noises)]
    images = torch.cat([policy.sample(repeated[i:i + 32], generator).images
                        for i in range(0, len(repeated), 32)])
    wanted = [world.parse_prompt(p) for p in repeated]
    seen = recognised(images)
    seen["color"] = [dominant_color(image) for image in images]
    accuracy, counts = {}, {}
    for attribute in ("color", "shape", "word", "background"):
        hits = [got == (want[attribute].lower() if attribute != "word" else want[attribute])
                for got, want in zip(seen[attribute], wanted) if want[attribute]]
        counts[attribute] = len(hits)
        accuracy[attribute] = sum(hits) / len(hits) if hits else float("nan")
    means = {}
    for name in rewards or ["color", "shape", "word", "background", "sharpness"]:
        scores = build("reward", name, {})(images, repeated)
        finite = scores[torch.isfinite(scores)]
        means[name] = float(finite.mean()) if finite.numel() else float("nan")
    report = AttributeReport(accuracy=accuracy, counts=counts, rewards=means,
                             samples=len(images), seconds=time.perf_counter() - start)
    return report, images


def main(argv: list[str] | None = None) -> None:
    from marble_kit.images import save_grid
    from marble_plugins.policies.sd3 import build_tiny_sd3

    parser = argparse.ArgumentParser(description="Measure how well the tiny prior follows prompts.")
    parser.add_argument("--path", default=None, help="prior directory (default: the shipped one)")
    parser.add_argument("--noises", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="write a sample grid PNG here")
    args = parser.parse_args(argv)
    policy = build_tiny_sd3(path=args.path)
    report, images = measure_prior(policy, noises=args.noises, seed=args.seed)
    attributes, _ = measure_attributes(policy, noises=args.noises, seed=args.seed + 1)
    print(json.dumps({**asdict(report), "held_out": asdict(attributes),
                      "renders": renders_accuracy()}, indent=2))
    if args.grid:
        # one row per prompt: (colour, shape) on a rotating background, then the six words;
        # one column per initial noise
        prompts = color_prompts()
        picks = [i for i, p in enumerate(prompts) if (i // 3) % 3 == i % 3][:18]
        words = [world.Scene(word=w, background=b).prompt()
                 for w, b in zip(world.WORDS, list(world.BACKGROUNDS) * 2)]
        word_images = fixed_noise_images(policy, words, args.noises, args.seed)
        rows = torch.cat([images[:, picks], word_images], dim=1)   # [noises, rows, 3, H, W]
        grid = rows.transpose(0, 1).reshape(-1, *images.shape[2:])
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, args.grid, ncol=images.shape[0])


if __name__ == "__main__":
    main()
