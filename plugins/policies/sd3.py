"""SD3 policies on diffusers + peft: `sd3.5`, `tiny-sd3` (the embedded default) and `sd3.5-arch`.

`sd3.5` and `tiny-sd3` go through ONE loader, :func:`load_sd3_pipeline`
(``StableDiffusion3Pipeline.from_pretrained`` on a local directory); `tiny-sd3` only points it
at the prior shipped in ``tiny_sd3/`` (see :mod:`marble_plugins.policies.tiny_prior`).
`sd3.5-arch` builds SD3.5 Medium's transformer with random weights, to time update steps on a GPU.

:class:`SD3Policy` turns a pipeline into a :class:`marble_kit.policy.Policy`: LoRA (peft) on the
transformer, three views of one network (trainable v_θ, old v_old as a copy of the LoRA tensors
swapped in for sampling, reference v_ref with adapters disabled), Euler flow-matching sampling
with diffusers' ``FlowMatchEulerDiscreteScheduler`` and the memory options SD3.5 needs on one GPU
(gradient checkpointing, bf16/fp16 autocast, VAE / text encoders off the GPU when idle).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.policy import AutoCheckpointing, Rollout, lora_inputs_uncast, offloaded

SD35_MODEL_ID = "stabilityai/stable-diffusion-3.5-medium"
SD35_PATH_ENV = "MARBLE_SD35_PATH"
TINY_PRIOR_DIR = Path(__file__).resolve().parent / "tiny_sd3"
POLICY_DEFAULTS_FILE = "marble_policy.json"  # written by tiny_prior next to the weights
ADAPTER = "default"
# SPEC §1 reference LoRA targets: the joint attention's projections of both MMDiT streams, by
# their full names as the official MARBLE release lists them. peft matches a name as a suffix,
# so `attn.to_q` leaves out `attn2.to_q`, the second image self-attention of SD3.5's
# dual-attention blocks (bare `to_q`, … would adapt those too: 13 blocks of SD3.5 Medium).
DEFAULT_TARGET_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
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

@dataclass
class SD3Cond:
    """Text conditioning of a batch: one row per sample.

    ``index(idx)`` selects rows (e.g. ``cond.index(rows)`` to fold several timesteps per sample
    into the batch); ``repeat(n)`` repeats every row ``n`` times in place (row i → rows i·n …).
    """

    prompt_embeds: torch.Tensor          # [B, L, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor   # [B, pooled_projection_dim]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> SD3Cond:
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return SD3Cond(self.prompt_embeds[idx], self.pooled_prompt_embeds[idx])

    def repeat(self, n: int) -> SD3Cond:
        return SD3Cond(self.prompt_embeds.repeat_interleave(n, dim=0),
                       self.pooled_prompt_embeds.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str) -> SD3Cond:
        return SD3Cond(self.prompt_embeds.to(device), self.pooled_prompt_embeds.to(device))

    @staticmethod
    def cat(conds: Sequence[SD3Cond]) -> SD3Cond:
        return SD3Cond(torch.cat([c.prompt_embeds for c in conds]),
                       torch.cat([c.pooled_prompt_embeds for c in conds]))


# ---------------------------------------------------------------- loading

def load_sd3_pipeline(directory: str | Path, *, use_t5: bool = True,
                      torch_dtype: torch.dtype = torch.float32):
    """THE loader of `sd3.5` and `tiny-sd3`: a StableDiffusion3Pipeline from a local directory.

    T5 is skipped when ``use_t5`` is false or the directory has none (``text_encoder_3`` null).
    """
    StableDiffusion3Pipeline = sd3_pipeline_class()
    directory = Path(directory)
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        raise MarbleError(
            f"{directory} is not a diffusers pipeline directory (no model_index.json); point the "
            f"policy option `path` at a StableDiffusion3Pipeline saved with save_pretrained"
        )
    t5_entry = json.loads(index_file.read_text()).get("text_encoder_3") or [None, None]
    skip_t5 = not use_t5 or t5_entry[0] is None or not (directory / "text_encoder_3").is_dir()
    extra = {"text_encoder_3": None, "tokenizer_3": None} if skip_t5 else {}
    if torch_dtype != torch.float32:  # fp32 is the default; newer diffusers renamed the kwarg
        extra["torch_dtype"] = torch_dtype
    try:
        with quiet_loading():
            return StableDiffusion3Pipeline.from_pretrained(directory, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise MarbleError(f"could not load the SD3 pipeline from {directory}: {exc}") from exc


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
    """diffusers' StableDiffusion3Pipeline, imported without transformers' notes that its
    IP-adapter image processors fall back to PIL without torchvision (marble-kit never uses
    them, and the CPU install has no torchvision: pyproject.toml, docs/rewards.md)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusion3Pipeline
    finally:
        transformers_logging.set_verbosity(verbosity)
    return StableDiffusion3Pipeline


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component progress bars while loading (they clutter the training log)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


@contextmanager
def quiet_text_encoding() -> Iterator[None]:
    """diffusers' and transformers' per-call truncation warnings off while prompts are encoded
    (:meth:`SD3Policy._note_truncation` says it once instead)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in levels:
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, level in levels:
            lib.set_verbosity(level)


def resolve_sd35_path(path: str | None) -> Path:
    """`path` option, else ``$MARBLE_SD35_PATH``, else the local HF cache (no download)."""
    missing_hint = (
        f"download {SD35_MODEL_ID} (accept its licence on huggingface.co, then "
        f"`huggingface-cli download {SD35_MODEL_ID} --local-dir DIR`) and pass "
        f"`--policy-opt path=DIR` or set {SD35_PATH_ENV}=DIR"
    )
    chosen = path or os.environ.get(SD35_PATH_ENV)
    if chosen:
        directory = Path(chosen).expanduser()
        if not (directory / "model_index.json").is_file():
            source = "policy option `path`" if path else f"${SD35_PATH_ENV}"
            raise MarbleError(
                f"policy 'sd3.5': {source} = {directory} holds no {SD35_MODEL_ID} pipeline "
                f"(model_index.json missing); {missing_hint}"
            )
        return directory
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(SD35_MODEL_ID, local_files_only=True))
    except Exception as exc:  # any hub error means "not in the local cache"
        raise MarbleError(
            f"policy 'sd3.5': {SD35_MODEL_ID} is not available locally (no `path` option, no "
            f"${SD35_PATH_ENV}, not in the Hugging Face cache); {missing_hint}"
        ) from exc


def read_policy_defaults(directory: str | Path) -> dict[str, Any]:
    """Sampling defaults stored next to a prior (``marble_policy.json``), if any."""
    file = Path(directory) / POLICY_DEFAULTS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


# ---------------------------------------------------------------- the policy

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SD3Policy:
    """A StableDiffusion3Pipeline as a trainable rectified-flow policy (LoRA on the transformer).

    ``x0`` latents live in the transformer's space (before the VAE's scaling/shift inverse) on
    ``device``; images come back as float [0, 1] on the CPU.
    """

    def __init__(self, pipeline, *, name: str = "sd3", rank: int = 8, alpha: float | None = None,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0,
                 device: str | torch.device | None = None, mixed_precision: str = "no",
                 gradient_checkpointing: bool | str = False, offload_vae: bool = False,
                 offload_text_encoders: bool = False, max_sequence_length: int = 256,
                 resolution: int | None = None, steps: int = 25, guidance_scale: float = 1.0,
                 sample_batch_size: int = 0, prompt_cache_size: int = 1024,
                 threads: int | None = None, compile: bool | str = False):
        if mixed_precision not in MIXED_PRECISION:
            raise MarbleError(f"policy {name!r}: mixed_precision={mixed_precision!r} is not one of "
                              f"{', '.join(MIXED_PRECISION)}; pass e.g. mixed_precision=\"bf16\"")
        if rank < 1:
            raise MarbleError(f"policy {name!r}: LoRA rank must be ≥ 1 (got {rank})")
        if gradient_checkpointing not in (True, False, "auto"):
            raise MarbleError(f"policy {name!r}: gradient_checkpointing={gradient_checkpointing!r} must be "
                              "true, false or \"auto\" (keep the activations when they fit in GPU memory)")
        if compile not in (True, False) and not isinstance(compile, str):
            raise MarbleError(f"policy {name!r}: compile={compile!r} must be true, false or a torch.compile "
                              "mode (e.g. \"reduce-overhead\")")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.name = name
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = torch.device(device) if device is not None else default_device()
        self.autocast_dtype = MIXED_PRECISION[mixed_precision]
        self.offload_vae = offload_vae
        self.offload_text_encoders = offload_text_encoders
        self.max_sequence_length = max_sequence_length
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.sample_batch_size = sample_batch_size
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.resolution = resolution or self.transformer.config.sample_size * self.vae_scale_factor
        self.lora_config = self._lora_config(rank, alpha, target_modules)
        self._prompt_cache: OrderedDict[str, SD3Cond] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._truncation_noted = False
        self._place_modules()
        self._add_lora(seed)
        self._auto_checkpointing = None
        if gradient_checkpointing == "auto":
            self._auto_checkpointing = AutoCheckpointing(self.transformer, self.device)
        elif gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        # compile: the no-grad forwards (rollout, old and reference velocities) run through
        # torch.compile of the transformer; v_θ's forward with gradients stays eager.
        self._compile_mode = compile if isinstance(compile, str) else ("default" if compile else None)
        self._compiled = None
        self._old = [p.detach().clone() for p in self._trainable]

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _lora_config(rank: int, alpha: float | None, target_modules: Sequence[str]):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                          init_lora_weights="gaussian", target_modules=list(target_modules))

    def _place_modules(self) -> None:
        """Frozen base weights in the autocast dtype on a GPU (fp32 on CPU); LoRA stays fp32."""
        base_dtype = self.autocast_dtype if self.device.type == "cuda" and self.autocast_dtype else None
        for module in self._text_encoders() + [self.transformer, self.pipeline.vae]:
            module.requires_grad_(False)
            module.eval()
        cast = {"dtype": base_dtype} if base_dtype is not None else {}
        self.transformer.to(self.device, **cast)
        for encoder in self._text_encoders():
            encoder.to("cpu" if self.offload_text_encoders else self.device, **cast)
        self.pipeline.vae.to("cpu" if self.offload_vae else self.device)

    def _add_lora(self, seed: int) -> None:
        # LoRA A is drawn on the CPU from a private RNG: seeded, leaves the global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer.add_adapter(self.lora_config, adapter_name=ADAPTER)
        named = sorted((n, p) for n, p in self.transformer.named_parameters() if "lora_" in n)
        self._trainable_names = [n for n, _ in named]
        self._trainable = [p for _, p in named]
        for p in self._trainable:
            p.data = p.data.float()
            p.requires_grad_(True)
        if not self._trainable:
            raise MarbleError(f"policy {self.name!r}: LoRA target modules "
                              f"{sorted(self.lora_config.target_modules)} match no transformer layer")

    def _text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if m is not None]

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SD3Cond:
        """Conditioning for ``prompts`` (each distinct prompt encoded once, then cached).

        Each prompt is encoded on its own: a text encoder's output for one row depends (by
        ~1e-7) on how many rows share the batch, so encoding prompts together would make an
        embedding depend on which other prompts were new at that moment — on the run's history
        (sample grids, what a resumed process has cached) — and a resume would not be bit-exact.
        """
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if todo:
            with offloaded(self._text_encoders(), self.device, self.offload_text_encoders), \
                    self._autocast(), quiet_text_encoding():
                for prompt in todo:
                    self._note_truncation(prompt)
                    embeds, _, pooled, _ = self.pipeline.encode_prompt(
                        [prompt], None, None, device=self.device, do_classifier_free_guidance=False,
                        max_sequence_length=self.max_sequence_length)
                    self._prompt_cache[prompt] = SD3Cond(embeds, pooled)
        conds = []
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
            conds.append(self._prompt_cache[prompt])
        while len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return SD3Cond.cat(conds)

    def _note_truncation(self, prompt: str) -> None:
        """One warning, the first time a prompt is longer than the CLIP encoders read (diffusers
        and transformers would print two per batch of prompts, every time)."""
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if self._truncation_noted or tokenizer is None:
            return
        limit = tokenizer.model_max_length
        if len(tokenizer(prompt, truncation=False)["input_ids"]) > limit:
            self._truncation_noted = True
            warnings.warn(f"policy {self.name!r}: its CLIP text encoders read {limit} tokens of a prompt; "
                          f"longer prompts are cut (the first: {prompt[:50]!r}…); this note is shown once",
                          UserWarning, stacklevel=2)

    # ------------------------------------------------------------ the three velocity fields
    def _transformer_velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: SD3Cond):
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds
        if self.autocast_dtype is None:  # no autocast (e.g. full_precision): conditioning in fp32 too
            embeds, pooled = embeds.float(), pooled.float()
        model = self._no_grad_model() if not torch.is_grad_enabled() else self.transformer
        # Under autocast peft's cast of each LoRA input to float32 is undone by autocast at once:
        # skipped (the same values, two copies fewer per LoRA layer and pass).
        with self._autocast(), lora_inputs_uncast(self.transformer, self.autocast_dtype is not None):
            out = model(hidden_states=x_t, timestep=t * 1000,  # SD3 takes t·1000
                        encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        return out.float()

    def _no_grad_model(self):
        if self._compile_mode is None:
            return self.transformer
        if self._compiled is None:
            options = {} if self._compile_mode == "default" else {"mode": self._compile_mode}
            self._compiled = torch.compile(self.transformer, dynamic=False, **options)
        return self._compiled

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: SD3Cond) -> torch.Tensor:
        """v_θ(x_t, t, c): trainable LoRA active, gradients flow (t in [0, 1])."""
        if self._auto_checkpointing is not None and torch.is_grad_enabled():
            probe = lambda: self._transformer_velocity(x_t[:1], t[:1], cond.index(slice(0, 1)))  # noqa: E731
            with self._auto_checkpointing(x_t.shape[0], probe):
                return self._transformer_velocity(x_t, t, cond)
        return self._transformer_velocity(x_t, t, cond)

    @torch.no_grad()
    def old_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: SD3Cond) -> torch.Tensor:
        """v_old: the old LoRA tensors swapped in (LoRA modules run, under no_grad)."""
        with self._old_weights():
            return self._transformer_velocity(x_t, t, cond)

    @torch.no_grad()
    def ref_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: SD3Cond) -> torch.Tensor:
        """v_ref: the frozen base model (adapters disabled)."""
        with self._adapters_disabled():
            return self._transformer_velocity(x_t, t, cond)

    @contextmanager
    def _old_weights(self) -> Iterator[None]:
        # Swapping `.data` pointers is O(1) and leaves autograd versions alone (measured 0.1 ms).
        current = [p.data for p in self._trainable]
        for p, old in zip(self._trainable, self._old):
            p.data = old
        try:
            yield
        finally:
            for p, data in zip(self._trainable, current):
                p.data = data

    @contextmanager
    def _adapters_disabled(self) -> Iterator[None]:
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()
            for p in self._trainable:  # peft's disable/enable toggles requires_grad: restore it
                p.requires_grad_(True)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """float32 forward passes for the block: autocast off, and frozen base weights kept in a
        half-precision dtype on a GPU upcast meanwhile (the reference of `marble bench fidelity
        --fp32-reference`; costs the float32 copy of the transformer). Restored afterwards
        bit for bit: half-precision values are exact in float32."""
        previous = self.autocast_dtype
        half = (torch.float16, torch.bfloat16)
        tensors = [*self.transformer.named_parameters(), *self.transformer.named_buffers()]
        base = {name: t.dtype for name, t in tensors if t.dtype in half}
        self.autocast_dtype = None
        if base:
            self.transformer.float()
        try:
            yield
        finally:
            self.autocast_dtype = previous
            for name, tensor in [*self.transformer.named_parameters(), *self.transformer.named_buffers()]:
                if name in base:
                    tensor.data = tensor.data.to(base[name])

    @torch.no_grad()
    def update_old(self, decay: float) -> None:
        """θ_old ← decay·θ_old + (1 − decay)·θ (one multi-tensor lerp)."""
        torch._foreach_lerp_(self._old, [p.detach() for p in self._trainable], 1.0 - decay)

    # ------------------------------------------------------------ sampling
    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (batch, self.transformer.config.in_channels, side, side)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generator: torch.Generator,
               steps: int | None = None, use_old: bool = True,
               noise: torch.Tensor | None = None) -> Rollout:
        """One image per prompt by Euler flow matching (CFG-free unless guidance_scale > 1).

        The initial noise is drawn at once from ``generator`` (on its device), so the same
        generator state gives the same latents whatever ``sample_batch_size`` is; pass
        ``noise`` [B, 16, h, w] to fix it instead (e.g. the same noise for several prompts).
        """
        prompts = list(prompts)
        if noise is None:
            noise = torch.randn(self.latent_shape(len(prompts)), generator=generator,
                                device=generator.device, dtype=torch.float32)
        elif tuple(noise.shape) != self.latent_shape(len(prompts)):
            raise MarbleError(f"policy {self.name!r}: noise has shape {tuple(noise.shape)}, "
                              f"expected {self.latent_shape(len(prompts))} for {len(prompts)} prompts")
        cond = self.encode_prompts(prompts)
        chunk = self.sample_batch_size or len(prompts)
        weights = self._old_weights() if use_old else nullcontext()
        # One autocast region for the whole rollout: the LoRA weights are cast once, not per step.
        with weights, self._autocast():
            x0 = torch.cat([
                self._euler(noise[i:i + chunk].to(self.device), cond.index(slice(i, i + chunk)),
                            steps or self.steps)
                for i in range(0, len(prompts), chunk)])
        return Rollout(prompts=prompts, x0=x0, images=self.decode(x0), cond=cond)

    def _euler(self, x: torch.Tensor, cond: SD3Cond, steps: int) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        negative = self._negative_cond(len(cond)) if self.guidance_scale > 1 else None
        for timestep in scheduler.timesteps:
            t = timestep / 1000.0
            v = self._transformer_velocity(x, t, cond)
            if negative is not None:
                v_uncond = self._transformer_velocity(x, t, negative)
                v = v_uncond + self.guidance_scale * (v - v_uncond)
            x = scheduler.step(v, timestep, x, return_dict=False)[0]
        return x

    def sampling_timesteps(self, steps: int | None = None) -> torch.Tensor:
        """The t ∈ [0, 1] at which :meth:`sample` evaluates the velocity with ``steps`` sampler
        steps, first to last (float32 on the CPU): the scheduler's timesteps / 1000, i.e. its
        shifted σ's (SD3.5: shift 3). ``timestep_schedule = "grid"`` trains on them."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps or self.steps, device="cpu")
        return (scheduler.timesteps / 1000.0).float()

    def _negative_cond(self, batch: int) -> SD3Cond:
        return self.encode_prompts([""]).index([0] * batch)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] → images [B, 3, H, W] in [0, 1] on the CPU."""
        vae = self.pipeline.vae
        with offloaded([vae], self.device, self.offload_vae):
            latents = x0.to(self.device, vae.dtype) / vae.config.scaling_factor \
                + (vae.config.shift_factor or 0.0)
            images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    # ------------------------------------------------------------ parameters and checkpoints
    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA A/B matrices, sorted by parameter name."""
        return list(self._trainable)

    def trainable_module(self) -> nn.Module:
        return self.transformer

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{n}": p.detach().cpu().clone() for n, p in zip(self._trainable_names, self._trainable)}
        state.update({f"old.{n}": o.cpu().clone() for n, o in zip(self._trainable_names, self._old)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{kind}.{n}": p.shape for kind in ("lora", "old")
                    for n, p in zip(self._trainable_names, self._trainable)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise MarbleError(
                f"policy {self.name!r}: checkpoint does not match this LoRA "
                f"(missing {missing[:2]}, unexpected {unexpected[:2]}); resume with the same "
                "policy, rank and target modules")
        for key, shape in expected.items():
            if tuple(state[key].shape) != tuple(shape):
                raise MarbleError(f"policy {self.name!r}: checkpoint tensor {key} has shape "
                                  f"{tuple(state[key].shape)}, expected {tuple(shape)} (LoRA rank differs?)")
        with torch.no_grad():
            for name, p, old in zip(self._trainable_names, self._trainable, self._old):
                p.copy_(state[f"lora.{name}"])
                old.copy_(state[f"old.{name}"])

    def lora_state_dict(self, which: str = "trainable") -> dict[str, torch.Tensor]:
        """peft-format LoRA weights (``…lora_A.weight``) of the trainable or the old policy."""
        from peft.utils import get_peft_model_state_dict

        weights = self._old_weights() if which == "old" else nullcontext()
        with weights:
            state = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER)
            return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def save_adapter(self, directory: str | Path, which: str = "trainable") -> Path:
        """LoRA safetensors that ``StableDiffusion3Pipeline.load_lora_weights`` accepts."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(
            str(directory), transformer_lora_layers=self.lora_state_dict(which),
            transformer_lora_adapter_metadata=self.lora_config.to_dict())
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def load_adapter(self, path: str | Path) -> None:
        """Load a LoRA file/directory written by ``save_adapter`` into the trainable and old weights."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import set_peft_model_state_dict

        if not Path(path).exists():
            raise MarbleError(f"policy {self.name!r}: adapter {path} does not exist; pass a "
                              "directory or .safetensors file written by save_adapter")
        state = StableDiffusion3Pipeline.lora_state_dict(str(path))
        state = state[0] if isinstance(state, tuple) else state
        prefix = "transformer."
        lora = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        current = self.lora_state_dict()
        if set(lora) != set(current) or any(lora[k].shape != current[k].shape for k in current):
            raise MarbleError(
                f"policy {self.name!r}: adapter {path} does not match this policy's LoRA "
                f"(rank {self.lora_config.r}, targets {sorted(self.lora_config.target_modules)}); "
                "build the policy with the rank and target modules it was trained with")
        set_peft_model_state_dict(self.transformer, lora, adapter_name=ADAPTER)
        with torch.no_grad():
            for p, old in zip(self._trainable, self._old):
                p.data = p.data.float()
                old.copy_(p)


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
    dtype = MIXED_PRECISION.get(mixed_precision) or torch.float32
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
    dtype = MIXED_PRECISION.get(mixed_precision) or torch.float32
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
