"""`pickscore`: PickScore v1 (a CLIP-H fine-tuned on Pick-a-Pic human preferences).

Score = ``logit_scale.exp() · cos(image, text)`` as in the PickScore reference (≈ 18–23 for
typical images); ``scale="flow-grpo"`` divides by 26 like Flow-GRPO to land near [0, 1].
Weights: the transformers directory of https://huggingface.co/yuvalkirstain/PickScore_v1
(``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``); the tokenizer comes from the
processor repo ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (or the model directory if it has one).
Images: shortest side resized to 224, center crop, OpenAI CLIP mean/std (CLIPProcessor's steps).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.weights import WeightsSpec, resolve_weights
from marble_plugins.rewards._clip import (
    TOKENIZER_SPEC,
    ClipCosineReward,
    TransformersClip,
    load_clip_tokenizer,
    load_pretrained,
    torch_dtype,
)

PICKSCORE_WEIGHTS = WeightsSpec(
    reward="pickscore",
    filename="config.json",
    option="weights",
    env_var="MARBLE_PICKSCORE_PATH",
    source="https://huggingface.co/yuvalkirstain/PickScore_v1",
    hf_repo="yuvalkirstain/PickScore_v1",
    kind="dir",
)
FLOW_GRPO_DIVISOR = 26.0  # Flow-GRPO's pickscore_scorer divides the raw score by 26
SCALES = ("raw", "flow-grpo")


def _tokenizer_dir(model_dir: Path, tokenizer: str | None) -> Path:
    """Explicit option, else the model directory if it carries a tokenizer, else the processor repo."""
    if not tokenizer and (model_dir / TOKENIZER_SPEC.filename).is_file():
        return model_dir
    return resolve_weights(replace(TOKENIZER_SPEC, reward="pickscore"), tokenizer)


def build_pickscore(weights: str | None = None, tokenizer: str | None = None, scale: str = "raw",
                    device: str = "cpu", dtype: str = "float32", batch_size: int = 16
                    ) -> ClipCosineReward:
    """Load PickScore; missing weights or tokenizer raise here, before any training starts.

    Args:
        weights: PickScore_v1 directory (else ``MARBLE_PICKSCORE_PATH`` or the HF cache).
        tokenizer: CLIP tokenizer directory (else the model dir, ``MARBLE_CLIP_TOKENIZER`` or the
            HF cache of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        scale: ``raw`` (reference) or ``flow-grpo`` (raw / 26).
    """
    if scale not in SCALES:
        raise MarbleError(
            f"pickscore: scale {scale!r} is unknown; use raw or flow-grpo "
            "(--reward-opt pickscore.scale=flow-grpo)"
        )
    from transformers import CLIPModel

    model_dir = resolve_weights(PICKSCORE_WEIGHTS, weights)
    tokenizer_obj = load_clip_tokenizer(_tokenizer_dir(model_dir, tokenizer))
    model = load_pretrained(CLIPModel, model_dir, "pickscore", PICKSCORE_WEIGHTS.source)
    factor = float(model.logit_scale.detach().exp())
    if scale == "flow-grpo":
        factor /= FLOW_GRPO_DIVISOR
    model.to(torch_dtype(dtype, "pickscore"))
    return ClipCosineReward("pickscore", TransformersClip(model, tokenizer_obj), preprocess="crop",
                            scale=factor, batch_size=batch_size, device=device)


@hookimpl
def register_rewards(register):
    register("pickscore", build_pickscore,
             description="PickScore v1 human preference (CLIP-H; needs yuvalkirstain/PickScore_v1).")
