"""Prompt-fidelity rewards of the procedural world: colour, shape, word and background.

A small, analytic analogue of GenEval / OCR rewards for the images of the `tiny-sd3` prior
(`marble_plugins.world`). Each reward reads the attribute the prompt names (`parse_prompt`) and
measures how well the image shows it; a prompt that does not name the attribute gets NaN (the
reward does not apply). All scores lie in [0, 1], are smooth in the pixels (soft colour
assignments, soft masks, softmax margins) so that partly-right images earn partial credit, and
are computed for a whole batch with a few tensor operations.

* ``color``: share of the foreground (palette-coloured pixels) that has the named colour.
* ``shape``: the foreground silhouette against templates of every shape with the same centroid
  and area: softmax(IoU / tau)[named] · IoU[named].
* ``word``: normalized cross-correlation of the grey image with renders of every world word
  (and the named one), best over small shifts: softmax(NCC / tau)[named] · NCC[named].
* ``background``: share of the image border that has the named background colour.

``centering`` is the world's global reward: it reads no prompt and scores where the subject
sits (its centroid near the image centre), a simple aesthetic-like composition score.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward
from marble_plugins import world
from marble_plugins.rewards.offline import area_resize

# Colours are compared in CIELAB, where Euclidean distance roughly follows perceived difference.
# The closest two world colours (blue, purple) are 31 ΔE apart; sigma 12 keeps them apart while
# still giving blended pixels split credit.
COLOR_SIGMA = 12.0
# Width (ΔE) of the foreground mask's sigmoid edge (`foreground_mask`).
MASK_SOFTNESS = 4.0
_SRGB_TO_XYZ = torch.tensor([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def srgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``[B, 3, H, W]`` → CIELAB (D65), same shape (L in [0, 100])."""
    linear = torch.where(images <= 0.04045, images / 12.92,
                         torch.pow((images.clamp_min(0.04045) + 0.055) / 1.055, 2.4))
    xyz = torch.einsum("ij,bjhw->bihw", _SRGB_TO_XYZ.to(images), linear)
    xyz = xyz / _D65_WHITE.to(images).view(1, 3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def world_palette() -> tuple[list[str], torch.Tensor, int]:
    """Names and Lab values of every world colour: the shape colours first, then backgrounds.

    Returns ``(names, lab [N, 3], number_of_shape_colours)``.
    """
    names = list(world.COLORS) + list(world.BACKGROUNDS)
    rgb = torch.tensor([*world.COLORS.values(), *world.BACKGROUNDS.values()], dtype=torch.float32)
    lab = srgb_to_lab((rgb / 255.0).T.reshape(1, 3, -1, 1))[0, :, :, 0].T.contiguous()
    return names, lab, len(world.COLORS)


def colour_probabilities(lab: torch.Tensor, palette: torch.Tensor, sigma: float = COLOR_SIGMA
                         ) -> torch.Tensor:
    """Soft assignment of each pixel to the palette colours: ``[B, N, H, W]``, sums to 1 over N."""
    palette = palette.to(lab)
    # |x − p|² = |x|² − 2 x·p + |p|², without a [B, N, 3, H, W] intermediate
    squared = ((lab**2).sum(1, keepdim=True) - 2 * torch.einsum("nc,bchw->bnhw", palette, lab)
               + (palette**2).sum(1).view(1, -1, 1, 1)).clamp_min(0)
    return torch.softmax(-squared / (2 * sigma**2), dim=1)


def border_pixels(images: torch.Tensor, width: int) -> torch.Tensor:
    """The pixels of a frame ``width`` pixels wide: ``[B, C, H, W]`` → ``[B, C, P]``."""
    h, w = images.shape[-2:]
    frame = torch.ones(h, w, dtype=torch.bool, device=images.device)
    frame[width:h - width, width:w - width] = False
    return images[..., frame]


def foreground_mask(lab: torch.Tensor, border_width: int = 2, threshold: float = 25.0,
                    softness: float = MASK_SOFTNESS) -> torch.Tensor:
    """Soft mask ``[B, H, W]`` of the pixels that differ from the background colour.

    The background colour is the median of the image border, so the mask works for any
    background, also one the prompt did not ask for. A 3×3 mean first makes the mask robust to
    pixel noise (noise of std 0.05 otherwise halves the shape score of a clean render).
    """
    background = border_pixels(lab, border_width).median(dim=-1).values
    lab = F.avg_pool2d(F.pad(lab, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    distance = ((lab - background.view(-1, 3, 1, 1)) ** 2).sum(1).sqrt()
    return torch.sigmoid((distance - threshold) / softness)


# ---------------------------------------------------------------------------------- shapes


def _pixel_grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # pixel centres, in the coordinates of PIL's drawing (pixel i covers [i, i + 1))
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    return ys.view(1, h, 1), xs.view(1, 1, w)


def mask_moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area and centroid (y, x; PIL pixel coordinates) of each soft mask ``[B, H, W]``: ``[B]`` each."""
    ys, xs = _pixel_grid(*mask.shape[-2:], mask.device)
    area = mask.sum(dim=(1, 2))
    cy = (mask * ys).sum(dim=(1, 2)) / area.clamp_min(1e-6)
    cx = (mask * xs).sum(dim=(1, 2)) / area.clamp_min(1e-6)
    return area, cy, cx


def shape_templates(mask: torch.Tensor, edge: float = 0.5) -> torch.Tensor:
    """Soft templates ``[B, S, H, W]`` of every world shape (order ``world.SHAPES``) with the
    centroid and area of ``mask`` ``[B, H, W]``, drawn as ``world.render`` draws them."""
    h, w = mask.shape[-2:]
    ys, xs = _pixel_grid(h, w, mask.device)
    area, cy, cx = mask_moments(mask)
    cy, cx, area = cy.view(-1, 1, 1), cx.view(-1, 1, 1), area.clamp_min(1e-6).view(-1, 1, 1)
    dx, dy = xs - cx, ys - cy
    signed_distances = {}
    # circle of radius r: area π r²
    r = (area / math.pi).sqrt()
    signed_distances["circle"] = (dx**2 + dy**2).sqrt() - r
    # square of half-side s: area 4 s²
    s = area.sqrt() / 2
    signed_distances["square"] = torch.maximum(dx.abs(), dy.abs()) - s
    # world triangle (apex (0, -r), base y = 0.8 r, half-width r): area 1.8 r², centroid 0.2 r
    # below the drawing centre; signed distance of a convex polygon = max over its edges
    r = (area / 1.8).sqrt()
    ty = dy + 0.2 * r  # y relative to the drawing centre
    side = (1.8 * dx.abs() - (ty + r)) / math.sqrt(1.8**2 + 1.0)  # sides y = -r + 1.8 |x|
    base = ty - 0.8 * r
    signed_distances["triangle"] = torch.maximum(side, base)
    stacked = torch.stack([signed_distances[name] for name in world.SHAPES], dim=1)
    return torch.sigmoid(-stacked / edge)


def soft_iou(mask: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Fuzzy IoU Σmin / Σmax of ``mask`` ``[B, H, W]`` with each template ``[B, S, H, W]``."""
    mask = mask.unsqueeze(1)
    overlap = torch.minimum(mask, templates).sum(dim=(2, 3))
    union = torch.maximum(mask, templates).sum(dim=(2, 3)).clamp_min(1e-6)
    return overlap / union


# ----------------------------------------------------------------------------------- words


@lru_cache(maxsize=256)
def _word_render(word: str) -> np.ndarray:
    """Grey render of ``word`` as the world draws it (dark on white, centred): ``[H, W]``."""
    return world.render_array(world.Scene(word=word, background="white")).mean(axis=0)


def word_templates(words: Sequence[str], margin: int = 2) -> torch.Tensor:
    """Renders of ``words`` cropped to the box holding all of them (plus ``margin``):
    ``[N, h, w]``, each zero-mean with unit norm (ready for normalized cross-correlation)."""
    renders = np.stack([_word_render(word) for word in words])
    ink = (renders < 0.5).any(axis=0)
    rows, cols = np.where(ink)
    if rows.size == 0:  # nothing drawn (e.g. only spaces): the whole canvas is the template
        rows, cols = np.array([0, renders.shape[1] - 1]), np.array([0, renders.shape[2] - 1])
    top, bottom = max(rows.min() - margin, 0), min(rows.max() + margin + 1, renders.shape[1])
    left, right = max(cols.min() - margin, 0), min(cols.max() + margin + 1, renders.shape[2])
    crops = torch.from_numpy(renders[:, top:bottom, left:right].copy())
    centred = crops - crops.mean(dim=(1, 2), keepdim=True)
    return centred / centred.flatten(1).norm(dim=1).clamp_min(1e-6).view(-1, 1, 1)


def max_normalized_cross_correlation(gray: torch.Tensor, templates: torch.Tensor,
                                     max_shift: int = 8, min_std: float = 0.02) -> torch.Tensor:
    """Best |NCC| of each image ``[B, H, W]`` with each template ``[N, h, w]`` over placements
    within ``max_shift`` pixels of the image centre: ``[B, N]`` in [0, 1].

    ``min_std`` floors the window's contrast, so a flat image scores 0 (not 0/0) and faint text
    scores lower than crisp text. The absolute value accepts light text on dark backgrounds.
    """
    _, h, w = gray.shape
    th, tw = templates.shape[-2:]
    # the search window: the template-sized box at the centre, grown by max_shift each side
    pad = max_shift + max(th, tw)
    padded = F.pad(gray.unsqueeze(1), (pad, pad, pad, pad), mode="replicate")
    top = pad + (h - th) // 2 - max_shift
    left = pad + (w - tw) // 2 - max_shift
    window = padded[:, :, top:top + th + 2 * max_shift, left:left + tw + 2 * max_shift]
    correlation = F.conv2d(window, templates.unsqueeze(1).to(gray))          # Σ I·T̂  [B, N, p, q]
    ones = torch.ones(1, 1, th, tw, dtype=gray.dtype, device=gray.device)
    count = th * tw
    local_sum = F.conv2d(window, ones)
    local_sq = F.conv2d(window**2, ones)
    centred_energy = (local_sq - local_sum**2 / count).clamp_min(0) + count * min_std**2
    ncc = correlation / centred_energy.sqrt()
    return ncc.abs().flatten(2).max(dim=2).values.clamp(0, 1)


# --------------------------------------------------------------------------------- rewards


def _applicable(prompts: Sequence[str], attribute: str) -> list[tuple[int, str]]:
    """(index, named value) of the prompts that name ``attribute`` (``parse_prompt`` key)."""
    named = [(i, world.parse_prompt(p)[attribute]) for i, p in enumerate(prompts)]
    return [(i, value) for i, value in named if value]


class _WorldReward(Reward):
    """A world fidelity reward: NaN where the prompt does not name ``attribute``."""

    attribute = ""
    batch_size = 256

    def score(self, images, prompts):
        scores = torch.full((images.shape[0],), float("nan"))
        applicable = _applicable(prompts, self.attribute)
        if applicable:
            index = torch.tensor([i for i, _ in applicable])
            values = [value for _, value in applicable]
            scores[index] = self.fidelity(images[index.to(images.device)], values).float().cpu()
        return scores

    @abc.abstractmethod
    def fidelity(self, images: torch.Tensor, named: list[str]) -> torch.Tensor:
        """Scores in [0, 1] for images that name an attribute value each."""


class ColorFidelity(_WorldReward):
    """Share of the palette-coloured (non-background) pixels that show the named colour."""

    name = "color"
    attribute = "color"

    def __init__(self, sigma: float = COLOR_SIGMA, min_area: float = 0.02):
        # min_area (fraction of the image) keeps an image without any coloured pixel near 0
        self.sigma, self.min_area = sigma, min_area
        self.names, self.palette, self.num_colours = world_palette()

    def fidelity(self, images, named):
        probabilities = colour_probabilities(srgb_to_lab(images), self.palette, self.sigma)
        mass = probabilities.sum(dim=(2, 3))                       # [B, N] pixels per colour
        target = torch.tensor([self.names.index(c) for c in named], device=images.device)
        named_mass = mass.gather(1, target.view(-1, 1)).squeeze(1)
        coloured_mass = mass[:, :self.num_colours].sum(1)
        pixels = images.shape[-2] * images.shape[-1]
        return named_mass / (coloured_mass + self.min_area * pixels)


class ShapeFidelity(_WorldReward):
    """softmax(IoU / tau)[named] · IoU[named] of the foreground against same-size templates."""

    name = "shape"
    attribute = "shape"

    def __init__(self, temperature: float = 0.04, threshold: float = 25.0):
        self.temperature, self.threshold = temperature, threshold

    def fidelity(self, images, named):
        mask = foreground_mask(srgb_to_lab(images), threshold=self.threshold)
        iou = soft_iou(mask, shape_templates(mask))                 # [B, S]
        target = torch.tensor([world.SHAPES.index(s) for s in named], device=images.device)
        probability = torch.softmax(iou / self.temperature, dim=1).gather(1, target.view(-1, 1))
        return probability.squeeze(1) * iou.gather(1, target.view(-1, 1)).squeeze(1)


class WordFidelity(_WorldReward):
    """softmax(NCC / tau)[named] · NCC[named] against renders of the world words.

    The candidates are ``world.WORDS`` plus the named word, so a quoted word outside the world
    vocabulary is still judged (as the world would draw it, clipped to the canvas).
    """

    name = "word"
    attribute = "word"

    def __init__(self, temperature: float = 0.05, max_shift: int = 8):
        self.temperature, self.max_shift = temperature, max_shift

    def fidelity(self, images, named):
        if images.shape[-2:] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            # the templates are world renders: compare at the world's resolution
            images = F.interpolate(images, size=(world.IMAGE_SIZE,) * 2, mode="bilinear",
                                   antialias=True, align_corners=False)
        candidates = list(world.WORDS) + sorted({w for w in named if w not in world.WORDS})
        templates = word_templates(candidates).to(images.device)
        ncc = max_normalized_cross_correlation(images.mean(dim=1), templates, self.max_shift)
        target = torch.tensor([candidates.index(w) for w in named], device=images.device)
        # each image competes against the world words and its own word only
        own = F.one_hot(target, len(candidates)).bool()
        allowed = own.clone()
        allowed[:, :len(world.WORDS)] = True
        logits = (ncc / self.temperature).masked_fill(~allowed, float("-inf"))
        probability = torch.softmax(logits, dim=1).gather(1, target.view(-1, 1)).squeeze(1)
        return probability * ncc.gather(1, target.view(-1, 1)).squeeze(1)


class BackgroundFidelity(_WorldReward):
    """Share of the image border (``width`` pixels) that shows the named background colour."""

    name = "background"
    attribute = "background"

    def __init__(self, width: int = 3, sigma: float = COLOR_SIGMA):
        self.width, self.sigma = width, sigma
        self.names, self.palette, _ = world_palette()

    def fidelity(self, images, named):
        frame = srgb_to_lab(border_pixels(images, self.width).unsqueeze(-1))   # [B, 3, P, 1]
        probabilities = colour_probabilities(frame, self.palette, self.sigma)  # [B, N, P, 1]
        target = torch.tensor([self.names.index(b) for b in named], device=images.device)
        share = probabilities.mean(dim=(2, 3))
        return share.gather(1, target.view(-1, 1)).squeeze(1)


class Centering(Reward):
    """Composition: how close the subject's centroid is to the image centre, in [0, 1].

    exp(−d² / 2σ²) · a / (a + a₀), with d the distance (pixels at the world's 64 px) from the
    foreground mask's centroid to the centre, σ = ``sigma`` and a the mask's area; a₀ =
    ``min_area`` of the image keeps an empty image (no subject) near 0. The mask is the one
    `shape` uses (pixels that differ from the border's median colour), so the reward judges any
    prompt — a global, aesthetic-like composition score (a centred subject), not a fidelity one.
    World renders jitter their subject ±5 px, so a clean render scores 0.2–1 and a centred one ≈ 1.
    ``size`` area-resizes images to the world's resolution first (None keeps theirs).
    """

    name = "centering"
    batch_size = 256

    def __init__(self, sigma: float = 4.0, min_area: float = 0.002, threshold: float = 25.0,
                 size: int | None = world.IMAGE_SIZE):
        if sigma <= 0 or min_area <= 0:
            raise MarbleError(f"reward 'centering': sigma and min_area must be > 0, got sigma={sigma}, "
                              f"min_area={min_area}; pass e.g. --reward-opt centering.sigma=4")
        self.sigma, self.min_area, self.threshold, self.size = sigma, min_area, threshold, size

    def score(self, images, prompts):
        images = area_resize(images.float().clamp(0, 1), self.size)
        mask = foreground_mask(srgb_to_lab(images), threshold=self.threshold, softness=MASK_SOFTNESS)
        # the soft mask's floor (a pixel equal to the background still gets sigmoid(−threshold /
        # softness) ≈ 0.2 %) would add up to a centred phantom subject on a flat image
        floor = torch.sigmoid(torch.tensor(-self.threshold / MASK_SOFTNESS))
        mask = ((mask - floor) / (1 - floor)).clamp_min(0)
        h, w = mask.shape[-2:]
        area, cy, cx = mask_moments(mask)
        # distances in pixels of the world's 64 px canvas, whatever the resolution
        squared = ((cx - w / 2) * world.IMAGE_SIZE / w) ** 2 + ((cy - h / 2) * world.IMAGE_SIZE / h) ** 2
        presence = area / (area + self.min_area * h * w)
        return (torch.exp(-squared / (2 * self.sigma**2)) * presence).cpu()


@hookimpl
def register_rewards(register):
    register("color", ColorFidelity,
             description="World prompts: share of the coloured pixels with the named colour "
                         "(NaN without a colour; offline).")
    register("shape", ShapeFidelity,
             description="World prompts: silhouette vs shape templates, softmax-IoU margin "
                         "(NaN without a shape; offline).")
    register("word", WordFidelity,
             description="World prompts: cross-correlation with rendered words, an OCR analogue "
                         "at 64 px (NaN without quoted text; offline).")
    register("background", BackgroundFidelity,
             description="World prompts: share of the border with the named background colour "
                         "(NaN without a background; offline).")
    register("centering", Centering,
             description="Composition: the subject's centroid near the image centre, in [0, 1] "
                         "(any prompt; offline).")
