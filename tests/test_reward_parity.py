"""The reward models' text and image handling against the reference libraries' recorded outputs.

tests/reference/reward_references.json was written by tests/reference/record_reward_references.py
with open_clip's tokenizer, torchvision's transforms, transformers' CLIPImageProcessor (PIL) and
the Levenshtein package — none of which marble-kit uses at run time. The inputs are the tricky
ones: curly quotes, HTML entities, full-width letters, ligatures, mojibake, odd whitespace, crop
margins of odd size, unclosed quotes, full-width OCR output.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from marble_kit.rewards import quoted_text
from marble_plugins.rewards import _clip
from marble_plugins.rewards.ocr import OcrReward, ocr_text_reward

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "reference"))
from record_reward_references import image_pattern  # noqa: E402
from tiny_clip import tiny_tokenizer  # noqa: E402

REFERENCES = json.loads((HERE / "reference" / "reward_references.json").read_text())
TOKENS = REFERENCES["tokens"]["prompts"]
IMAGES = REFERENCES["preprocessing"]["images"]
OCR = REFERENCES["ocr"]["cases"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("row", TOKENS, ids=[repr(row["prompt"][:24]) for row in TOKENS])
def test_converted_clip_tokens_match_open_clip(tokenizer, row):
    """The converted-CLIP path (hps / clip without open_clip) gives open_clip's token ids."""
    ids = _clip.open_clip_token_ids(tokenizer, [row["prompt"]])[0].tolist()
    assert ids[:len(row["ids"])] == row["ids"] and not any(ids[len(row["ids"]):])


def test_the_cleaning_is_what_makes_the_tricky_prompts_match(tokenizer):
    """Without open_clip's cleaning, transformers' tokenizer gives other ids for most of them."""
    differ = 0
    for row in TOKENS:
        raw = tokenizer([row["prompt"]], add_special_tokens=True, truncation=False)["input_ids"][0][:77]
        differ += raw != row["ids"]
    assert differ >= 8


def _image(row) -> torch.Tensor:
    pixels = image_pattern(row["height"], row["width"], row["seed"])
    return torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255


@pytest.mark.parametrize("row", IMAGES, ids=[f"{row['height']}x{row['width']}" for row in IMAGES])
def test_clip_preprocessing_matches_torchvision_resize_and_center_crop(row):
    """`clip` (Flow-GRPO's scorer: torchvision Resize + CenterCrop on tensors): bilinear with
    antialiasing, crop offset round(margin / 2) — equal to float precision."""
    ours = _clip.clip_pixels(_image(row), REFERENCES["preprocessing"]["size"], "crop-torchvision")[0]
    torch.testing.assert_close(ours, torch.tensor(row["torchvision"]), atol=2e-6, rtol=0)


@pytest.mark.parametrize("row", IMAGES, ids=[f"{row['height']}x{row['width']}" for row in IMAGES])
def test_pickscore_and_aesthetic_preprocessing_match_clip_image_processor(row):
    """PickScore / aesthetic (CLIPImageProcessor): bicubic, crop offset margin // 2. PIL resamples
    uint8 images with 8-bit intermediates, so values agree to a fraction of a grey level on
    average; a crop one pixel off (round instead of floor on an odd margin) is ~2 units off."""
    ours = _clip.clip_pixels(_image(row), REFERENCES["preprocessing"]["size"], "crop")[0]
    difference = (ours - torch.tensor(row["clip_image_processor"])).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.25


@pytest.mark.parametrize("case", OCR, ids=[repr(case["prompt"][:24]) for case in OCR])
def test_ocr_reward_matches_flow_grpo(case):
    """The reference's score of what its English engine reads; ours of what RapidOCR emits for
    the same image (full-width forms and ligatures from its Chinese dictionary, NFKC-mapped)."""
    target = quoted_text(case["prompt"])
    assert ocr_text_reward(case["rapidocr"], target) == pytest.approx(case["reward"], abs=1e-6)


class _Engine:
    """A stand-in for RapidOCR: returns ``texts`` in order; raises for the marked images."""

    def __init__(self, texts):
        self.texts = list(texts)

    def __call__(self, image, use_cls=False):
        text = self.texts.pop(0)
        if isinstance(text, Exception):
            raise text
        return ([[None, text, 0.9]] if text else None), None


def test_an_engine_error_on_one_image_scores_it_nan_warns_and_counts():
    reward = OcrReward(_Engine(["OPEN", RuntimeError("onnxruntime: bad input"), "ＬＡＴＥ"]))
    images = torch.rand(4, 3, 8, 8)
    prompts = ['a sign "open"', 'a sign "closed"', "no quotes here", 'a sign "late']
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = reward(images, prompts)
    assert scores[0] == 1.0 and math.isnan(scores[1]) and math.isnan(scores[2]) and scores[3] == 1.0
    assert len(caught) == 1 and "OCR engine failed on an image (RuntimeError: onnxruntime" in str(caught[0].message)
    assert reward.metrics == {"failures": 1.0} and reward.failures == 1
    reward.engine = _Engine(["OPEN"])
    reward(images[:1], prompts[:1])
    assert reward.metrics == {"failures": 0.0} and reward.failures == 1  # per call / in all


def test_quoted_text_follows_the_reference_split():
    for prompt in ['a "cat" and "dog"', 'a "cat', 'no quotes', '""', 'a “curly” sign', 'end "']:
        reference = prompt.split('"')[1] if '"' in prompt else None
        assert quoted_text(prompt) == reference


def test_reward_counters_reach_the_metrics_line():
    """`marble train` adds a reward's per-call counters to the step's metrics (rank-summed)."""
    from types import SimpleNamespace

    from marble_kit.distributed import Distributed
    from marble_kit.rewards import as_reward
    from marble_kit.run import reward_metrics

    ocr = OcrReward(_Engine([RuntimeError("x"), "OPEN"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ocr(torch.rand(2, 3, 8, 8), ['a "open"', 'a "open"'])
    plain = as_reward(lambda images, prompts: images.mean(dim=(1, 2, 3)), "plain")
    trainer = SimpleNamespace(reward_names=["ocr", "plain"], rewards=[ocr, plain], dist=Distributed())
    assert reward_metrics(trainer) == {"reward_failures/ocr": 1.0}
