"""Offline rewards that need no weights: image statistics computed on the pixels."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward


class Brightness(Reward):
    """Mean luminance (ITU-R BT.601) in [0, 1]."""

    name = "brightness"

    def score(self, images, prompts):
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(1).mean(dim=(1, 2))


def luminance(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of ``[B, 3, H, W]`` images: ``[B, H, W]``."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return torch.einsum("c,bchw->bhw", weights, images)


def area_resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``images`` area-averaged to ``size`` × ``size`` (unchanged when None or already that size)."""
    if size is not None and images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="area")
    return images


class Colorfulness(Reward):
    """Hasler & Süsstrunk (2003) colourfulness M = σ_rgyb + 0.3·μ_rgyb, divided by 100.

    Opponent channels rg = R − G and yb = (R + G)/2 − B on the paper's 0–255 scale, so the
    paper's perceptual anchors become 0.15 "slightly", 0.33 "moderately", 0.59 "quite" and
    1.09 "extremely" colourful; a grey image scores 0.
    """

    name = "colorfulness"
    batch_size = 256

    def score(self, images, prompts):
        red, green, blue = (images * 255.0).unbind(1)
        rg = (red - green).flatten(1)
        yb = (0.5 * (red + green) - blue).flatten(1)
        spread = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
        offset = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
        return (spread + 0.3 * offset) / 100.0


class Sharpness(Reward):
    """Edge crispness: s/(s + scale) with s the std of the luminance Laplacian, in [0, 1).

    The 3×3 Laplacian responds to abrupt intensity changes; blur lowers its spread and a flat
    image gives 0. The saturating map keeps the score bounded, so beyond clean edges extra
    high-frequency content (noise) earns less and less. ``scale`` is the Laplacian std that
    scores 0.5; the default sits at the median of clean 64-px world renders (docs/world.md).
    ``size`` resizes images first (area average) so the score does not depend on resolution;
    None keeps the native resolution.
    """

    name = "sharpness"
    batch_size = 256
    _laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

    def __init__(self, scale: float = 0.1, size: int | None = 64):
        if scale <= 0:
            raise MarbleError(f"reward 'sharpness': scale must be > 0, got {scale}; "
                              "pass e.g. --reward-opt sharpness.scale=0.1")
        self.scale, self.size = scale, size

    def score(self, images, prompts):
        images = area_resize(images, self.size)
        kernel = self._laplacian.to(images).view(1, 1, 3, 3)
        response = F.conv2d(luminance(images).unsqueeze(1), kernel)  # valid: no border artefacts
        spread = response.flatten(1).std(dim=1, unbiased=False)
        return spread / (spread + self.scale)


class Crispness(Reward):
    """Gradient sparsity of the luma: 1 − ‖∇y‖₁ / (√n ‖∇y‖₂), in [0, 1].

    The normalized sparsity measure of Krishnan, Tay & Fergus (CVPR 2011, ℓ1/ℓ2 of the image
    gradients) that blind deconvolution uses to tell sharp images from blurred ones: crisp edges
    on flat regions concentrate the gradient on few pixels (clean world renders score ≈ 0.70),
    while blur spreads it and noise or texture put some everywhere (both score lower). Unlike the
    Laplacian's spread (`sharpness`) it does not pay for added texture. Gradients are forward
    differences of the luma after an area resize to ``size`` px; ``floor`` (luma units) is a
    noise floor that every pixel's gradient counts with, so a flat image scores 0, not 1.
    """

    name = "crispness"
    batch_size = 256

    def __init__(self, floor: float = 0.004, size: int | None = 64):
        if floor <= 0:
            raise MarbleError(f"reward 'crispness': floor must be > 0, got {floor}; "
                              "pass e.g. --reward-opt crispness.floor=0.004")
        self.floor, self.size = floor, size

    def score(self, images, prompts):
        images = area_resize(images, self.size)
        luma = luminance(images.float())
        dx = luma[:, :-1, 1:] - luma[:, :-1, :-1]
        dy = luma[:, 1:, :-1] - luma[:, :-1, :-1]
        magnitude = (dx.square() + dy.square()).flatten(1)          # |∇y|² per pixel
        n = magnitude.shape[1]
        l1 = magnitude.sqrt().sum(1) + n * self.floor
        l2 = (magnitude.sum(1) + n * self.floor ** 2).sqrt()
        return (1.0 - l1 / (l2 * n ** 0.5)).clamp(0.0, 1.0)


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
    register("colorfulness", Colorfulness,
             description="Hasler-Süsstrunk colourfulness / 100 (offline, no weights).")
    register("sharpness", Sharpness,
             description="Edge crispness from the luminance Laplacian, in [0, 1) (offline).")
    register("crispness", Crispness,
             description="Gradient sparsity of the luma: crisp edges on flat regions, in [0, 1] (offline).")
    register("jpeg-incompressibility", lambda quality=95: JpegSize("jpeg-incompressibility", 1.0, quality),
             description="JPEG size in kB (larger = more detail; offline).")
    register("jpeg-compressibility", lambda quality=95: JpegSize("jpeg-compressibility", -1.0, quality),
             description="Negative JPEG size in kB (smaller files = simpler images; offline).")
