"""Image grids as PNG: sample grids, base-vs-fine-tuned comparisons."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] → [B, H, W, 3] uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, ncol: int | None = None, captions: Sequence[str] | None = None,
              scale: int = 0, pad: int = 2) -> Image.Image:
    """Tile images into one picture; small images are upscaled (nearest) so they are visible."""
    arrays = to_uint8(images)
    count, height, width = arrays.shape[0], arrays.shape[1], arrays.shape[2]
    scale = scale or max(1, 192 // max(height, width))
    ncol = ncol or min(count, 8)
    nrow = math.ceil(count / ncol)
    cell_w, cell_h = width * scale, height * scale
    caption_h = 12 if captions else 0
    canvas = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (cell_h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10) if captions else None
    for index, array in enumerate(arrays):
        row, col = divmod(index, ncol)
        x, y = pad + col * (cell_w + pad), pad + row * (cell_h + caption_h + pad)
        canvas.paste(Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST), (x, y + caption_h))
        if captions and index < len(captions):
            text = captions[index]
            max_chars = max(4, cell_w // 6)
            draw.text((x, y), text if len(text) <= max_chars else text[:max_chars - 1] + "…",
                      fill=(0, 0, 0), font=font)
    return canvas


def save_png_atomic(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, captions: Sequence[str] | None = None,
              ncol: int | None = None) -> Path:
    return save_png_atomic(make_grid(images, ncol=ncol, captions=captions), path)
