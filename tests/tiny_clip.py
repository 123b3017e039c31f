"""Tiny CLIP models and tokenizers for the reward tests, saved the way real weights ship.

* :func:`tiny_tokenizer` — a CLIP BPE tokenizer over single bytes (vocab and merges built here,
  deterministic), ``<|endoftext|>`` with the largest id as in the real vocabulary.
* :func:`tiny_clip` — a randomly initialised transformers ``CLIPModel`` with small widths.
* :func:`to_open_clip_state_dict` — the same weights under open_clip's key names (the layout of
  ``HPS_v2.1_compressed.pt``'s ``state_dict``), the inverse of the production converter.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

# Common words get merged tokens so the tokenizer exercises real BPE merges.
MERGED_WORDS = ("a", "cat", "dog", "photo", "of", "the", "red", "blue")


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable unicode character per byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def tiny_tokenizer() -> CLIPTokenizer:
    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny tokenizer's vocabulary and BPE merges (also written as an open_clip BPE file by
    tests/reference/record_reward_references.py: the ids come out the same)."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    for word in MERGED_WORDS:
        prefix = word[0]
        for position, char in enumerate(word[1:], start=1):
            last = position == len(word) - 1
            piece = char + "</w>" if last else char
            merges.append((prefix, piece))
            prefix += piece
            if prefix not in tokens:
                tokens.append(prefix)
    merges = list(dict.fromkeys(merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # eot has the largest id, like CLIP's 49407
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def tiny_clip(tokenizer: CLIPTokenizer, seed: int = 0, vision_width: int = 160,
              vision_heads: int = 2, text_width: int = 128, text_heads: int = 2,
              hidden_act: str = "gelu", projection_dim: int = 64) -> CLIPModel:
    """A random CLIP: 2 layers per tower, patch 32 at 224 px (7×7 patches)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
            num_attention_heads=text_heads, vocab_size=len(tokenizer), max_position_embeddings=77,
            hidden_act=hidden_act, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2,
            num_attention_heads=vision_heads, patch_size=32, image_size=224, hidden_act=hidden_act,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    with torch.no_grad():  # HF's init is tiny; larger weights make features input-dependent
        for name, param in model.named_parameters():
            if param.ndim >= 2 or "embedding" in name:
                param.normal_(0.0, 0.05)
    return model.eval()


def _block_to_open_clip(hf: dict[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    out = {
        f"{target}attn.in_proj_weight": torch.cat(
            [hf[f"{source}self_attn.{p}_proj.weight"] for p in "qkv"], dim=0),
        f"{target}attn.in_proj_bias": torch.cat(
            [hf[f"{source}self_attn.{p}_proj.bias"] for p in "qkv"], dim=0),
    }
    renames = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for new, old in renames.items():
        for param in ("weight", "bias"):
            out[f"{target}{old}.{param}"] = hf[f"{source}{new}.{param}"]
    return out


def to_open_clip_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """``model``'s weights in open_clip's layout (what open_clip's CLIP.state_dict() returns)."""
    hf = {key: value.detach().clone() for key, value in model.state_dict().items()}
    state = {
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": hf["logit_scale"],
        # open_clip builds its causal mask as a buffer; some checkpoints carry it
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
    }
    for layer in range(model.config.vision_config.num_hidden_layers):
        state.update(_block_to_open_clip(hf, f"vision_model.encoder.layers.{layer}.",
                                         f"visual.transformer.resblocks.{layer}."))
    for layer in range(model.config.text_config.num_hidden_layers):
        state.update(_block_to_open_clip(hf, f"text_model.encoder.layers.{layer}.",
                                         f"transformer.resblocks.{layer}."))
    return state
