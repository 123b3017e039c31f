"""SD3 policies on diffusers + peft: `sd3.5`, `tiny-sd3` (the embedded default) and `sd3.5-arch`.

`sd3.5` and `tiny-sd3` go through ONE loader, :func:`load_sd3_pipeline`
(``StableDiffusion3Pipeline.from_pretrained`` on a local directory); `tiny-sd3` only points it
at the prior shipped in ``tiny_sd3/`` (see :mod:`marble_plugins.policies.tiny_prior`).
`sd3.5-arch` builds SD3.5 Medium's transformer with random weights, to time update steps on a GPU.

:class:`SD3Policy` is the SD3 part of the shared flow-matching base
(:class:`marble_plugins.policies.flow_matching.FlowMatchingPolicy`: LoRA with the old and
reference views, Euler sampling with diffusers' ``FlowMatchEulerDiscreteScheduler``, the memory
options, the prompt cache and diffusers-format adapters): how SD3 encodes a prompt and calls its
MMDiT.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

SD35_MODEL_ID = "stabilityai/stable-diffusion-3.5-medium"
SD35_PATH_ENV = "MARBLE_SD35_PATH"
TINY_PRIOR_DIR = Path(__file__).resolve().parent / "tiny_sd3"
POLICY_DEFAULTS_FILE = "marble_policy.json"  # written by tiny_prior next to the weights
# SPEC §1 reference LoRA targets: the joint attention's projections of both MMDiT streams, by
# their full names as the official MARBLE release lists them. peft matches a name as a suffix,
# so `attn.to_q` leaves out `attn2.to_q`, the second image self-attention of SD3.5's
# dual-attention blocks (bare `to_q`, … would adapt those too: 13 blocks of SD3.5 Medium).
DEFAULT_TARGET_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# Measured on the 2-core CI machine (docs/tiny-sd3.md): 1 thread is steady, 2 threads are faster
# on average but stall sporadically; the tiny default uses this many unless told otherwise.
TINY_DEFAULT_THREADS = 1

# SD3.5 Medium's transformer (stabilityai/stable-diffusion-3.5-medium transformer/config.json).
SD35_MEDIUM_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
# SD3 / SD3.5's VAE (vae/config.json of the same repository).
SD35_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "use_quant_conv": False, "use_post_quant_conv": False,
}


# ---------------------------------------------------------------- conditioning

SD3Cond = TextCond  # CLIP-L/G (+ T5) token sequence [B, L, 4096] and pooled CLIP [B, 2048]


# ---------------------------------------------------------------- loading

def load_sd3_pipeline(directory: str | Path, *, use_t5: bool = True,
                      torch_dtype: torch.dtype = torch.float32):
    """THE loader of `sd3.5` and `tiny-sd3`: a StableDiffusion3Pipeline from a local directory.

    T5 is skipped when ``use_t5`` is false or the directory has none (``text_encoder_3`` null).
    """
    directory = Path(directory)
    index_file = directory / "model_index.json"  # load_pipeline refuses a directory without it
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    t5_entry = index.get("text_encoder_3") or [None, None]
    skip_t5 = not use_t5 or t5_entry[0] is None or not (directory / "text_encoder_3").is_dir()
    return load_pipeline(sd3_pipeline_class(), directory, torch_dtype=torch_dtype,
                         skip=("text_encoder_3", "tokenizer_3") if skip_t5 else ())


def absent_t5_components(width: int):
    """(text_encoder_3, tokenizer_3) standing for "no T5": a T5 encoder without layers whose
    embeddings and final norm are zero, so it returns exactly the zeros [B, L, width] that
    StableDiffusion3Pipeline uses when ``text_encoder_3`` is None, and a tokenizer that reads
    nothing (every prompt → no tokens, padded with ``<pad>``; so diffusers never reports a
    prompt as truncated, whatever ``max_sequence_length`` is).

    diffusers' ``from_pretrained`` refuses a pipeline directory whose model_index.json has
    ``text_encoder_3: [null, null]`` (only image_encoder / feature_extractor may be absent), so a
    model trained without T5 (tiny-sd3) ships these to load with a plain ``from_pretrained``.
    marble-kit's own loader does not load them (``use_t5=False``).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every character removed
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=512)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=width,
                                      num_layers=0, num_heads=1, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0))
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    return encoder.eval(), tokenizer


def write_absent_t5(directory: str | Path) -> None:
    """Add :func:`absent_t5_components` to a saved pipeline without T5 (model_index.json too)."""
    directory = Path(directory)
    index_file = directory / "model_index.json"
    index = json.loads(index_file.read_text())
    width = json.loads((directory / "transformer" / "config.json").read_text())["joint_attention_dim"]
    encoder, tokenizer = absent_t5_components(width)
    encoder.save_pretrained(directory / "text_encoder_3", safe_serialization=True)
    tokenizer.save_pretrained(directory / "tokenizer_3")
    tokenizer_config = directory / "tokenizer_3" / "tokenizer_config.json"  # the class name all
    settings = json.loads(tokenizer_config.read_text())                   # transformers versions know
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    index.update(text_encoder_3=["transformers", "T5EncoderModel"],
                 tokenizer_3=["transformers", "PreTrainedTokenizerFast"])
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def sd3_pipeline_class():
    """diffusers' StableDiffusion3Pipeline (imported quietly: :func:`quietly_imported`)."""
    return quietly_imported("StableDiffusion3Pipeline")


def resolve_sd35_path(path: str | None) -> Path:
    """`path` option, else ``$MARBLE_SD35_PATH``, else the local HF cache (no download)."""
    return resolve_model_directory("sd3.5", SD35_MODEL_ID, SD35_PATH_ENV, path)


def read_policy_defaults(directory: str | Path) -> dict[str, Any]:
    """Sampling defaults stored next to a prior (``marble_policy.json``), if any."""
    file = Path(directory) / POLICY_DEFAULTS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


# ---------------------------------------------------------------- the policy

class SD3Policy(FlowMatchingPolicy):
    """A StableDiffusion3Pipeline as a trainable rectified-flow policy (LoRA on the transformer).

    The SD3 part of :class:`FlowMatchingPolicy`: prompts through the pipeline's CLIP-L/G (+ T5)
    ``encode_prompt``; the MMDiT takes t·1000 and the latents as they are. ``guidance_scale`` is
    classifier-free guidance (an empty prompt as the negative) while sampling.
    """

    default_target_modules = DEFAULT_TARGET_MODULES

    def __init__(self, pipeline, *, name: str = "sd3", guidance_scale: float = 1.0, **options: Any):
        super().__init__(pipeline, name=name, cfg_scale=guidance_scale, **options)

    @property
    def guidance_scale(self) -> float:
        return self.cfg_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self.cfg_scale = value

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _encode_one(self, prompt: str) -> TextCond:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            [prompt], None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return TextCond(embeds, pooled)

    def _predict(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=t * 1000,  # SD3 takes t·1000
                     encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_prompt_embeds,
                     return_dict=False)[0]


# ---------------------------------------------------------------- factories

def build_sd35(path: str | None = None, use_t5: bool = True, rank: int = 32,
               alpha: float | None = None, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
               seed: int = 0, device: str | None = None, mixed_precision: str = "bf16",
               gradient_checkpointing: bool | str = True, offload_vae: bool = True,
               offload_text_encoders: bool = True, max_sequence_length: int = 256,
               resolution: int = 512, steps: int = 25, guidance_scale: float = 1.0,
               sample_batch_size: int = 0, threads: int | None = None,
               compile: bool | str = False) -> SD3Policy:
    """Stable Diffusion 3.5 Medium from a local directory (`path`, $MARBLE_SD35_PATH or HF cache)."""
    dtype = check_options("sd3.5", mixed_precision=mixed_precision, rank=rank,  # before loading 8 GB
                          gradient_checkpointing=gradient_checkpointing, compile=compile) or torch.float32
    target_device = torch.device(device) if device else default_device()
    pipeline = load_sd3_pipeline(resolve_sd35_path(path), use_t5=use_t5,
                                 torch_dtype=dtype if target_device.type == "cuda" else torch.float32)
    return SD3Policy(pipeline, name="sd3.5", rank=rank, alpha=alpha, target_modules=target_modules,
                     seed=seed, device=target_device, mixed_precision=mixed_precision,
                     gradient_checkpointing=gradient_checkpointing, offload_vae=offload_vae,
                     offload_text_encoders=offload_text_encoders,
                     max_sequence_length=max_sequence_length, resolution=resolution, steps=steps,
                     guidance_scale=guidance_scale, sample_batch_size=sample_batch_size,
                     threads=threads, compile=compile)


def build_tiny_sd3(path: str | None = None, rank: int = 8, alpha: float | None = None,
                   target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0,
                   device: str | None = "cpu", mixed_precision: str = "no",
                   gradient_checkpointing: bool | str = False, offload_vae: bool = False,
                   offload_text_encoders: bool = False, max_sequence_length: int | None = None,
                   steps: int | None = None, guidance_scale: float = 1.0,
                   sample_batch_size: int = 0, threads: int | None = TINY_DEFAULT_THREADS,
                   compile: bool | str = False) -> SD3Policy:
    """The shipped tiny SD3 prior (64×64 px), loaded through the same loader as `sd3.5`."""
    check_options("tiny-sd3", mixed_precision=mixed_precision, rank=rank,
                  gradient_checkpointing=gradient_checkpointing, compile=compile)
    directory = Path(path).expanduser() if path else TINY_PRIOR_DIR
    if not (directory / "model_index.json").is_file():
        raise MarbleError(
            f"policy 'tiny-sd3': no prior at {directory}; rebuild it with `python -m "
            "marble_plugins.policies.tiny_prior --out DIR` and pass `--policy-opt path=DIR`")
    defaults = read_policy_defaults(directory)
    pipeline = load_sd3_pipeline(directory, use_t5=False)
    return SD3Policy(pipeline, name="tiny-sd3", rank=rank, alpha=alpha, target_modules=target_modules,
                     seed=seed, device=device, mixed_precision=mixed_precision,
                     gradient_checkpointing=gradient_checkpointing, offload_vae=offload_vae,
                     offload_text_encoders=offload_text_encoders,
                     max_sequence_length=max_sequence_length or defaults.get("max_sequence_length", 1),
                     steps=steps or defaults.get("steps", 10), guidance_scale=guidance_scale,
                     sample_batch_size=sample_batch_size, threads=threads, compile=compile)


def sd35_arch_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       **transformer_overrides: Any):
    """SD3.5 Medium's transformer and VAE with random weights; tiny random CLIP encoders whose
    pooled width (2048) matches, built directly on ``device``. For timing, not for images.
    ``transformer_overrides`` shrink it for CPU tests (e.g. ``num_layers=1``)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from marble_plugins.policies.tiny_prior import build_tokenizer

    def clip(tokenizer):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=SD35_MEDIUM_TRANSFORMER_CONFIG["pooled_projection_dim"] // 2,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    tokenizer, tokenizer_2 = build_tokenizer(77), build_tokenizer(77)
    with torch.device(device):
        config = {**SD35_MEDIUM_TRANSFORMER_CONFIG, **transformer_overrides}
        config["dual_attention_layers"] = tuple(
            i for i in config["dual_attention_layers"] if i < config["num_layers"])
        transformer = SD3Transformer2DModel(**config).to(dtype)
        vae = AutoencoderKL(**SD35_VAE_CONFIG)
        encoders = clip(tokenizer), clip(tokenizer_2)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)


def build_sd35_arch(rank: int = 32, alpha: float | None = None,
                    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0,
                    device: str | None = None, mixed_precision: str = "bf16",
                    gradient_checkpointing: bool | str = True, offload_vae: bool = False,
                    offload_text_encoders: bool = False, max_sequence_length: int = 256,
                    resolution: int = 512, steps: int = 25, guidance_scale: float = 1.0,
                    sample_batch_size: int = 0, compile: bool | str = False) -> SD3Policy:
    """SD3.5 Medium's architecture with random weights + LoRA (GPU timing of update steps; with
    `sd3.5`'s options but `path` and `use_t5`, so `--config sd35-marble --policy sd3.5-arch`
    is a smoke test of the recipe without weights)."""
    target_device = torch.device(device) if device else default_device()
    if target_device.type != "cuda" and os.environ.get("MARBLE_ALLOW_CPU_ARCH") != "1":
        raise MarbleError(
            "policy 'sd3.5-arch' builds a 2.2 B-parameter transformer: run it on a GPU "
            "(`--policy-opt device=cuda`), or set MARBLE_ALLOW_CPU_ARCH=1 to insist on the CPU")
    dtype = check_options("sd3.5-arch", mixed_precision=mixed_precision, rank=rank,
                          gradient_checkpointing=gradient_checkpointing, compile=compile) or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = sd35_arch_pipeline(target_device, dtype if target_device.type == "cuda" else torch.float32)
    return SD3Policy(pipeline, name="sd3.5-arch", rank=rank, alpha=alpha,
                     target_modules=target_modules, seed=seed, device=target_device,
                     mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                     offload_vae=offload_vae, offload_text_encoders=offload_text_encoders,
                     max_sequence_length=max_sequence_length, resolution=resolution, steps=steps,
                     guidance_scale=guidance_scale, sample_batch_size=sample_batch_size,
                     compile=compile)


@hookimpl
def register_policies(register):
    register("tiny-sd3", build_tiny_sd3,
             description="Tiny SD3 (64 px) pretrained on the procedural world; embedded default, CPU.")
    register("sd3.5", build_sd35,
             description=f"{SD35_MODEL_ID} from a local directory (path= / ${SD35_PATH_ENV} / HF cache), LoRA.")
    register("sd3.5-arch", build_sd35_arch,
             description="SD3.5 Medium transformer architecture with random weights + LoRA (GPU timing).")
