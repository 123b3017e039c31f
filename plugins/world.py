"""The procedural world of the tiny SD3 prior: coloured shapes, backgrounds and short words.

One vocabulary serves three things: the prompts and images the `tiny-sd3` prior is pretrained
on, the shipped prompt sets, and the analytic prompt-fidelity rewards (does the image show the
colour / shape / word the prompt names?). Everything is deterministic given a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
WORDS = ("CAT", "SUN", "BOX", "MAP", "HAT", "KEY")


@dataclass(frozen=True)
class Scene:
    """What one image shows. ``word`` scenes show dark text on the background (no shape)."""

    color: str | None = None
    shape: str | None = None
    background: str = "white"
    word: str | None = None
    # placement, in pixels at IMAGE_SIZE (ignored by the prompt)
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    radius: float = IMAGE_SIZE * 0.28

    def prompt(self) -> str:
        if self.word is not None:
            return f'a sign that says "{self.word.lower()}" on a {self.background} background'
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random, kind: str | None = None, word_share: float = 0.25) -> Scene:
    """A random scene: ``kind`` is "shape", "word" or None (a word with probability ``word_share``)."""
    kind = kind or ("word" if rng.random() < word_share else "shape")
    background = rng.choice(list(BACKGROUNDS))
    jitter = IMAGE_SIZE * 0.08
    cx = IMAGE_SIZE / 2 + rng.uniform(-jitter, jitter)
    cy = IMAGE_SIZE / 2 + rng.uniform(-jitter, jitter)
    if kind == "word":
        return Scene(background=background, word=rng.choice(WORDS), cx=cx, cy=cy)
    return Scene(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        background=background,
        cx=cx,
        cy=cy,
        radius=IMAGE_SIZE * rng.uniform(0.22, 0.32),
    )


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's embedded font: identical on every machine, no system fonts needed.
    return ImageFont.load_default(size=size)


def text_color(background: str) -> tuple[int, int, int]:
    return (245, 245, 245) if background == "black" else (15, 15, 15)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` × ``size`` pixels."""
    scale = size / IMAGE_SIZE
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * scale, scene.cy * scale, scene.radius * scale
    if scene.word is not None:
        ink = text_color(scene.background)
        # bold (a 1-px stroke around each glyph): strokes ~4 px wide survive the VAE
        draw.text((cx, cy), scene.word, fill=ink, font=_font(int(22 * scale)), anchor="mm",
                  stroke_width=max(1, round(scale)), stroke_fill=ink)
        return image
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image


def render_array(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """``render`` as float32 [3, H, W] in [0, 1]."""
    return np.asarray(render(scene, size), dtype=np.float32).transpose(2, 0, 1) / 255.0


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The world attributes a prompt names: colour, shape, background and quoted word."""
    words = prompt.lower().replace(",", " ").split()
    quoted = None
    if '"' in prompt:
        parts = prompt.split('"')
        quoted = parts[1].upper() if len(parts) >= 3 else None
    return {
        "color": next((w for w in words if w in COLORS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "background": next(
            (words[i - 1] for i, w in enumerate(words) if w == "background" and i > 0
             and words[i - 1] in BACKGROUNDS), None),
        "word": quoted,
    }
