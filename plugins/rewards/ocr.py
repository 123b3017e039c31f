"""`ocr`: does the image show the text quoted in the prompt? (Flow-GRPO's OCR reward)

The engine is RapidOCR (PP-OCRv4 detection + recognition as ONNX models inside the
``rapidocr_onnxruntime`` wheel — nothing to download), with the angle classifier off (it flips
small text upside down) and one ONNX thread per session.

target = text inside the prompt's first pair of double quotes (an unclosed quote: the rest of
         the prompt), lowercased, spaces removed;
found  = all recognized text, NFKC-normalized, lowercased, spaces removed;
dist   = 0 if target occurs in found, else min(Levenshtein(found, target), len(target));
reward = 1 − dist / len(target).  A prompt without quoted text gets NaN (not applicable).

NFKC: RapidOCR's recognizer carries PP-OCR's Chinese dictionary, which also holds full-width
forms (``ＯＰＥＮ``, ``２``) and ligatures; the reference's English PaddleOCR model cannot emit
them. NFKC maps them to the ASCII the reference would read (and leaves ASCII alone).

An engine exception on one image scores that image NaN (not judged this step) with a warning;
``failures`` counts such images (``reward_failures/ocr`` in metrics.jsonl) and the run goes on.
"""

from __future__ import annotations

import math
import unicodedata
import warnings
from typing import Any

import numpy as np
import torch

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward, quoted_text


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _squash(text: str) -> str:
    return text.replace(" ", "").lower()  # the reference removes spaces only, then lowercases


def ocr_text_reward(found: str, target: str) -> float:
    """Flow-GRPO's reward for recognized text ``found`` (NFKC-normalized first) against the
    quoted ``target``."""
    target, found = _squash(target), _squash(unicodedata.normalize("NFKC", found))
    if not target:
        return math.nan
    distance = 0 if target in found else min(levenshtein(found, target), len(target))
    return 1.0 - distance / len(target)


def _to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] → H×W×3 uint8 BGR (what RapidOCR expects of arrays)."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(pixels[..., ::-1])


class OcrReward(Reward):
    """Edit-distance reward of the recognized text against the prompt's quoted text."""

    name = "ocr"

    def __init__(self, engine: Any, batch_size: int = 8):
        self.engine, self.batch_size = engine, batch_size
        self.failures = 0       # images the engine failed on, in all calls
        self.last_failures = 0  # … in the last call (one training step)

    def recognize(self, image: torch.Tensor) -> str:
        """All text the engine finds in one image, concatenated in reading order."""
        result, _ = self.engine(_to_bgr_uint8(image), use_cls=False)
        return "".join(line[1] for line in result or [])

    def __call__(self, images, prompts):
        self.last_failures = 0
        return super().__call__(images, prompts)

    @property
    def metrics(self) -> dict[str, float]:
        """Per-call counters the training loop logs (``reward_failures/ocr``)."""
        return {"failures": float(self.last_failures)}

    def score(self, images, prompts):
        scores = []
        for image, prompt in zip(images, prompts, strict=True):
            target = quoted_text(prompt)
            if target is None or not _squash(target):
                scores.append(math.nan)  # nothing to read: the reward does not apply
                continue
            try:
                found = self.recognize(image)
            except Exception as exc:  # one unreadable image must not end a run
                self.failures += 1
                self.last_failures += 1
                warnings.warn(f"reward 'ocr': the OCR engine failed on an image ({type(exc).__name__}: "
                              f"{str(exc)[:100]}); it scores NaN (not judged) and training goes on "
                              "(counted in reward_failures/ocr)", RuntimeWarning, stacklevel=2)
                scores.append(math.nan)
                continue
            scores.append(ocr_text_reward(found, target))
        return torch.tensor(scores, dtype=torch.float32)


def build_ocr(threads: int = 1, text_score: float = 0.5, batch_size: int = 8) -> OcrReward:
    """Start the RapidOCR engine (its models ship in the wheel).

    Args:
        threads: ONNX intra-op threads per session (1 is steady on small CPUs).
        text_score: minimum recognition confidence for a text line to count.
    """
    if threads < 1:
        raise MarbleError(f"ocr: threads={threads} must be >= 1 (--reward-opt ocr.threads=1)")
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise MarbleError(
            f"ocr: the OCR engine does not import ({exc}); `pip install 'rapidocr_onnxruntime>=1.4,<1.5'`"
        ) from exc
    engine = RapidOCR(use_cls=False, intra_op_num_threads=threads, inter_op_num_threads=1,
                      text_score=text_score)
    return OcrReward(engine, batch_size=batch_size)


@hookimpl
def register_rewards(register):
    register("ocr", build_ocr,
             description="Quoted prompt text rendered correctly (RapidOCR PP-OCRv4; NaN without quotes).")
