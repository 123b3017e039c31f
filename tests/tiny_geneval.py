"""A tiny GenEval detector and colour classifier for the tests (importable as MODULE:FACTORY).

Images are solid rectangles on black. The detector finds each 4-connected blob of lit pixels
(scipy.ndimage.label) and reports its box (x1, y1, x2, y2 inclusive pixels), its mask and a
class from its shape: wider than 1.5× its height a "car", taller than 1.5× its width a
"bottle", else a "dog"; confidence 0.95, or 0.5 for a blob under 20 pixels (kept by GenEval's
0.3 threshold, dropped by the 0.9 of counting prompts). The colour of a crop is the palette
colour nearest to the mean of its non-grey pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

PALETTE = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0)}


def detect(images: torch.Tensor) -> list[dict]:
    results = []
    for image in images:
        lit = (image.max(dim=0).values > 0.1).numpy()
        labels, _ = ndimage.label(lit)
        boxes, names, scores, masks = [], [], [], []
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            rows, cols = found
            height, width = rows.stop - rows.start, cols.stop - cols.start
            boxes.append([cols.start, rows.start, cols.stop - 1, rows.stop - 1])
            names.append("car" if width > 1.5 * height else "bottle" if height > 1.5 * width else "dog")
            mask = labels == index
            scores.append(0.95 if mask.sum() >= 20 else 0.5)
            masks.append(mask)
        results.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": names,
                        "scores": torch.tensor(scores), "masks": torch.from_numpy(np.array(masks, dtype=bool))
                        if masks else torch.zeros(0, *image.shape[-2:], dtype=torch.bool)})
    return results


def classify(crops: list[torch.Tensor], classname: str) -> list[str]:
    names = list(PALETTE)
    palette = torch.tensor([PALETTE[n] for n in names])
    colors = []
    for crop in crops:
        pixels = crop.reshape(3, -1).T
        pixels = pixels[(pixels - 0x99 / 255).abs().max(dim=1).values > 0.02]  # not the grey backdrop
        mean = pixels.mean(0) if len(pixels) else torch.zeros(3)
        colors.append(names[int((palette - mean).norm(dim=1).argmin())])
    return colors


def build_detector():
    return detect


def build_colors():
    return classify


def canvas(*rectangles: tuple[int, int, int, int, str], size: int = 32) -> torch.Tensor:
    """A [3, size, size] image: each (x, y, width, height, colour) a solid rectangle on black."""
    image = torch.zeros(3, size, size)
    for x, y, width, height, color in rectangles:
        image[:, y:y + height, x:x + width] = torch.tensor(PALETTE[color]).view(3, 1, 1)
    return image
