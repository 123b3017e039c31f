"""FLUX.1 policies on diffusers + peft: `flux` (FLUX.1-dev or -schnell from a local directory)
and `flux-arch` (FLUX.1-dev's architecture with random weights, to time update steps on a GPU).

:class:`FluxPolicy` is the FLUX.1 part of the shared flow-matching base
(:class:`marble_plugins.policies.flow_matching.FlowMatchingPolicy`); what differs from SD3:

* **latents.** FluxTransformer2DModel reads 2×2 patches of the 16-channel VAE latents packed
  into a sequence ([B, h/2·w/2, 64]) with their (0, row, column) position ids, and no text
  positions (zeros). ``Rollout.x0``, ``latent_shape`` and the velocities stay **unpacked**
  ([B, 16, h, w], like SD3): :meth:`FluxPolicy._predict` packs before the transformer and
  unpacks after it, with diffusers' own ``FluxPipeline._pack_latents`` / ``_unpack_latents``.
  Packing is a permutation, so the loss and the trainer's x_t = (1 − t)·x0 + t·ε are the same
  either way, and noise drawn as [B, 16, h, w] is the noise FluxPipeline draws (it packs after
  drawing) — our samples for a generator are the pipeline's.
* **prompts.** CLIP-L's pooled output [B, 768] and T5-XXL's token sequence [B, L, 4096]
  (``max_sequence_length`` L, at most 512), through ``FluxPipeline.encode_prompt``.
* **time and guidance.** The transformer takes t ∈ [0, 1] (it multiplies by 1000 itself). FLUX.1-dev is
  guidance-distilled (``guidance_embeds``): the guidance scale is an input of every forward pass
  — sampling, v_θ, v_old and v_ref alike (as flow_grpo and Flow-Factory train it) — not a second
  pass; FLUX.1-schnell has no such input and ignores ``guidance_scale``. True classifier-free
  guidance (an empty negative prompt, two passes) is ``true_cfg_scale`` > 1, as in FluxPipeline.
* **schedule.** FluxPipeline's sigmas linspace(1, 1/N, N) shifted by the scheduler: FLUX.1-dev
  shifts dynamically with the image's token count (μ = diffusers' ``calculate_shift`` between the
  scheduler's base/max shift over base/max image sequence lengths), schnell by its fixed shift.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_plugins.policies.flow_matching import (
    FlowMatchingPolicy,
    TextCond,
    check_options,
    default_device,
    load_pipeline,
    quietly_imported,
    resolve_model_directory,
)
from marble_plugins.policies.sd3 import SD35_VAE_CONFIG

FLUX_MODEL_ID = "black-forest-labs/FLUX.1-dev"
FLUX_PATH_ENV = "MARBLE_FLUX_PATH"
# The LoRA targets flow_grpo (scripts/train_flux.py) and Flow-Factory (Flux1Adapter) train FLUX.1
# with: the attention projections of both streams — peft matches by suffix, so `attn.to_q/k/v`
# also adapt the 38 single-stream blocks' attention — and the dual-stream blocks' feed-forwards.
DEFAULT_TARGET_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                          "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# FluxPipeline.default_sample_size: 128 latent pixels (1024 px) unless told otherwise.
DEFAULT_SAMPLE_SIZE = 128

# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json; schnell: the
# same with guidance_embeds false).
FLUX_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
# FLUX.1's VAE (vae/config.json): SD3's architecture with its own latent scale and shift.
FLUX_VAE_CONFIG: dict[str, Any] = {**SD35_VAE_CONFIG, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# FLUX.1-dev's scheduler (scheduler/scheduler_config.json; schnell: shift 1, no dynamic shift).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}


# ---------------------------------------------------------------- the policy

class FluxPolicy(FlowMatchingPolicy):
    """A FluxPipeline (FLUX.1-dev / -schnell) as a trainable rectified-flow policy.

    ``guidance_scale`` is the distilled guidance input of FLUX.1-dev (ignored by a transformer
    without ``guidance_embeds``); ``true_cfg_scale`` > 1 adds classifier-free guidance while
    sampling. Latents are unpacked [B, 16, h, w] everywhere outside the transformer call.
    """

    default_target_modules = DEFAULT_TARGET_MODULES
    text_encoder_names = ("text_encoder", "text_encoder_2")
    truncation_reader = ("tokenizer_2", "T5 text encoder reads")

    def __init__(self, pipeline, *, name: str = "flux", guidance_scale: float = 3.5,
                 true_cfg_scale: float = 1.0, **options: Any):
        vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        resolution = options.get("resolution") or DEFAULT_SAMPLE_SIZE * vae_scale_factor
        multiple = 2 * vae_scale_factor  # the VAE's downsampling, then FLUX's 2×2 patches
        if resolution % multiple:
            raise MarbleError(f"policy {name!r}: resolution {resolution} is not a multiple of {multiple} "
                              f"(the VAE's ×{vae_scale_factor} and 2×2 patches); pass e.g. "
                              f"resolution={max(multiple, round(resolution / multiple) * multiple)}")
        if options.get("max_sequence_length", 512) > 512:
            raise MarbleError(f"policy {name!r}: max_sequence_length {options['max_sequence_length']} is over "
                              "FLUX.1's 512 T5 tokens; pass max_sequence_length=512 or less")
        self.guidance_scale = guidance_scale
        self._position_ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(pipeline, name=name, cfg_scale=true_cfg_scale,
                         **{"max_sequence_length": 512, **options})

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4  # packed 2×2 patches of the VAE latents

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the distilled guidance input (FLUX.1-dev: yes, schnell: no)."""
        return bool(self.transformer.config.guidance_embeds)

    def _default_resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    def _truncation_limit(self, tokenizer) -> int:
        return self.max_sequence_length

    def _encode_one(self, prompt: str) -> TextCond:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            [prompt], device=self.device, max_sequence_length=self.max_sequence_length)
        return TextCond(embeds, pooled)

    def image_seq_len(self) -> int:
        side = self.resolution // self.vae_scale_factor
        return (side // 2) ** 2  # packed 2×2 patches

    def _set_timesteps(self, scheduler, steps: int, device: torch.device | str) -> None:
        """FluxPipeline's grid: sigmas linspace(1, 1/N, N), shifted by the scheduler (dynamically
        with μ from the token count when its config says so; μ is ignored otherwise)."""
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device,
                                mu=self.dynamic_shift(scheduler, self.image_seq_len()))

    def _ids(self, text_length: int, height: int, width: int, device: torch.device):
        """(txt_ids [L, 3] zeros, img_ids [h/2·w/2, 3] = (0, row, column)) as FluxPipeline makes them."""
        key = (text_length, height, width, str(device))
        if key not in self._position_ids:
            image_ids = self.pipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, torch.float32)
            self._position_ids[key] = (torch.zeros(text_length, 3, device=device), image_ids)
        return self._position_ids[key]

    def _predict(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        txt_ids, img_ids = self._ids(cond.prompt_embeds.shape[1], height, width, x_t.device)
        guidance = (torch.full((batch,), float(self.guidance_scale), device=x_t.device)
                    if self.guidance_embeds else None)
        packed = self.pipeline._pack_latents(x_t, batch, channels, height, width)
        out = model(hidden_states=packed, timestep=t, guidance=guidance,  # FLUX takes t ∈ [0, 1]
                    pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return self.pipeline._unpack_latents(out, height * self.vae_scale_factor, width * self.vae_scale_factor,
                                             self.vae_scale_factor)


# ---------------------------------------------------------------- loading

def flux_pipeline_class():
    """diffusers' FluxPipeline (imported quietly: :func:`quietly_imported`)."""
    return quietly_imported("FluxPipeline")


def load_flux_pipeline(directory: str | Path, *, torch_dtype: torch.dtype = torch.float32):
    """THE loader of `flux` (and of the tests' tiny FLUX): FluxPipeline from a local directory."""
    return load_pipeline(flux_pipeline_class(), directory, torch_dtype=torch_dtype)


def resolve_flux_path(path: str | None) -> Path:
    """`path` option, else ``$MARBLE_FLUX_PATH``, else the local HF cache (no download)."""
    return resolve_model_directory("flux", FLUX_MODEL_ID, FLUX_PATH_ENV, path)


def random_text_encoders(pooled_dim: int, sequence_dim: int, device: str | torch.device = "cpu"):
    """(CLIP text encoder, its tokenizer, T5 encoder, its tokenizer) with random weights and the
    widths a FLUX transformer reads (pooled ``pooled_dim``, tokens ``sequence_dim``): one layer
    each, over the procedural world's words (tokenizers built locally, no hub). For timing and
    tests, not for images."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
    )

    from marble_plugins.policies.tiny_prior import build_tokenizer, world_words

    clip_tokenizer = build_tokenizer(77)
    vocab = {token: index for index, token in enumerate(["<pad>", "</s>", "<unk>", *world_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Replace('"', " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                           unk_token="<unk>", model_max_length=512)
    with torch.device(device):
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=pooled_dim, intermediate_size=2 * pooled_dim,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=sequence_dim, d_kv=8, d_ff=64,
                                     num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0))
    return clip.eval(), clip_tokenizer, t5.eval(), t5_tokenizer


def random_flux_pipeline(transformer_config: dict[str, Any], vae_config: dict[str, Any],
                         scheduler_config: dict[str, Any], device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32):
    """A FluxPipeline of the given configs with random weights (text encoders:
    :func:`random_text_encoders` of the transformer's widths), built directly on ``device``.
    `flux-arch` is FLUX.1-dev's configs; the tests save a tiny one with ``save_pretrained`` and
    load it through :func:`load_flux_pipeline` like a downloaded FLUX.1."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    clip, clip_tokenizer, t5, t5_tokenizer = random_text_encoders(
        transformer_config["pooled_projection_dim"], transformer_config["joint_attention_dim"], device)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**transformer_config)
        if dtype != torch.float32:
            transformer.to(dtype)
        vae = AutoencoderKL(**vae_config)
    return flux_pipeline_class()(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config), vae=vae,
        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def flux_arch_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       **transformer_overrides: Any):
    """FLUX.1-dev's transformer, VAE and scheduler with random weights (tiny random text encoders
    of the right widths). ``transformer_overrides`` shrink it for CPU tests (e.g. ``num_layers=1``)."""
    return random_flux_pipeline({**FLUX_DEV_TRANSFORMER_CONFIG, **transformer_overrides}, FLUX_VAE_CONFIG,
                                FLUX_DEV_SCHEDULER_CONFIG, device, dtype)


# ---------------------------------------------------------------- factories

def build_flux(path: str | None = None, rank: int = 32, alpha: float | None = None,
               target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0,
               device: str | None = None, mixed_precision: str = "bf16", gradient_checkpointing: bool | str = True,
               offload_vae: bool = True, offload_text_encoders: bool = True, max_sequence_length: int = 512,
               resolution: int = 512, steps: int = 28, guidance_scale: float = 3.5,
               true_cfg_scale: float = 1.0, sample_batch_size: int = 0, threads: int | None = None,
               compile: bool | str = False) -> FluxPolicy:
    """FLUX.1-dev (or -schnell) from a local directory (`path`, $MARBLE_FLUX_PATH or the HF cache).

    The defaults are FluxPipeline's sampling (28 steps, guidance 3.5, 512 T5 tokens) at 512 px,
    with the memory options one GPU needs. For schnell pass e.g. ``steps=4, max_sequence_length=256``.
    """
    dtype = check_options("flux", mixed_precision=mixed_precision, rank=rank,
                          gradient_checkpointing=gradient_checkpointing, compile=compile) or torch.float32
    target_device = torch.device(device) if device else default_device()
    pipeline = load_flux_pipeline(resolve_flux_path(path),
                                  torch_dtype=dtype if target_device.type == "cuda" else torch.float32)
    return FluxPolicy(pipeline, name="flux", rank=rank, alpha=alpha, target_modules=target_modules, seed=seed,
                      device=target_device, mixed_precision=mixed_precision,
                      gradient_checkpointing=gradient_checkpointing, offload_vae=offload_vae,
                      offload_text_encoders=offload_text_encoders, max_sequence_length=max_sequence_length,
                      resolution=resolution, steps=steps, guidance_scale=guidance_scale,
                      true_cfg_scale=true_cfg_scale, sample_batch_size=sample_batch_size, threads=threads,
                      compile=compile)


def build_flux_arch(rank: int = 32, alpha: float | None = None,
                    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0,
                    device: str | None = None, mixed_precision: str = "bf16", gradient_checkpointing: bool | str = True,
                    offload_vae: bool = False, offload_text_encoders: bool = False,
                    max_sequence_length: int = 512, resolution: int = 512, steps: int = 28,
                    guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, sample_batch_size: int = 0,
                    threads: int | None = None, compile: bool | str = False) -> FluxPolicy:
    """FLUX.1-dev's architecture with random weights + LoRA (GPU timing); every `flux` option but `path`."""
    target_device = torch.device(device) if device else default_device()
    if target_device.type != "cuda" and os.environ.get("MARBLE_ALLOW_CPU_ARCH") != "1":
        raise MarbleError(
            "policy 'flux-arch' builds a 12 B-parameter transformer: run it on a GPU "
            "(`--policy-opt device=cuda`), or set MARBLE_ALLOW_CPU_ARCH=1 to insist on the CPU")
    dtype = check_options("flux-arch", mixed_precision=mixed_precision, rank=rank,
                          gradient_checkpointing=gradient_checkpointing, compile=compile) or torch.float32
    with torch.random.fork_rng(devices=[target_device] if target_device.type == "cuda" else []):
        torch.manual_seed(seed)
        pipeline = flux_arch_pipeline(target_device, dtype if target_device.type == "cuda" else torch.float32)
    return FluxPolicy(pipeline, name="flux-arch", rank=rank, alpha=alpha, target_modules=target_modules,
                      seed=seed, device=target_device, mixed_precision=mixed_precision,
                      gradient_checkpointing=gradient_checkpointing, offload_vae=offload_vae,
                      offload_text_encoders=offload_text_encoders, max_sequence_length=max_sequence_length,
                      resolution=resolution, steps=steps, guidance_scale=guidance_scale,
                      true_cfg_scale=true_cfg_scale, sample_batch_size=sample_batch_size, threads=threads,
                      compile=compile)


@hookimpl
def register_policies(register):
    register("flux", build_flux,
             description=f"{FLUX_MODEL_ID} (or -schnell) from a local directory (path= / ${FLUX_PATH_ENV} / "
                         "HF cache), LoRA.")
    register("flux-arch", build_flux_arch,
             description="FLUX.1-dev transformer architecture with random weights + LoRA (GPU timing).")
