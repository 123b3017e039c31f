"""Build and pretrain the `tiny-sd3` prior on the procedural world (seeded, CPU, minutes).

A randomly initialised tiny SD3 cannot be fine-tuned visibly: its images barely vary. So the
embedded default starts from a prior trained here on `marble_plugins.world` scenes (coloured
shapes and short rendered words, each described by its prompt). The model uses the real
diffusers classes at tiny size (SD3Transformer2DModel, AutoencoderKL, two
CLIPTextModelWithProjection encoders with locally built tokenizers, no T5) and is saved with
`StableDiffusion3Pipeline.save_pretrained`, so `tiny-sd3` loads through the `sd3.5` code path.

The shipped weights in ``plugins/policies/tiny_sd3/`` were produced by::

    python -m marble_plugins.policies.tiny_prior --out plugins/policies/tiny_sd3

Four stages: (1) the VAE learns to reconstruct world images; (2) the latent statistics set the
VAE's ``shift_factor`` / ``scaling_factor`` so the transformer sees unit-scale latents; (3) the
transformer and both text encoders learn rectified flow (x_t = (1-t)·x0 + t·ε, v = ε - x0) on
(latent, prompt) pairs, with 10% empty prompts so classifier-free guidance also works; (4) the
VAE decoder alone trains further with the encoder frozen (the latent space the transformer
learnt stays as it is): the short VAE stage leaves its reconstructions blurred.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from marble_plugins import world

PRIOR_DIR = Path(__file__).resolve().parent / "tiny_sd3"
# Recommended sampling settings, stored beside the weights and read by the `tiny-sd3` policy:
# the transformer was trained with exactly this many (zero) T5 tokens in its text sequence.
POLICY_DEFAULTS_FILE = "marble_policy.json"

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"


@dataclass
class PriorConfig:
    """Every knob of the prior; the defaults produced the shipped weights."""

    seed: int = 0
    dataset_size: int = 6000          # distinct rendered scenes
    word_share: float = 0.25          # share of word scenes
    vae_steps: int = 400
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 1.0     # L1 on image gradients (keeps edges and strokes crisp)
    vae_mse_weight: float = 4.0       # with L1 alone colours lag far behind shapes
    vae_latent_noise: float = 1.0    # scale of the posterior noise in training (0: the mean)
    vae_block_out_channels: tuple = (16, 32, 32)   # 3 blocks: 64 px → 16 × 16 latents
    vae_layers_per_block: int = 1
    decoder_steps: int = 600          # stage 4: decoder-only refinement (encoder frozen)
    decoder_batch_size: int = 32
    decoder_lr: float = 1e-3
    latent_channels: int = 4
    patch_size: int = 2               # 2 × 2 latent patches: 8 × 8 image tokens of 8 × 8 px
    transformer_steps: int = 6000
    transformer_batch_size: int = 64
    transformer_lr: float = 2e-3
    warmup_steps: int = 100
    empty_prompt_probability: float = 0.1
    ema_decay: float = 0.999          # the saved transformer / text encoders are this EMA (0: off)
    # "shifted": the sampler's shift-3 distribution (noisy end); "logit-normal": SD3's
    # sigmoid(N(0, 1)). Measured: logit-normal gave no better shapes, colour 0.97 vs 0.99.
    timestep_sampling: str = "shifted"
    timestep_shift: float = 3.0
    num_layers: int = 4
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    clip_hidden_size: int = 32
    clip_layers: int = 2
    model_max_length: int = 16        # CLIP tokens per prompt (world prompts need ≤ 13)
    max_sequence_length: int = 1      # zero "T5" tokens appended by the pipeline (no T5 model)
    sampling_steps: int = 10
    threads: int = 1                  # 2 threads stall for seconds when the 2 cores are shared


# ---------------------------------------------------------------- tokenizers

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map (the base alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def world_words() -> list[str]:
    """Every lowercase word the world's prompts use, in a fixed order."""
    words: list[str] = []
    templates = [world.Scene(color=c, shape=s, background=b).prompt()
                 for c in world.COLORS for s in world.SHAPES for b in world.BACKGROUNDS]
    templates += [world.Scene(word=w, background=b).prompt()
                  for w in world.WORDS for b in world.BACKGROUNDS]
    for prompt in templates:
        for word in prompt.replace('"', " ").lower().split():
            if word not in words:
                words.append(word)
    return words


def apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none applies."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_clip_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A deterministic CLIP-style BPE vocabulary: all bytes, then whole-word merges.

    For each word, append the merge of the first two symbols BPE still leaves, until the word is
    one token. A new merge has the highest rank, so it only fires once the earlier ones are
    exhausted: every world word becomes a single token and any other text still tokenizes.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := apply_merges(list(word[:-1]) + [word[-1] + END_OF_WORD], ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in ranks]


def build_tokenizer(model_max_length: int):
    """A CLIPTokenizer over the world vocabulary (same tokenizer for both CLIP encoders)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_vocab(world_words())
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                         model_max_length=model_max_length)


# ---------------------------------------------------------------- model components

def build_text_encoder(tokenizer, config: PriorConfig):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.clip_hidden_size,
        intermediate_size=2 * config.clip_hidden_size, num_hidden_layers=config.clip_layers,
        num_attention_heads=4, max_position_embeddings=config.model_max_length,
        projection_dim=config.clip_hidden_size, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(text_config)


def latent_side(config: PriorConfig) -> int:
    return world.IMAGE_SIZE // 2 ** (len(config.vae_block_out_channels) - 1)


def build_transformer(config: PriorConfig):
    from diffusers import SD3Transformer2DModel

    width = config.attention_head_dim * config.num_attention_heads  # = caption_projection_dim
    side = latent_side(config)
    return SD3Transformer2DModel(
        sample_size=side, patch_size=config.patch_size, in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        num_layers=config.num_layers, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=2 * config.clip_hidden_size,   # ≥ sum of the CLIP hidden sizes
        caption_projection_dim=width,
        pooled_projection_dim=2 * config.clip_hidden_size,  # = sum of the CLIP projections
        pos_embed_max_size=max(16, side // config.patch_size),
    )


def build_vae(config: PriorConfig):
    from diffusers import AutoencoderKL

    blocks = len(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.vae_block_out_channels),
        layers_per_block=config.vae_layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=8, sample_size=world.IMAGE_SIZE,
        scaling_factor=1.0, shift_factor=0.0,   # set from the latent statistics after training
        use_quant_conv=False, use_post_quant_conv=False,  # as in SD3's VAE
    )


def build_pipeline(config: PriorConfig):
    """A randomly initialised tiny StableDiffusion3Pipeline (seeded), without T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from marble_plugins.policies.sd3 import sd3_pipeline_class

    StableDiffusion3Pipeline = sd3_pipeline_class()

    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.model_max_length)
    tokenizer_2 = build_tokenizer(config.model_max_length)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_vae(config),
        text_encoder=build_text_encoder(tokenizer, config), tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer_2, config), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


# ---------------------------------------------------------------- data

def world_dataset(size: int, seed: int, word_share: float = 0.25) -> tuple[torch.Tensor, list[str]]:
    """``size`` random scenes: images [N, 3, 64, 64] in [-1, 1] (the VAE's range) and prompts."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, word_share=word_share) for _ in range(size)]
    images = np.stack([world.render_array(scene) for scene in scenes])
    return torch.from_numpy(images) * 2 - 1, [scene.prompt() for scene in scenes]


def shifted_timesteps(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform u to the SD3 sampler's shifted times t = s·u / (1 + (s-1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


def training_timesteps(n: int, config: PriorConfig, generator: torch.Generator) -> torch.Tensor:
    if config.timestep_sampling == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if config.timestep_sampling == "shifted":
        return shifted_timesteps(torch.rand(n, generator=generator), config.timestep_shift)
    raise ValueError(f"timestep_sampling must be 'logit-normal' or 'shifted', "
                     f"got {config.timestep_sampling!r}")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- training stages

def edge_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two image batches."""
    def grads(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
    (ry, rx), (ty, tx) = grads(reconstruction), grads(target)
    return F.l1_loss(ry, ty) + F.l1_loss(rx, tx)


def noisy_latents(posterior, config: PriorConfig, generator: torch.Generator) -> torch.Tensor:
    """A posterior sample with its noise scaled by ``vae_latent_noise`` (0: the mean)."""
    return posterior.mean + config.vae_latent_noise * posterior.std * torch.randn(
        posterior.mean.shape, generator=generator)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, config: PriorConfig) -> torch.Tensor:
    """L1 + ``vae_mse_weight``·MSE + ``vae_edge_weight``·L1 of the image gradients."""
    return (F.l1_loss(reconstruction, target)
            + config.vae_mse_weight * F.mse_loss(reconstruction, target)
            + config.vae_edge_weight * edge_loss(reconstruction, target))


def train_vae(vae, images: torch.Tensor, config: PriorConfig, generator: torch.Generator,
              log: Callable[[str], None]) -> None:
    """Reconstruction (MSE) plus a tiny KL term, on random batches of world images."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * warmup_cosine(step, config.vae_steps, config.warmup_steps)
        batch = images[torch.randint(len(images), (config.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(noisy_latents(posterior, config, generator)).sample
        loss = reconstruction_loss(reconstruction, batch, config) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.4f}")
    vae.eval()


def refine_decoder(vae, images: torch.Tensor, config: PriorConfig, log: Callable[[str], None]) -> None:
    """Stage 4: train the decoder alone, on the VAE stage's loss, with the encoder frozen.

    The encoder (and so the latent space, its shift/scale and everything the transformer learnt)
    does not change; the decoder learns to turn the same latents into crisper images (the
    400-step VAE stage leaves edges blurred: docs/tiny-sd3.md). Its own generator (seed + 1),
    so the earlier stages are exactly as without it.
    """
    generator = torch.Generator().manual_seed(config.seed + 1)
    encoder = [p for name, p in vae.named_parameters() if not name.startswith("decoder.")]
    decoder = [p for name, p in vae.named_parameters() if name.startswith("decoder.")]
    for parameter in encoder:
        parameter.requires_grad_(False)
    vae.train()
    optimizer = torch.optim.AdamW(decoder, lr=config.decoder_lr, weight_decay=0.0)
    try:
        for step in range(config.decoder_steps):
            for group in optimizer.param_groups:
                group["lr"] = config.decoder_lr * warmup_cosine(step, config.decoder_steps, config.warmup_steps)
            batch = images[torch.randint(len(images), (config.decoder_batch_size,), generator=generator)]
            with torch.no_grad():
                latents = noisy_latents(vae.encode(batch).latent_dist, config, generator)
            loss = reconstruction_loss(vae.decode(latents).sample, batch, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 200 == 0 or step == config.decoder_steps - 1:
                log(f"decoder step {step:5d}  loss {loss.item():.4f}")
    finally:
        for parameter in encoder:
            parameter.requires_grad_(True)
        vae.eval()


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of all images (raw VAE latent space)."""
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


def set_latent_statistics(vae, raw_latents: torch.Tensor) -> torch.Tensor:
    """Store shift/scale in the VAE config (SD3 convention) and return the normalised latents."""
    shift = raw_latents.mean().item()
    scale = 1.0 / raw_latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (raw_latents - shift) * scale


def train_transformer(pipeline, latents: torch.Tensor, prompts: list[str], config: PriorConfig,
                      generator: torch.Generator, log: Callable[[str], None]) -> None:
    """Rectified-flow regression of v = ε − x0 for the transformer and both text encoders."""
    modules = [pipeline.transformer, pipeline.text_encoder, pipeline.text_encoder_2]
    parameters = [p for module in modules for p in module.parameters()]
    for module in modules:
        module.train()
    optimizer = torch.optim.AdamW(parameters, lr=config.transformer_lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in parameters] if config.ema_decay > 0 else None
    for step in range(config.transformer_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.transformer_lr * warmup_cosine(
                step, config.transformer_steps, config.warmup_steps)
        index = torch.randint(len(latents), (config.transformer_batch_size,), generator=generator)
        drop = torch.rand(len(index), generator=generator) < config.empty_prompt_probability
        batch_prompts = ["" if dropped else prompts[i] for i, dropped in zip(index.tolist(), drop)]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = training_timesteps(len(index), config, generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            batch_prompts, None, None, device=torch.device("cpu"),
            do_classifier_free_guidance=False, max_sequence_length=config.max_sequence_length)
        velocity = pipeline.transformer(hidden_states=x_t, timestep=t * 1000,
                                        encoder_hidden_states=prompt_embeds,
                                        pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1 - decay)
        if step % 250 == 0 or step == config.transformer_steps - 1:
            log(f"transformer step {step:5d}  loss {loss.item():.4f}")
    if ema is not None:
        with torch.no_grad():
            for parameter, average in zip(parameters, ema):
                parameter.copy_(average)
    for module in modules:
        module.eval()


def train_prior(out_dir: str | Path, config: PriorConfig | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Build, pretrain and save the tiny SD3 prior to ``out_dir`` (diffusers on-disk format)."""
    config = config or PriorConfig()
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed)
        pipeline = build_pipeline(config)
        images, prompts = world_dataset(config.dataset_size, config.seed, config.word_share)
        log(f"dataset: {len(images)} scenes rendered in {time.perf_counter() - start:.1f}s")
        train_vae(pipeline.vae, images, config, generator, log)
        latents = set_latent_statistics(pipeline.vae, encode_dataset(pipeline.vae, images))
        log(f"vae done at {time.perf_counter() - start:.0f}s; "
            f"shift {pipeline.vae.config.shift_factor:.3f} scale {pipeline.vae.config.scaling_factor:.3f}")
        train_transformer(pipeline, latents, prompts, config, generator, log)
        log(f"transformer done at {time.perf_counter() - start:.0f}s")
        refine_decoder(pipeline.vae, images, config, log)
        log(f"decoder done at {time.perf_counter() - start:.0f}s")
        save_prior(pipeline, out_dir, config)
        return out_dir
    finally:
        torch.set_num_threads(previous_threads)


def save_prior(pipeline, out_dir: Path, config: PriorConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    from marble_plugins.policies.sd3 import write_absent_t5

    pipeline.save_pretrained(out_dir, safe_serialization=True)
    write_absent_t5(out_dir)  # so that a plain StableDiffusion3Pipeline.from_pretrained loads it
    defaults = {"max_sequence_length": config.max_sequence_length,
                "steps": config.sampling_steps, "resolution": world.IMAGE_SIZE,
                "prior_config": asdict(config)}
    (out_dir / POLICY_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    defaults = PriorConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(PRIOR_DIR), help="output directory")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.transformer_steps,
                        help="transformer training steps")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--dataset-size", type=int, default=defaults.dataset_size)
    parser.add_argument("--batch-size", type=int, default=defaults.transformer_batch_size,
                        help="transformer batch size")
    parser.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    parser.add_argument("--decoder-steps", type=int, default=defaults.decoder_steps,
                        help="stage 4: decoder-only refinement steps")
    parser.add_argument("--decoder-batch-size", type=int, default=defaults.decoder_batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    config = PriorConfig(seed=args.seed, transformer_steps=args.steps, vae_steps=args.vae_steps,
                         dataset_size=args.dataset_size, threads=args.threads,
                         transformer_batch_size=args.batch_size, vae_batch_size=args.vae_batch_size,
                         decoder_steps=args.decoder_steps, decoder_batch_size=args.decoder_batch_size,
                         warmup_steps=min(defaults.warmup_steps, max(1, args.steps // 10)))
    train_prior(args.out, config)


if __name__ == "__main__":
    main()
