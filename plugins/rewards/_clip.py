"""Shared CLIP machinery of the model-based rewards (private: not a plugin).

* Tensor preprocessing (no PIL round trip, no torchvision): OpenAI CLIP normalization after
  either "resize the shortest side + center-crop" (PickScore and aesthetic the way
  CLIPImageProcessor does it, CLIP the way torchvision does it) or "resize the longest side +
  pad" (HPS, like HPSv2's ``ResizeMaxSize``).
* Text tokenization the way open_clip does it: its text cleaning (ftfy, HTML entities,
  whitespace), ``[sot] tokens [eot]``, 77 tokens, zero padding.
* Conversion of an open_clip ViT state dict (``visual.*``, ``transformer.*``, ...) into a
  transformers :class:`CLIPModel` — the same network, so ``hps`` and ``clip`` work without
  open_clip (which needs torchvision).
* :class:`ClipEncoders`: image/text embeddings behind one interface for the three ways a CLIP
  arrives (transformers directory, converted open_clip checkpoint, real open_clip).
"""

from __future__ import annotations

import abc
import html
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from marble_kit.errors import MarbleError
from marble_kit.rewards import Reward
from marble_kit.weights import WeightsSpec, resolve_weights

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77

# The CLIP BPE tokenizer (open_clip's bpe_simple_vocab_16e6 is the same vocabulary).
TOKENIZER_SPEC = WeightsSpec(
    reward="clip tokenizer",
    filename="tokenizer_config.json",
    option="tokenizer",
    env_var="MARBLE_CLIP_TOKENIZER",
    source="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    kind="dir",
    description="CLIP tokenizer directory",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str, reward: str) -> torch.dtype:
    if name not in DTYPES:
        raise MarbleError(
            f"{reward}: dtype {name!r} is not supported; use one of {', '.join(DTYPES)} "
            f"(--reward-opt {reward}.dtype=float32)"
        )
    return DTYPES[name]


# --------------------------------------------------------------------------- preprocessing


def _resize(images: torch.Tensor, height: int, width: int, interpolation: str = "bicubic") -> torch.Tensor:
    if images.shape[-2:] == (height, width):
        return images
    resized = F.interpolate(images, size=(height, width), mode=interpolation, antialias=True,
                            align_corners=False)
    if interpolation == "bicubic":
        return resized.clamp(0, 1)  # bicubic overshoots; PIL pipelines clip to uint8 range
    return resized  # bilinear weights are ≥ 0: no overshoot (torchvision does not clamp either)


# How a "resize the shortest side, crop the center" reference resamples and where it cuts:
# transformers' CLIPImageProcessor (PickScore, the aesthetic predictor): bicubic, crop offset
# (margin) // 2; torchvision's Resize + CenterCrop on tensors (Flow-GRPO's CLIP scorer):
# bilinear (its default), offset int(round(margin / 2)) — Python rounds halves to even.
CROP_STYLES = {"hf": "bicubic", "torchvision": "bilinear"}


def resize_shortest_center_crop(images: torch.Tensor, size: int, style: str = "hf") -> torch.Tensor:
    """Resize so the shortest side is ``size`` (aspect kept), then crop the ``size``² center
    the way ``style`` (a key of :data:`CROP_STYLES`) does."""
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # floor, as torchvision / CLIPImageProcessor do
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    images = _resize(images, new_h, new_w, CROP_STYLES[style])
    if style == "hf":
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # half to even
    return images[..., top:top + size, left:left + size]


def resize_longest_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the longest side is ``size``, then pad (black) to ``size``² centered (HPSv2)."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    images = _resize(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def clip_pixels(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``images`` in [0, 1] → normalized CLIP input. ``mode``: ``"crop"`` (CLIPImageProcessor's
    resize + center crop), ``"crop-torchvision"`` (torchvision's Resize + CenterCrop) or
    ``"pad"`` (longest side + padding, HPSv2)."""
    if mode == "crop":
        return normalize(resize_shortest_center_crop(images, size, "hf"))
    if mode == "crop-torchvision":
        return normalize(resize_shortest_center_crop(images, size, "torchvision"))
    if mode == "pad":
        return normalize(resize_longest_pad(images, size))
    raise ValueError(f"unknown preprocessing mode {mode!r} (crop, crop-torchvision or pad)")


# --------------------------------------------------------------------------- loading


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (we check missing keys ourselves)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(model_class: Any, path: Path, reward: str, source: str, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(path)`` in eval mode; every weight must come from the file.

    Extra keys (a text tower when only the vision tower is wanted) are fine; missing ones mean
    the directory holds a different model, which would otherwise score with random weights.
    """
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise MarbleError(
            f"{reward}: cannot load {model_class.__name__} from {path}: {str(exc).splitlines()[0]}; "
            f"pass a directory laid out like {source}"
        ) from exc
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise MarbleError(
            f"{reward}: {path} lacks weights for {missing[0]!r} ({len(missing)} missing); pass a "
            f"complete checkpoint laid out like {source}"
        )
    return model.eval()


# --------------------------------------------------------------------------- tokenization


def load_clip_tokenizer(path: Path) -> Any:
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise MarbleError(
            f"cannot load a CLIP tokenizer from {path}: {exc}; pass a directory with the CLIP "
            f"tokenizer files (e.g. from {TOKENIZER_SPEC.source})"
        ) from exc


def open_clip_clean(text: str) -> str:
    """open_clip's text cleaning before BPE: ``ftfy.fix_text`` (curly quotes → straight,
    full-width → ASCII, ligatures split, mojibake repaired), HTML entities unescaped twice,
    whitespace runs → one space, stripped, lowercased. transformers' CLIP tokenizer does none of
    it but the last two, so without it "“open”", "&amp;" or "ﬁ" give other token ids."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def open_clip_token_ids(tokenizer: Any, prompts: Sequence[str],
                        context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """open_clip's text input: the prompts cleaned like open_clip (:func:`open_clip_clean`),
    ``[sot] tokens [eot]`` cut to ``context_length`` (the eot kept), zero-padded."""
    cleaned = [open_clip_clean(prompt) for prompt in prompts]
    encoded = tokenizer(cleaned, add_special_tokens=True, truncation=False)["input_ids"]
    ids = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        if len(tokens) > context_length:
            tokens = tokens[:context_length - 1] + [tokenizer.eos_token_id]  # keep the eot
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class OpenClipArch:
    """What an open_clip state dict does not say by its shapes: head widths and activation."""

    vision_head_width: int = 64
    text_head_width: int = 64
    quick_gelu: bool = False


# open_clip model configs (src/open_clip/model_configs/*.json). OpenAI-pretrained weights use
# QuickGELU; LAION-trained ones (ViT-H-14, HPS) use exact GELU.
OPEN_CLIP_ARCHS = {
    "ViT-B-32": OpenClipArch(64, 64),
    "ViT-B-16": OpenClipArch(64, 64),
    "ViT-L-14": OpenClipArch(64, 64),
    "ViT-H-14": OpenClipArch(80, 64),
    "ViT-g-14": OpenClipArch(88, 64),
    "ViT-bigG-14": OpenClipArch(104, 64),
}


def open_clip_arch(model_name: str, pretrained: str | None, reward: str) -> OpenClipArch:
    name = model_name.removesuffix("-quickgelu")
    if name not in OPEN_CLIP_ARCHS:
        raise MarbleError(
            f"{reward}: open_clip model {model_name!r} is not supported without open_clip; use one "
            f"of {', '.join(OPEN_CLIP_ARCHS)} or `pip install marble-kit[open-clip]`"
        )
    arch = OPEN_CLIP_ARCHS[name]
    quick = model_name.endswith("-quickgelu") or (pretrained or "").lower() == "openai"
    return OpenClipArch(arch.vision_head_width, arch.text_head_width, quick)


def _block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in state if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def clip_config_from_open_clip(state: dict[str, torch.Tensor], arch: OpenClipArch) -> Any:
    """A transformers ``CLIPConfig`` with the sizes read off an open_clip state dict."""
    from transformers import CLIPConfig

    conv = state["visual.conv1.weight"]                  # [width, 3, patch, patch]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    text_width = state["token_embedding.weight"].shape[1]
    if vision_width % arch.vision_head_width or text_width % arch.text_head_width:
        raise MarbleError(
            f"open_clip checkpoint widths (vision {vision_width}, text {text_width}) do not fit "
            f"head widths {arch.vision_head_width}/{arch.text_head_width}; check the model option"
        )
    activation = "quick_gelu" if arch.quick_gelu else "gelu"
    vision_config = dict(
        hidden_size=vision_width,
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_block_count(state, "visual.transformer.resblocks."),
        num_attention_heads=vision_width // arch.vision_head_width,
        patch_size=patch, image_size=patch * grid, hidden_act=activation, layer_norm_eps=1e-5,
    )
    text_config = dict(
        hidden_size=text_width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_block_count(state, "transformer.resblocks."),
        num_attention_heads=text_width // arch.text_head_width,
        vocab_size=state["token_embedding.weight"].shape[0],
        max_position_embeddings=state["positional_embedding"].shape[0],
        hidden_act=activation, layer_norm_eps=1e-5,
    )
    vocab_size = text_config["vocab_size"]
    # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|> (49406, 49407)
    text_config.update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0)
    projection_dim = state["text_projection"].shape[1]
    return CLIPConfig(text_config={**text_config, "projection_dim": projection_dim},
                      vision_config={**vision_config, "projection_dim": projection_dim},
                      projection_dim=projection_dim)


def _convert_block(state: dict[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    """One open_clip residual block → one transformers CLIPEncoderLayer."""
    q, k, v = state[f"{source}attn.in_proj_weight"].chunk(3, dim=0)
    q_bias, k_bias, v_bias = state[f"{source}attn.in_proj_bias"].chunk(3, dim=0)
    out = {
        f"{target}self_attn.q_proj.weight": q, f"{target}self_attn.q_proj.bias": q_bias,
        f"{target}self_attn.k_proj.weight": k, f"{target}self_attn.k_proj.bias": k_bias,
        f"{target}self_attn.v_proj.weight": v, f"{target}self_attn.v_proj.bias": v_bias,
    }
    renames = {
        "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }
    for old, new in renames.items():
        for param in ("weight", "bias"):
            out[f"{target}{new}.{param}"] = state[f"{source}{old}.{param}"]
    return out


def open_clip_to_hf_state_dict(state: dict[str, torch.Tensor], num_vision_layers: int,
                               num_text_layers: int) -> dict[str, torch.Tensor]:
    """Rename/split/transpose open_clip keys into transformers ``CLIPModel`` keys."""
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        # open_clip multiplies x @ proj ([width, dim]); nn.Linear stores [dim, width]
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"],
    }
    for layer in range(num_vision_layers):
        out.update(_convert_block(state, f"visual.transformer.resblocks.{layer}.",
                                  f"vision_model.encoder.layers.{layer}."))
    for layer in range(num_text_layers):
        out.update(_convert_block(state, f"transformer.resblocks.{layer}.",
                                  f"text_model.encoder.layers.{layer}."))
    return {key: value.contiguous() for key, value in out.items()}


# Buffers open_clip may save that carry no weights (the causal mask is rebuilt by transformers).
_IGNORED_OPEN_CLIP_KEYS = ("attn_mask", "visual.attn_mask")


def open_clip_to_hf(state: dict[str, torch.Tensor], arch: OpenClipArch, what: str) -> nn.Module:
    """A transformers ``CLIPModel`` computing the same function as the open_clip ``state``."""
    from transformers import CLIPModel

    required = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection",
                "visual.transformer.resblocks.0.attn.in_proj_weight")
    absent = [key for key in required if key not in state]
    if absent:
        raise MarbleError(
            f"{what}: the checkpoint is not an open_clip ViT state dict (no {absent[0]!r}); "
            "pass the open_clip checkpoint the reward documents"
        )
    config = clip_config_from_open_clip(state, arch)
    converted = open_clip_to_hf_state_dict(state, config.vision_config.num_hidden_layers,
                                           config.text_config.num_hidden_layers)
    used = {key for key in state if key in _IGNORED_OPEN_CLIP_KEYS}
    leftovers = sorted(set(state) - used - _consumed_open_clip_keys(config))
    if leftovers:
        raise MarbleError(
            f"{what}: the open_clip checkpoint has parameters this converter does not know "
            f"({leftovers[0]!r}, {len(leftovers)} in all); install open_clip "
            "(`pip install marble-kit[open-clip]`) to load this architecture"
        )
    model = CLIPModel(config)
    model.load_state_dict(converted, strict=True)  # copies, casting fp16 checkpoints to fp32
    return model.eval()


def _consumed_open_clip_keys(config: Any) -> set[str]:
    keys = {
        "visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight",
        "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
        "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight",
        "ln_final.bias", "text_projection", "logit_scale",
    }
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
             "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    for prefix, count in (("visual.transformer.resblocks.", config.vision_config.num_hidden_layers),
                          ("transformer.resblocks.", config.text_config.num_hidden_layers)):
        keys.update(f"{prefix}{layer}.{name}" for layer in range(count) for name in block)
    return keys


# --------------------------------------------------------------------------- encoders


def pooled_features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output object (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoders(abc.ABC):
    """Image and text embeddings of one CLIP, whatever format it came in.

    Subclasses implement :meth:`image_features` / :meth:`text_features`; ``module`` is what
    ``.to()`` moves, ``image_size`` the side the preprocessing produces.
    """

    module: nn.Module
    image_size: int

    @abc.abstractmethod
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings [B, D]."""

    @abc.abstractmethod
    def text_features(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        """L2-normalized text embeddings [B, D]."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


class TransformersClip(ClipEncoders):
    """A transformers ``CLIPModel`` with its own tokenizer (PickScore, HF CLIP directories)."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.module, self.tokenizer = model, tokenizer
        self.image_size = int(model.config.vision_config.image_size)

    def image_features(self, pixels):
        return pooled_features(self.module.get_image_features(pixel_values=pixels))

    def text_features(self, prompts, device):
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True,
                                max_length=CONTEXT_LENGTH, return_tensors="pt")
        return pooled_features(self.module.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))


class ConvertedOpenClip(ClipEncoders):
    """An open_clip checkpoint converted to a transformers ``CLIPModel``, open_clip's text input.

    open_clip pools the text at ``argmax(token ids)`` (the eot token has the largest id);
    doing the same here keeps the result independent of the config's ``eos_token_id``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.module, self.tokenizer = model, tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def image_features(self, pixels):
        return pooled_features(self.module.get_image_features(pixel_values=pixels))

    def text_features(self, prompts, device):
        ids = open_clip_token_ids(self.tokenizer, prompts, self.context_length).to(device)
        hidden = self.module.text_model(input_ids=ids).last_hidden_state  # final LN applied
        pooled = hidden[torch.arange(ids.shape[0], device=device), ids.argmax(dim=-1)]
        return self.module.text_projection(pooled)


class OpenClip(ClipEncoders):
    """A real open_clip model (used when open_clip imports)."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.module, self.tokenizer = model, tokenizer
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def image_features(self, pixels):
        return self.module.encode_image(pixels)

    def text_features(self, prompts, device):
        return self.module.encode_text(self.tokenizer(list(prompts)).to(device))


def import_open_clip(backend: str, reward: str) -> Any | None:
    """The ``open_clip`` module when ``backend`` allows it and it imports; else None."""
    if backend not in ("auto", "open_clip", "transformers"):
        raise MarbleError(
            f"{reward}: backend {backend!r} is unknown; use auto, open_clip or transformers "
            f"(--reward-opt {reward}.backend=auto)"
        )
    if backend == "transformers":
        return None
    try:
        import open_clip  # optional extra: needs torchvision
    except Exception as exc:  # torchvision built for another torch fails in many ways
        if backend == "open_clip":
            raise MarbleError(
                f"{reward}: backend=open_clip but open_clip does not import ({exc}); "
                "`pip install marble-kit[open-clip]` or use backend=transformers"
            ) from exc
        return None
    return open_clip


def open_clip_encoders(state: dict[str, torch.Tensor], model_name: str, pretrained: str | None,
                       backend: str, tokenizer_path: str | None, reward: str) -> ClipEncoders:
    """Encoders for an open_clip state dict: through open_clip if present, else converted."""
    open_clip = import_open_clip(backend, reward)
    if open_clip is not None:
        force_quick_gelu = (pretrained or "").lower() == "openai"
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=force_quick_gelu)
        model.load_state_dict(state)
        return OpenClip(model.eval(), open_clip.get_tokenizer(model_name))
    arch = open_clip_arch(model_name, pretrained, reward)
    tokenizer = load_clip_tokenizer(resolve_weights(replace(TOKENIZER_SPEC, reward=reward),
                                                    tokenizer_path))
    return ConvertedOpenClip(open_clip_to_hf(state, arch, reward), tokenizer)


def cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of L2-normalized image and text embeddings."""
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    return (image_features * text_features).sum(-1)


class ClipCosineReward(Reward):
    """Cosine between CLIP image and prompt embeddings, times ``scale`` (hps, clip, pickscore)."""

    def __init__(self, name: str, encoders: ClipEncoders, preprocess: str, scale: float = 1.0,
                 batch_size: int = 16, device: str | torch.device = "cpu"):
        self.name, self.encoders, self.preprocess = name, encoders, preprocess
        self.scale, self.batch_size = scale, batch_size
        self.to(device)

    def to(self, device):
        super().to(device)
        self.encoders.module.to(self.device)
        return self

    def score(self, images, prompts):
        pixels = clip_pixels(images, self.encoders.image_size, self.preprocess)
        image_features = self.encoders.image_features(pixels.to(self.encoders.dtype))
        text_features = self.encoders.text_features(prompts, self.device)
        return self.scale * cosine(image_features, text_features)
