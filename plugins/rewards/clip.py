"""`clip`: CLIP text–image cosine similarity (CLIPScore without the 2.5·max(·, 0) rescaling).

Weights, either format:
* a transformers CLIP directory (``config.json`` + weights), e.g. ``openai/clip-vit-large-patch14``
  — the default, also found in the local Hugging Face cache;
* an open_clip checkpoint file (state dict, optionally under ``"state_dict"``) for the
  architecture ``model`` trained as ``pretrained`` (``openai`` tags use QuickGELU).
Images are resized on their shortest side and center-cropped the way the reference (Flow-GRPO's
CLIP scorer: torchvision ``Resize(224)`` + ``CenterCrop(224)`` on tensors) does: bilinear with
antialiasing, crop offset rounded.
"""

from __future__ import annotations

from pathlib import Path

from marble_kit.hookspecs import hookimpl
from marble_kit.weights import WeightsSpec, load_checkpoint, resolve_weights, state_dict_from
from marble_plugins.rewards._clip import (
    ClipCosineReward,
    ClipEncoders,
    TransformersClip,
    load_clip_tokenizer,
    load_pretrained,
    open_clip_encoders,
    torch_dtype,
)

# (open_clip model, pretrained tag) → Hugging Face repo holding the same weights in HF format.
HF_REPOS = {
    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
    ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
    ("ViT-H-14", "laion2b_s32b_b79k"): "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ("ViT-L-14", "laion2b_s32b_b82k"): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
}


def clip_weights_spec(model: str, pretrained: str) -> WeightsSpec:
    repo = HF_REPOS.get((model, pretrained.lower()))
    return WeightsSpec(
        reward="clip",
        filename="config.json",
        option="weights",
        env_var="MARBLE_CLIP_WEIGHTS",
        source=f"https://huggingface.co/{repo}" if repo else "https://github.com/mlfoundations/open_clip",
        hf_repo=repo,
        kind="dir",
    )


def _is_transformers_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _resolve(weights: str | None, model: str, pretrained: str) -> Path:
    """An explicit file is an open_clip checkpoint; directories and the cache are HF format."""
    if weights and Path(weights).expanduser().is_file():
        return Path(weights).expanduser()
    return resolve_weights(clip_weights_spec(model, pretrained), weights)


def _transformers_encoders(path: Path, tokenizer: str | None) -> ClipEncoders:
    from transformers import CLIPModel

    model = load_pretrained(CLIPModel, path, "clip", "https://huggingface.co/openai/clip-vit-large-patch14")
    return TransformersClip(model, load_clip_tokenizer(Path(tokenizer) if tokenizer else path))


def build_clip(weights: str | None = None, model: str = "ViT-L-14", pretrained: str = "openai",
               tokenizer: str | None = None, backend: str = "auto", device: str = "cpu",
               dtype: str = "float32", batch_size: int = 16) -> ClipCosineReward:
    """Load a CLIP; missing weights raise here, before any training starts.

    Args:
        weights: transformers CLIP directory or open_clip checkpoint file (else
            ``MARBLE_CLIP_WEIGHTS`` or the HF cache of the repo matching model/pretrained).
        model, pretrained: open_clip architecture and pretraining tag (``openai`` → QuickGELU).
        tokenizer: CLIP tokenizer directory for open_clip checkpoints without open_clip.
    """
    path = _resolve(weights, model, pretrained)
    if _is_transformers_dir(path):
        encoders = _transformers_encoders(path, tokenizer)
    else:
        state = state_dict_from(load_checkpoint(path, "clip"), path, "clip")
        encoders = open_clip_encoders(state, model, pretrained, backend, tokenizer, "clip")
    encoders.module.to(torch_dtype(dtype, "clip"))
    return ClipCosineReward("clip", encoders, preprocess="crop-torchvision", batch_size=batch_size,
                            device=device)


@hookimpl
def register_rewards(register):
    register("clip", build_clip,
             description="CLIP text-image cosine (default ViT-L/14 openai; HF dir or open_clip file).")
