"""A tiny random FLUX.1 for the CPU tests, saved the way FLUX.1 ships (``FluxPipeline.save_pretrained``)
and loaded through the `flux` policy's own loader, like a downloaded FLUX.1-dev.

FLUX.1-dev's layout at toy widths: one dual-stream and one single-stream block (heads 2 × 8, the
rotary axes split 2 + 2 + 4), the distilled guidance input, FLUX's 16-channel VAE latents with its
scale and shift (two VAE blocks: 32 px images, 16 × 16 latents, 64 image tokens) and FLUX.1-dev's
scheduler (dynamic shift). Text: random one-layer CLIP and T5 encoders over the world's words.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from marble_plugins.policies import flux
from marble_plugins.policies.flow_matching import quiet_loading

TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
TINY_FLUX_VAE = dict(flux.FLUX_VAE_CONFIG, down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                     norm_num_groups=4, sample_size=32)
SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
# The options a user passes for this model on a CPU (`--policy-opt` of `marble train`).
TINY_FLUX_OPTIONS = {"device": "cpu", "mixed_precision": "no", "gradient_checkpointing": False,
                     "offload_vae": False, "offload_text_encoders": False, "resolution": 32, "steps": 3,
                     "max_sequence_length": 12, "rank": 4, "threads": 1}
PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           'a sign that says "cat" on a gray background', "a green triangle on a white background"]


def tiny_flux_pipeline(seed: int = 0, schnell: bool = False):
    """The tiny FluxPipeline with random weights (``schnell``: no guidance input, fixed shift)."""
    transformer = dict(TINY_FLUX_TRANSFORMER, guidance_embeds=not schnell)
    scheduler = SCHNELL_SCHEDULER if schnell else flux.FLUX_DEV_SCHEDULER_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return flux.random_flux_pipeline(transformer, TINY_FLUX_VAE, scheduler)


def save_tiny_flux(directory: Path, seed: int = 0) -> Path:
    """``save_pretrained`` of :func:`tiny_flux_pipeline`; the T5 tokenizer recorded under the
    class name every transformers version knows (transformers 5 writes `TokenizersBackend`)."""
    with quiet_loading():  # no "Writing model shards" bars
        tiny_flux_pipeline(seed).save_pretrained(directory)
    for file, key in ((directory / "model_index.json", "tokenizer_2"),
                      (directory / "tokenizer_2" / "tokenizer_config.json", "tokenizer_class")):
        settings = json.loads(file.read_text())
        settings[key] = ["transformers", "PreTrainedTokenizerFast"] if key == "tokenizer_2" \
            else "PreTrainedTokenizerFast"
        file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return directory


def policy_opts(directory: Path, **overrides) -> list[str]:
    """`--policy-opt KEY=VALUE` arguments of `marble train` for the tiny FLUX at ``directory``."""
    options = {"path": directory, **TINY_FLUX_OPTIONS, **overrides}
    text = {key: str(value).lower() if isinstance(value, bool) else value for key, value in options.items()}
    return [arg for key, value in text.items() for arg in ("--policy-opt", f"{key}={value}")]  # TOML values
