"""The shared flow-matching policy base: what every diffusers text-to-image model needs to be a
:class:`marble_kit.policy.Policy`, whatever its transformer.

:class:`FlowMatchingPolicy` holds the parts that do not depend on the model:

* LoRA (peft) on the transformer and three views of one network — trainable v_θ, old v_old (a
  copy of the LoRA tensors swapped in for sampling), reference v_ref (adapters disabled);
* Euler sampling with diffusers' ``FlowMatchEulerDiscreteScheduler`` (its shift, or the
  resolution-dependent dynamic shift when the scheduler's config asks for it), optional
  classifier-free guidance, chunked sampling;
* the memory options a big model needs on one GPU (bf16/fp16 autocast with the frozen base in
  that dtype, gradient checkpointing, VAE / text encoders off the GPU while idle);
* the prompt-embedding cache (each prompt encoded on its own: see :meth:`encode_prompts`);
* checkpoints: LoRA weights saved and loaded in diffusers' LoRA format through the pipeline
  class's own ``save_lora_weights`` / ``lora_state_dict``, so ``load_lora_weights`` accepts them.

A model part (:mod:`.sd3`, :mod:`.flux`) subclasses it and supplies only what differs:
``_encode_one`` (one prompt → its conditioning), ``_predict`` (the transformer call),
``latent_channels`` and, where the pipeline differs from diffusers' default, ``_set_timesteps``
and ``_default_resolution``. docs/policies.md walks through writing one.

Convention (marble_kit.policy): x_t = (1 − t)·x0 + t·ε with t ∈ [0, 1], v = ε − x0. Latents
``x0`` are the VAE's latents in the transformer's scale ([B, C, h, w], before the VAE's
scaling/shift inverse); a model whose transformer reads another layout (FLUX's packed 2×2
patches) converts inside ``_predict``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from marble_kit.errors import MarbleError
from marble_kit.policy import AutoCheckpointing, Rollout, lora_inputs_uncast, offloaded, swapped_data

ADAPTER = "default"
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- conditioning

@dataclasses.dataclass
class PromptCond:
    """Conditioning of a batch, one row per sample: a dataclass whose fields are tensors with the
    batch first. Subclasses only declare their fields.

    ``index(idx)`` selects rows (e.g. ``cond.index(rows)`` to fold several timesteps per sample
    into the batch); ``repeat(n)`` repeats every row ``n`` times in place (row i → rows i·n …).
    """

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _map(self, fn) -> PromptCond:
        return type(self)(**{name: fn(tensor) for name, tensor in self._tensors().items()})

    def __len__(self) -> int:
        return next(iter(self._tensors().values())).shape[0]

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> PromptCond:
        if not isinstance(idx, slice):
            device = next(iter(self._tensors().values())).device
            idx = torch.as_tensor(idx, dtype=torch.long, device=device)
        return self._map(lambda tensor: tensor[idx])

    def repeat(self, n: int) -> PromptCond:
        return self._map(lambda tensor: tensor.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str) -> PromptCond:
        return self._map(lambda tensor: tensor.to(device))

    def float(self) -> PromptCond:
        """Floating-point fields in float32 (others as they are; a float32 field is not copied)."""
        return self._map(lambda tensor: tensor.float() if tensor.is_floating_point() else tensor)

    @classmethod
    def cat(cls, conds: Sequence[PromptCond]) -> PromptCond:
        names = [f.name for f in dataclasses.fields(conds[0])]
        return type(conds[0])(**{name: torch.cat([getattr(c, name) for c in conds]) for name in names})


@dataclasses.dataclass
class TextCond(PromptCond):
    """A token sequence and a pooled vector per prompt (SD3 and FLUX.1)."""

    prompt_embeds: torch.Tensor          # [B, L, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor   # [B, pooled_projection_dim]


# ---------------------------------------------------------------- loading

def autocast_dtype_of(policy: str, mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``mixed_precision`` option (None for "no"), or a one-line error."""
    if mixed_precision not in MIXED_PRECISION:
        raise MarbleError(f"policy {policy!r}: mixed_precision={mixed_precision!r} is not one of "
                          f"{', '.join(MIXED_PRECISION)}; pass e.g. mixed_precision=\"bf16\"")
    return MIXED_PRECISION[mixed_precision]


def check_options(policy: str, *, mixed_precision: str, rank: int, gradient_checkpointing: bool | str,
                  compile: bool | str) -> torch.dtype | None:
    """The options a factory can check before it loads or builds any weights (a mistyped one is a
    one-line error in a second, not after reading gigabytes): the autocast dtype, or an error."""
    autocast_dtype = autocast_dtype_of(policy, mixed_precision)
    if rank < 1:
        raise MarbleError(f"policy {policy!r}: LoRA rank must be ≥ 1 (got {rank})")
    if gradient_checkpointing not in (True, False, "auto"):
        raise MarbleError(f"policy {policy!r}: gradient_checkpointing={gradient_checkpointing!r} must be "
                          "true, false or \"auto\" (keep the activations when they fit in GPU memory)")
    if compile not in (True, False) and not isinstance(compile, str):
        raise MarbleError(f"policy {policy!r}: compile={compile!r} must be true, false or a torch.compile "
                          "mode (e.g. \"reduce-overhead\")")
    return autocast_dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_pipeline_directory(directory: Path, pipeline_name: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """model_index.json of a saved pipeline, after checking each component it names is there
    (a partial download is a one-line error naming the missing folder, not a traceback)."""
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        raise MarbleError(
            f"{directory} is not a diffusers pipeline directory (no model_index.json); point the "
            f"policy option `path` at a {pipeline_name} saved with save_pretrained"
        )
    index = json.loads(index_file.read_text())
    for component, entry in index.items():
        if component.startswith("_") or component in skip or not isinstance(entry, list) or entry[0] is None:
            continue
        if not (directory / component).is_dir():
            raise MarbleError(f"{pipeline_name} at {directory}: model_index.json names `{component}` but "
                              f"{directory / component}/ is missing (an incomplete download?); download "
                              "the whole repository again")
    return index


def load_pipeline(pipeline_class, directory: str | Path, *, torch_dtype: torch.dtype = torch.float32,
                  skip: Sequence[str] = (), **components: Any):
    """``pipeline_class.from_pretrained`` on a local directory (no hub), without progress bars.

    ``skip``: optional components not to load (passed as None); ``components``: ones given
    instead of loading them."""
    directory = Path(directory)
    check_pipeline_directory(directory, pipeline_class.__name__, skip)
    extra: dict[str, Any] = {**dict.fromkeys(skip), **components}
    if torch_dtype != torch.float32:  # fp32 is the default; newer diffusers renamed the kwarg
        extra["torch_dtype"] = torch_dtype
    try:
        with quiet_loading():
            return pipeline_class.from_pretrained(directory, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise MarbleError(f"could not load the {pipeline_class.__name__} from {directory}: "
                          f"{' '.join(str(exc).split())}") from exc


def resolve_model_directory(policy: str, model_id: str, env: str, path: str | None) -> Path:
    """`path` option, else ``$env``, else the local Hugging Face cache (no download); a one-line
    error naming the missing file, the model's source and both ways to point at it."""
    missing_hint = (
        f"download {model_id} (accept its licence on huggingface.co, then "
        f"`huggingface-cli download {model_id} --local-dir DIR`) and pass "
        f"`--policy-opt path=DIR` or set {env}=DIR"
    )
    chosen = path or os.environ.get(env)
    if chosen:
        directory = Path(chosen).expanduser()
        if not (directory / "model_index.json").is_file():
            source = "policy option `path`" if path else f"${env}"
            raise MarbleError(
                f"policy {policy!r}: {source} = {directory} holds no {model_id} pipeline "
                f"(model_index.json missing); {missing_hint}"
            )
        return directory
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # any hub error means "not in the local cache"
        raise MarbleError(
            f"policy {policy!r}: {model_id} is not available locally (no `path` option, no "
            f"${env}, not in the Hugging Face cache); {missing_hint}"
        ) from exc


def quietly_imported(name: str):
    """A diffusers pipeline class, imported without transformers' notes that its IP-adapter
    image processors fall back to PIL without torchvision (marble-kit never uses them, and the
    CPU install has no torchvision: pyproject.toml, docs/rewards.md)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        import diffusers

        return getattr(diffusers, name)
    finally:
        transformers_logging.set_verbosity(verbosity)


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
    (:meth:`FlowMatchingPolicy._note_truncation` says it once instead)."""
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


# ---------------------------------------------------------------- the policy

class FlowMatchingPolicy(abc.ABC):
    """A diffusers flow-matching pipeline as a trainable rectified-flow policy (LoRA on its
    transformer). ``x0`` latents live on ``device``; images come back as float [0, 1] on the CPU.

    Subclasses set ``default_target_modules`` and implement ``_encode_one``, ``_predict`` and
    ``latent_channels`` (see the module docstring).
    """

    default_target_modules: ClassVar[tuple[str, ...]] = ()
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # (pipeline tokenizer attribute, what reads it) for the one-time truncation note
    truncation_reader: ClassVar[tuple[str, str]] = ("tokenizer", "CLIP text encoders read")

    def __init__(self, pipeline, *, name: str, rank: int = 8, alpha: float | None = None,
                 target_modules: Sequence[str] | None = None, seed: int = 0,
                 device: str | torch.device | None = None, mixed_precision: str = "no",
                 gradient_checkpointing: bool | str = False, offload_vae: bool = False,
                 offload_text_encoders: bool = False, max_sequence_length: int = 256,
                 resolution: int | None = None, steps: int = 25, cfg_scale: float = 1.0,
                 sample_batch_size: int = 0, prompt_cache_size: int = 1024,
                 threads: int | None = None, compile: bool | str = False):
        autocast_dtype = check_options(name, mixed_precision=mixed_precision, rank=rank,
                                       gradient_checkpointing=gradient_checkpointing, compile=compile)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.name = name
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = torch.device(device) if device is not None else default_device()
        self.autocast_dtype = autocast_dtype
        self.offload_vae = offload_vae
        self.offload_text_encoders = offload_text_encoders
        self.max_sequence_length = max_sequence_length
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.sample_batch_size = sample_batch_size
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.resolution = resolution or self._default_resolution()
        targets = self.default_target_modules if target_modules is None else target_modules
        self.lora_config = self._lora_config(rank, alpha, targets)
        self._prompt_cache: OrderedDict[str, PromptCond] = OrderedDict()
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

    # ------------------------------------------------------------ what a model part provides
    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """Channels of the VAE latents x0."""

    @abc.abstractmethod
    def _encode_one(self, prompt: str) -> PromptCond:
        """The conditioning of one prompt (batch of one), on ``device``, no grad."""

    @abc.abstractmethod
    def _predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: PromptCond) -> torch.Tensor:
        """The velocity of ``model`` (the transformer, or its torch.compile for no-grad passes)
        for latents x_t [B, C, h, w] at t [B] ∈ [0, 1] (called inside autocast; returns
        [B, C, h, w] in any float dtype)."""

    def _default_resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def _set_timesteps(self, scheduler, steps: int, device: torch.device | str) -> None:
        """The sampler's grid, as diffusers' pipeline sets it: ``steps`` from the scheduler's own
        spacing, with its dynamic shift μ (from the image's token count) when it uses one."""
        extra = {}
        if scheduler.config.get("use_dynamic_shifting"):
            extra["mu"] = self.dynamic_shift(scheduler, self.image_seq_len())
        scheduler.set_timesteps(steps, device=device, **extra)

    def image_seq_len(self) -> int:
        """Image tokens the transformer sees at ``resolution`` (patches of ``patch_size``²)."""
        patch = self.transformer.config.get("patch_size", 1) or 1
        side = self.resolution // self.vae_scale_factor
        return (side // patch) ** 2

    @staticmethod
    def dynamic_shift(scheduler, image_seq_len: int) -> float:
        """μ of the resolution-dependent shift: diffusers' ``calculate_shift`` with the
        scheduler's base/max shift over its base/max image sequence lengths."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

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
        return [m for m in (getattr(self.pipeline, n, None) for n in self.text_encoder_names) if m is not None]

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptCond:
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
                    self._prompt_cache[prompt] = self._encode_one(prompt)
        conds = []
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
            conds.append(self._prompt_cache[prompt])
        while len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return type(conds[0]).cat(conds)

    def _truncation_limit(self, tokenizer) -> int:
        return tokenizer.model_max_length

    def _note_truncation(self, prompt: str) -> None:
        """One warning, the first time a prompt is longer than the text encoder reads (diffusers
        and transformers would print two per batch of prompts, every time)."""
        attribute, reader = self.truncation_reader
        tokenizer = getattr(self.pipeline, attribute, None)
        if self._truncation_noted or tokenizer is None:
            return
        limit = self._truncation_limit(tokenizer)
        if len(tokenizer(prompt, truncation=False)["input_ids"]) > limit:
            self._truncation_noted = True
            warnings.warn(f"policy {self.name!r}: its {reader} {limit} tokens of a prompt; "
                          f"longer prompts are cut (the first: {prompt[:50]!r}…); this note is shown once",
                          UserWarning, stacklevel=2)

    # ------------------------------------------------------------ the three velocity fields
    def _transformer_velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: PromptCond):
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        if self.autocast_dtype is None:  # no autocast (e.g. full_precision): conditioning in fp32 too
            cond = cond.float()
        model = self._no_grad_model() if not torch.is_grad_enabled() else self.transformer
        # Under autocast peft's cast of each LoRA input to float32 is undone by autocast at once:
        # skipped (the same values, two copies fewer per LoRA layer and pass).
        with self._autocast(), lora_inputs_uncast(self.transformer, self.autocast_dtype is not None):
            out = self._predict(model, x_t, t, cond)
        return out.float()

    def _no_grad_model(self):
        if self._compile_mode is None:
            return self.transformer
        if self._compiled is None:
            options = {} if self._compile_mode == "default" else {"mode": self._compile_mode}
            self._compiled = torch.compile(self.transformer, dynamic=False, **options)
        return self._compiled

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptCond) -> torch.Tensor:
        """v_θ(x_t, t, c): trainable LoRA active, gradients flow (t in [0, 1])."""
        if self._auto_checkpointing is not None and torch.is_grad_enabled():
            probe = lambda: self._transformer_velocity(x_t[:1], t[:1], cond.index(slice(0, 1)))  # noqa: E731
            with self._auto_checkpointing(x_t.shape[0], probe):
                return self._transformer_velocity(x_t, t, cond)
        return self._transformer_velocity(x_t, t, cond)

    @torch.no_grad()
    def old_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptCond) -> torch.Tensor:
        """v_old: the old LoRA tensors swapped in (LoRA modules run, under no_grad)."""
        with self._old_weights():
            return self._transformer_velocity(x_t, t, cond)

    @torch.no_grad()
    def ref_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptCond) -> torch.Tensor:
        """v_ref: the frozen base model (adapters disabled)."""
        with self._adapters_disabled():
            return self._transformer_velocity(x_t, t, cond)

    @contextmanager
    def _old_weights(self) -> Iterator[None]:
        with swapped_data(self._trainable, self._old):
            yield

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
        return (batch, self.latent_channels, side, side)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generator: torch.Generator,
               steps: int | None = None, use_old: bool = True,
               noise: torch.Tensor | None = None) -> Rollout:
        """One image per prompt by Euler flow matching (CFG-free unless the CFG scale is > 1).

        The initial noise is drawn at once from ``generator`` (on its device), so the same
        generator state gives the same latents whatever ``sample_batch_size`` is; pass
        ``noise`` of shape ``latent_shape(len(prompts))`` to fix it instead (e.g. the same
        noise for several prompts).
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

    def _scheduler(self, steps: int, device: torch.device | str):
        """A fresh Euler scheduler of the pipeline's config with the ``steps``-step grid set."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        self._set_timesteps(scheduler, steps, device)
        return scheduler

    def sampling_timesteps(self, steps: int | None = None) -> torch.Tensor:
        """The t ∈ [0, 1] at which :meth:`sample` evaluates the velocity with ``steps`` sampler
        steps, first to last (float32 on the CPU): the scheduler's timesteps / 1000, i.e. its
        shifted σ's."""
        return (self._scheduler(steps or self.steps, "cpu").timesteps / 1000.0).float()

    def _euler(self, x: torch.Tensor, cond: PromptCond, steps: int) -> torch.Tensor:
        scheduler = self._scheduler(steps, self.device)
        negative = self._negative_cond(len(cond)) if self.cfg_scale > 1 else None
        for timestep in scheduler.timesteps:
            t = timestep / 1000.0
            v = self._transformer_velocity(x, t, cond)
            if negative is not None:
                v_uncond = self._transformer_velocity(x, t, negative)
                v = v_uncond + self.cfg_scale * (v - v_uncond)
            x = scheduler.step(v, timestep, x, return_dict=False)[0]
        return x

    def _negative_cond(self, batch: int) -> PromptCond:
        return self.encode_prompts([""]).index([0] * batch)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1] on the CPU."""
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

    @property
    def pipeline_class(self):
        """The diffusers pipeline class whose LoRA format the adapters use."""
        return type(self.pipeline)

    def save_adapter(self, directory: str | Path, which: str = "trainable") -> Path:
        """LoRA safetensors that the pipeline class's ``load_lora_weights`` accepts."""
        metadata = self.lora_config.to_dict()
        # peft keeps target_modules as a set, whose order changes with the process's hash seed:
        # sorted, the same adapter is the same bytes in every process.
        if isinstance(metadata.get("target_modules"), (set, frozenset)):
            metadata["target_modules"] = sorted(metadata["target_modules"])
        self.pipeline_class.save_lora_weights(
            str(directory), transformer_lora_layers=self.lora_state_dict(which),
            transformer_lora_adapter_metadata=metadata)
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def load_adapter(self, path: str | Path) -> None:
        """Load a LoRA file/directory written by ``save_adapter`` into the trainable and old weights."""
        from peft.utils import set_peft_model_state_dict

        if not Path(path).exists():
            raise MarbleError(f"policy {self.name!r}: adapter {path} does not exist; pass a "
                              "directory or .safetensors file written by save_adapter")
        state = self.pipeline_class.lora_state_dict(str(path))
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
