"""Record what the reference libraries output for tricky reward inputs (reward_references.json).

tests/test_reward_parity.py compares marble-kit's reward code against this file. The references
are the libraries themselves, run here once, not re-implementations:

* open_clip's tokenizer (``open_clip.tokenizer.SimpleTokenizer``, open_clip_torch 3.3.0) with
  the BPE merges of tests/tiny_clip.py written as an open_clip BPE file: token ids of prompts
  with curly quotes, HTML entities, full-width letters, ligatures, mojibake, odd whitespace;
* torchvision's ``Resize(size)`` + ``CenterCrop(size)`` + ``Normalize`` on float tensors
  (torchvision 0.28.0; Flow-GRPO's CLIP scorer), and transformers' ``CLIPImageProcessorPil``
  (PickScore's and the aesthetic predictor's processor, without torchvision) on the same images,
  at sizes whose crop margins are odd;
* Flow-GRPO's OCR scoring rule (flow_grpo/ocr.py: ``prompt.split('"')[1]``, spaces removed,
  lowercased, containment, ``Levenshtein.distance`` capped at the target length) with the
  ``Levenshtein`` package (0.27.5) for the distance. PaddleOCR itself does not run here: the
  cases give the text its English model would read and, for the NFKC cases, the full-width
  text RapidOCR's Chinese-dictionary model emits for the same image.

None of these packages is a marble-kit dependency (torchvision's PyPI wheels are CUDA builds). To
re-record, unpack the wheels into a directory and put it first on the path::

    pip download --no-deps -d wheels open_clip_torch==3.3.0 torchvision==0.28.0 levenshtein==0.27.5 \\
        rapidfuzz==3.14.6
    for w in wheels/*.whl; do python -m zipfile -e "$w" refsite; done
    PYTHONPATH=refsite .venv/bin/python tests/reference/record_reward_references.py

(torchvision's compiled operators do not load beside the CPU torch wheel; the transforms used
here are plain tensor code, so the script skips the module that registers those operators.)
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "reward_references.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

PROMPTS = [
    "a photo of the red cat",
    'a sign that says “open” on a door',                 # curly double quotes
    "it’s the dog’s ball",                               # curly apostrophes
    "cats &amp; dogs",
    "&lt;b&gt;bold&lt;/b&gt; and &amp;amp; twice",       # entities, one double-escaped
    "ＦＵＬＬ－ＷＩＤＴＨ ｔｅｘｔ １２３",                 # full-width forms
    "ﬁne ﬂowers in a ﬁeld",                             # ligatures
    "a cafÃ© sign",                                     # mojibake (UTF-8 read as Latin-1)
    "  tabs\tand\nnewlines   and\u00a0no-break  spaces  ",
    "Upper CASE Photo Of The Blue Dog",
    "e\u0301clair and cafe&#x301;",                      # combining accents, one from an entity
    "a 🐱 cat and a zero\u200bwidth space",
    "",
    "dog " * 100,                                        # longer than 77 tokens: truncated
]

# (height, width) → resized (shortest side = SIZE) and center-cropped to SIZE × SIZE. Several
# have odd margins: (18, 31) → 16 × 27 (margin 11), (21, 41) → 16 × 31 (margin 15).
SIZE = 16
IMAGE_SIZES = [(18, 31), (31, 18), (21, 41), (41, 21), (26, 35), (24, 24), (48, 20), (16, 16)]

# (prompt, text the reference's English PaddleOCR reads, text RapidOCR emits for that image)
OCR_CASES = [
    ('a sign that says "Open"', "OPEN", "OPEN"),
    ('a sign that says "Open Late', "OPEN LATE", "OPEN LATE"),               # unclosed quote
    ('a neon sign "open late tonight', "OPENLATE", "OPENLATE"),              # unclosed, partial
    ('a poster "cat" next to "dog"', "DOG CAT", "DOG CAT"),                 # first quotes only
    ('a shop sign "Café Nord"', "CAFENORD", "CAFENORD"),
    ('a sign that says "open"', "OPEN", "ＯＰＥＮ"),                         # full-width forms
    ('a label "A2"', "A2", "Ａ２"),
    ('a menu "fish"', "fish", "ﬁsh"),                                         # ligature
    ('a sign "Hello World"', "he llo\tworld", "he llo\tworld"),              # only spaces removed
    ('a banner "MARBLE"', "", ""),
    ('a banner "MARBLE"', "a marble banner MARBLE kit", "a marble banner MARBLE kit"),
    ('a sign "stop"', "SOTP", "SOTP"),
]


def image_pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic noise image, uint8 [H, W, 3] (a hash of the pixel coordinates)."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    value = np.sin(x * 12.9898 + y * 78.233 + c * 37.719 + seed * 4.1414) * 43758.5453
    return np.round((value - np.floor(value)) * 255).astype(np.uint8)


def record_tokens() -> dict:
    sys.path.insert(0, str(HERE.parent))
    from open_clip.tokenizer import SimpleTokenizer
    from tiny_clip import tiny_vocab_and_merges

    vocab, merges = tiny_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "tiny_bpe.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as handle:
            handle.write("#version: tiny\n" + "\n".join(f"{a} {b}" for a, b in merges))  # no final newline
        tokenizer = SimpleTokenizer(bpe_path=str(bpe))
    assert tokenizer.vocab_size == len(vocab), "the open_clip vocabulary must be the tiny one"
    ids = tokenizer(PROMPTS, context_length=77)
    rows = []
    for prompt, row in zip(PROMPTS, ids.tolist()):
        while row and row[-1] == 0:
            row.pop()
        rows.append({"prompt": prompt, "ids": row, "cleaned": tokenizer.clean_fn(prompt)})
    return {"library": "open_clip_torch 3.3.0", "context_length": 77, "prompts": rows}


def record_preprocessing() -> dict:
    import torchvision
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPImageProcessorPil

    torchvision_pipeline = transforms.Compose([transforms.Resize(SIZE), transforms.CenterCrop(SIZE),
                                               transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                      image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    rows = []
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        pixels = image_pattern(height, width, seed)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        by_torchvision = torchvision_pipeline(tensor[None])[0]
        by_processor = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
        rows.append({"height": height, "width": width, "seed": seed,
                     "torchvision": by_torchvision.tolist(), "clip_image_processor": by_processor.tolist()})
    import transformers

    return {"libraries": f"torchvision {torchvision.__version__}, transformers {transformers.__version__} "
                         "CLIPImageProcessorPil", "size": SIZE, "images": rows}


def flow_grpo_ocr_reward(recognized: str, prompt: str) -> float:
    """flow_grpo/ocr.py's rule, distance from the Levenshtein package."""
    from Levenshtein import distance

    target = prompt.split('"')[1].replace(" ", "").lower()
    recognized = recognized.replace(" ", "").lower()
    dist = 0 if target in recognized else distance(recognized, target)
    return 1 - min(dist, len(target)) / len(target)


def record_ocr() -> dict:
    rows = [{"prompt": prompt, "english_engine": english, "rapidocr": rapid,
             "reward": flow_grpo_ocr_reward(english, prompt)} for prompt, english, rapid in OCR_CASES]
    assert all(math.isfinite(row["reward"]) for row in rows)
    return {"library": "Levenshtein 0.27.5 (distance); rule of flow_grpo/ocr.py", "cases": rows}


def _compact(value):
    """Floats to 7 significant digits (float32 precision), so the file stays small."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def _dump(record: dict) -> str:
    """Indented JSON, but every list of numbers on one line."""
    text = json.dumps(_compact(record), indent=1, ensure_ascii=False)
    return re.sub(r"\[[\d\s,.eE+-]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


def main() -> None:
    # transformers imports torchvision when it is on the path: skip its operator registrations
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    record = {"tokens": record_tokens(), "preprocessing": record_preprocessing(), "ocr": record_ocr()}
    OUT.write_text(_dump(record) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
