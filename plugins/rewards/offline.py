"""Offline rewards that need no weights: image statistics computed on the pixels."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward


class Brightness(Reward):
    """Mean luminance (ITU-R BT.601) in [0, 1]."""

    name = "brightness"

    def score(self, images, prompts):
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(1).mean(dim=(1, 2))


class JpegSize(Reward):
    """JPEG file size in kB at quality 95: `incompressibility` (larger is better) or its negative."""

    batch_size = 64

    def __init__(self, name: str = "jpeg-incompressibility", sign: float = 1.0, quality: int = 95):
        self.name, self.sign, self.quality = name, sign, quality

    def score(self, images, prompts):
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return self.sign * torch.tensor(sizes)


@hookimpl
def register_rewards(register):
    register("brightness", Brightness, description="Mean luminance of the image (offline, no weights).")
    register("jpeg-incompressibility", lambda quality=95: JpegSize("jpeg-incompressibility", 1.0, quality),
             description="JPEG size in kB (larger = more detail; offline).")
    register("jpeg-compressibility", lambda quality=95: JpegSize("jpeg-compressibility", -1.0, quality),
             description="Negative JPEG size in kB (smaller files = simpler images; offline).")
