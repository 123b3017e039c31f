"""`hps`: Human Preference Score v2.1 (open_clip ViT-H-14 fine-tuned on human preferences).

Score = cosine between the L2-normalized image and prompt embeddings (no logit scale), as in
HPSv2's ``img_score``. Weights: ``HPS_v2.1_compressed.pt`` from https://huggingface.co/xswu/HPSv2
(``checkpoint["state_dict"]`` is an open_clip ViT-H-14 state dict). Without open_clip the state
dict is converted to a transformers CLIPModel and tokenized with the CLIP BPE tokenizer.
Images are resized on their longest side to 224 and padded (HPSv2's ``ResizeMaxSize``).
"""

from __future__ import annotations

from marble_kit.hookspecs import hookimpl
from marble_kit.weights import WeightsSpec, load_checkpoint, resolve_weights, state_dict_from
from marble_plugins.rewards._clip import ClipCosineReward, open_clip_encoders, torch_dtype

HPS_WEIGHTS = WeightsSpec(
    reward="hps",
    filename="HPS_v2.1_compressed.pt",
    option="weights",
    env_var="MARBLE_HPS_WEIGHTS",
    source="https://huggingface.co/xswu/HPSv2",
    hf_repo="xswu/HPSv2",
)


def build_hps(weights: str | None = None, tokenizer: str | None = None, model: str = "ViT-H-14",
              backend: str = "auto", device: str = "cpu", dtype: str = "float32",
              batch_size: int = 16) -> ClipCosineReward:
    """Load HPS v2.1; every missing file is reported here, before any training starts.

    Args:
        weights: path to ``HPS_v2.1_compressed.pt`` (else ``MARBLE_HPS_WEIGHTS`` or the HF cache).
        tokenizer: CLIP tokenizer directory (only without open_clip; else
            ``MARBLE_CLIP_TOKENIZER`` or the cache of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        model: open_clip architecture name of the checkpoint.
        backend: ``auto`` (open_clip when importable), ``open_clip`` or ``transformers``.
    """
    path = resolve_weights(HPS_WEIGHTS, weights)
    state = state_dict_from(load_checkpoint(path, "hps"), path, "hps")
    encoders = open_clip_encoders(state, model, None, backend, tokenizer, "hps")
    encoders.module.to(torch_dtype(dtype, "hps"))
    return ClipCosineReward("hps", encoders, preprocess="pad", batch_size=batch_size, device=device)


@hookimpl
def register_rewards(register):
    register("hps", build_hps,
             description="HPS v2.1 human preference (open_clip ViT-H-14; needs HPS_v2.1_compressed.pt).")
