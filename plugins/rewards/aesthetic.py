"""`aesthetic`: LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1").

Score = MLP(L2-normalized CLIP ViT-L/14 image embedding), the raw predicted rating (≈ 1–10),
as in DDPO / Flow-GRPO. Two files:
* CLIP: transformers directory of https://huggingface.co/openai/clip-vit-large-patch14
  (only the vision tower and projection are loaded);
* MLP head: ``sac+logos+ava1-l14-linearMSE.pth`` from
  https://github.com/christophschuhmann/improved-aesthetic-predictor (a state dict with keys
  ``layers.{0,2,4,6,7}.{weight,bias}``: Linear 768→1024, Dropout, →128, Dropout, →64, Dropout,
  →16, →1; no activations — the reference comments them out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward
from marble_kit.weights import WeightsSpec, load_checkpoint, resolve_weights, state_dict_from
from marble_plugins.rewards._clip import clip_pixels, load_pretrained, torch_dtype

AESTHETIC_HEAD = WeightsSpec(
    reward="aesthetic",
    filename="sac+logos+ava1-l14-linearMSE.pth",
    option="weights",
    env_var="MARBLE_AESTHETIC_WEIGHTS",
    source="https://github.com/christophschuhmann/improved-aesthetic-predictor",
)
AESTHETIC_CLIP = WeightsSpec(
    reward="aesthetic",
    filename="config.json",
    option="clip",
    env_var="MARBLE_AESTHETIC_CLIP",
    source="https://huggingface.co/openai/clip-vit-large-patch14",
    hf_repo="openai/clip-vit-large-patch14",
    kind="dir",
)
# Indices of the Linear layers inside the reference nn.Sequential (dropouts sit at 1, 3, 5).
LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def aesthetic_mlp(state: dict[str, torch.Tensor]) -> nn.Module:
    """The reference MLP with the sizes of ``state`` (keys ``layers.N.weight`` / ``.bias``)."""
    missing = [f"layers.{i}.weight" for i in LINEAR_INDICES if f"layers.{i}.weight" not in state]
    if missing:
        raise MarbleError(
            f"aesthetic: the MLP checkpoint has no {missing[0]!r}; pass "
            f"{AESTHETIC_HEAD.filename} from {AESTHETIC_HEAD.source}"
        )
    modules: list[nn.Module] = []
    for index in range(LINEAR_INDICES[-1] + 1):
        if index in DROPOUTS:
            modules.append(nn.Dropout(DROPOUTS[index]))
        else:
            out_features, in_features = state[f"layers.{index}.weight"].shape
            modules.append(nn.Linear(in_features, out_features))
    head = nn.Module()
    head.layers = nn.Sequential(*modules)
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


class AestheticReward(Reward):
    """Aesthetic rating of each image (the prompt is ignored)."""

    name = "aesthetic"

    def __init__(self, vision: nn.Module, head: nn.Module, batch_size: int = 16,
                 device: str | torch.device = "cpu"):
        self.vision, self.head, self.batch_size = vision, head, batch_size
        self.image_size = int(vision.config.image_size)
        self.to(device)

    def to(self, device):
        super().to(device)
        self.vision.to(self.device)
        self.head.to(self.device)
        return self

    def score(self, images, prompts):
        pixels = clip_pixels(images, self.image_size, "crop")
        dtype = next(self.vision.parameters()).dtype
        embedding = self.vision(pixel_values=pixels.to(dtype)).image_embeds
        embedding = F.normalize(embedding.float(), dim=-1)
        return self.head.layers(embedding).squeeze(-1)


def build_aesthetic(weights: str | None = None, clip: str | None = None, device: str = "cpu",
                    dtype: str = "float32", batch_size: int = 16) -> AestheticReward:
    """Load the CLIP vision tower and the MLP head; missing files raise here.

    Args:
        weights: the MLP head ``sac+logos+ava1-l14-linearMSE.pth`` (else ``MARBLE_AESTHETIC_WEIGHTS``).
        clip: ``openai/clip-vit-large-patch14`` directory (else ``MARBLE_AESTHETIC_CLIP`` or the HF cache).
    """
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    head_path = resolve_weights(AESTHETIC_HEAD, weights)
    clip_dir = resolve_weights(AESTHETIC_CLIP, clip)
    head = aesthetic_mlp(state_dict_from(load_checkpoint(head_path, "aesthetic"), head_path, "aesthetic"))
    # Only the vision tower + projection of the full CLIPModel checkpoint; the projection size
    # lives in the top-level config (some configs lack it in vision_config).
    try:
        config = CLIPConfig.from_pretrained(str(clip_dir))
    except (OSError, ValueError) as exc:
        raise MarbleError(f"aesthetic: {clip_dir}/config.json is not a CLIP config: {exc}") from exc
    config.vision_config.projection_dim = config.projection_dim
    vision = load_pretrained(CLIPVisionModelWithProjection, clip_dir, "aesthetic",
                             AESTHETIC_CLIP.source, config=config.vision_config)
    projection = vision.config.projection_dim
    if head.layers[0].in_features != projection:
        raise MarbleError(
            f"aesthetic: the MLP expects {head.layers[0].in_features}-d embeddings but the CLIP at "
            f"{clip_dir} gives {projection}-d; use CLIP ViT-L/14 ({AESTHETIC_CLIP.source})"
        )
    vision.to(torch_dtype(dtype, "aesthetic"))
    return AestheticReward(vision, head, batch_size=batch_size, device=device)


@hookimpl
def register_rewards(register):
    register("aesthetic", build_aesthetic,
             description="LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP; needs the .pth head).")
