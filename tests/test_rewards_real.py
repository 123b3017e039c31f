"""The model-based rewards on tiny random models saved in the real formats, and OCR for real.

Each model test saves a tiny model the way the real weights are distributed (open_clip state
dict under ``"state_dict"`` for HPS, a transformers directory for PickScore / CLIP, a ``.pth``
MLP head for the aesthetic predictor), loads it through the production factory and checks
shapes, determinism, that the score moves with the input, and that it equals the score the
original tiny model computes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from marble_kit import registry
from marble_kit.errors import MarbleError
from marble_kit.weights import WeightsSpec, load_checkpoint, resolve_weights
from marble_plugins.rewards import _clip
from marble_plugins.rewards.aesthetic import build_aesthetic
from marble_plugins.rewards.clip import build_clip
from marble_plugins.rewards.hps import build_hps
from marble_plugins.rewards.ocr import build_ocr, levenshtein, ocr_text_reward
from marble_plugins.rewards.pickscore import build_pickscore

sys.path.insert(0, str(Path(__file__).parent))
from tiny_clip import tiny_clip, tiny_tokenizer, to_open_clip_state_dict

PROMPTS = ["a photo of a red cat", "a blue dog", "the photo of the dog", "zebra"]
WEIGHT_ENV_VARS = ("MARBLE_HPS_WEIGHTS", "MARBLE_PICKSCORE_PATH", "MARBLE_AESTHETIC_WEIGHTS",
                   "MARBLE_AESTHETIC_CLIP", "MARBLE_CLIP_WEIGHTS", "MARBLE_CLIP_TOKENIZER")


@pytest.fixture(autouse=True)
def _no_ambient_weights(monkeypatch, tmp_path):
    """No weights from the developer's environment or HF cache leak into these tests."""
    for name in WEIGHT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def _images(batch: int = 4, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Tiny models on disk in each real format, plus the in-memory originals."""
    root = tmp_path_factory.mktemp("tiny-rewards")
    tokenizer_dir = root / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)

    hps_model = tiny_clip(tokenizer, seed=1)  # ViT-H-14 head widths: vision 80, text 64
    hps_file = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": to_open_clip_state_dict(hps_model)}, hps_file)

    clip_model = tiny_clip(tokenizer, seed=2, vision_width=128, hidden_act="quick_gelu")
    clip_dir = root / "clip-vit-large-patch14"
    clip_model.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    clip_file = root / "open_clip_model.pt"
    torch.save(to_open_clip_state_dict(clip_model), clip_file)

    pick_model = tiny_clip(tokenizer, seed=3)
    pick_dir = root / "PickScore_v1"
    pick_model.save_pretrained(pick_dir)  # PickScore_v1 ships no tokenizer: it comes separately

    torch.manual_seed(4)
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((64, 1024), (1024, 128), (128, 64),
                                                           (64, 16), (16, 1))):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / math.sqrt(fan_in)
        head[f"layers.{index}.bias"] = torch.randn(fan_out) * 0.1
    head_file = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head, head_file)

    return dict(tokenizer_dir=tokenizer_dir, hps_model=hps_model, hps_file=hps_file,
                clip_model=clip_model, clip_dir=clip_dir, clip_file=clip_file,
                pick_model=pick_model, pick_dir=pick_dir, head=head, head_file=head_file)


def _reference_cosine(model, tokenizer, images, prompts, mode):
    """What the original transformers model says: its own text pooling (first eos token)."""
    with torch.no_grad():
        pixels = _clip.clip_pixels(images, 224, mode)
        image_features = _clip.pooled_features(model.get_image_features(pixel_values=pixels))
        ids = _clip.open_clip_token_ids(tokenizer, prompts)
        text_features = _clip.pooled_features(model.get_text_features(input_ids=ids))
    return F.cosine_similarity(image_features, text_features, dim=-1)


def _check_reward_behaviour(reward, images, prompts):
    """[B] scores, deterministic, finite, moving with the image and with the prompt."""
    scores = reward(images, prompts)
    assert scores.shape == (images.shape[0],) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(reward(images, prompts), scores, rtol=0, atol=0)
    assert scores.std() > 1e-4  # different images/prompts, different scores
    flipped = reward(images.flip(-1).roll(17, dims=-2), prompts)
    assert (flipped - scores).abs().max() > 1e-5
    return scores


# --------------------------------------------------------------------------- preprocessing


@settings(max_examples=30, deadline=None)
@given(height=st.integers(8, 300), width=st.integers(8, 300),
       mode=st.sampled_from(["crop", "crop-torchvision", "pad"]))
def test_clip_pixels_always_square(height, width, mode):
    images = torch.rand(2, 3, height, width)
    pixels = _clip.clip_pixels(images, 224, mode)
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.isfinite(pixels).all()


def test_center_crop_matches_pil_bicubic():
    """Shortest side to 224 then the center, as CLIPImageProcessor does with PIL."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 160), torch.linspace(0, 1, 320), indexing="ij")
    image = torch.stack([x, y, (x * y).sqrt()])  # smooth, so resampling kernels agree
    ours = _clip.resize_shortest_center_crop(image[None], 224)[0]
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pil = pil.resize((448, 224), Image.BICUBIC).crop((112, 0, 336, 224))
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    assert ours.shape == (3, 224, 224)
    assert (ours - reference).abs().mean() < 0.01


def test_longest_side_pad_keeps_content_centered_and_pads_black():
    image = torch.ones(1, 3, 100, 200)  # wide: becomes 112 × 224, padded 56 rows each side
    padded = _clip.resize_longest_pad(image, 224)
    assert padded.shape == (1, 3, 224, 224)
    assert padded[..., :56, :].abs().max() == 0 and padded[..., 168:, :].abs().max() == 0
    torch.testing.assert_close(padded[..., 56:168, :], torch.ones(1, 3, 112, 224))


def test_normalize_uses_openai_statistics():
    mean = torch.tensor(_clip.OPENAI_CLIP_MEAN).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(_clip.normalize(mean), torch.zeros(1, 3, 4, 4))


# --------------------------------------------------------------------------- tokenization


def test_open_clip_token_ids_layout(tokenizer):
    ids = _clip.open_clip_token_ids(tokenizer, ["a cat", "dog " * 200])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    short = ids[0].tolist()
    end = short.index(tokenizer.eos_token_id)
    assert end == ids[0].argmax() and all(token == 0 for token in short[end + 1:])  # zero padding
    assert ids[1, -1] == tokenizer.eos_token_id  # truncation keeps the eot
    assert (ids[1] != 0).all()


# --------------------------------------------------------------------------- hps


def test_hps_loads_open_clip_checkpoint_and_matches_original(saved, tokenizer):
    reward = build_hps(weights=str(saved["hps_file"]), tokenizer=str(saved["tokenizer_dir"]),
                       backend="transformers")
    images = _images()
    scores = _check_reward_behaviour(reward, images, PROMPTS)
    expected = _reference_cosine(saved["hps_model"], tokenizer, images, PROMPTS, "pad")
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    other_prompts = reward(images, PROMPTS[::-1])
    assert (other_prompts - scores).abs().max() > 1e-5


def test_hps_half_precision_checkpoint(saved, tokenizer, tmp_path):
    """The distributed checkpoint is "compressed" (fp16): it loads into an fp32 model."""
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in to_open_clip_state_dict(saved["hps_model"]).items()}
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, path)
    reward = build_hps(weights=str(path), tokenizer=str(saved["tokenizer_dir"]), backend="transformers")
    assert next(reward.encoders.module.parameters()).dtype == torch.float32
    images = _images(seed=3)
    expected = _reference_cosine(saved["hps_model"], tokenizer, images, PROMPTS, "pad")
    torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=0, atol=2e-3)


def test_hps_found_through_env_vars(saved, monkeypatch):
    monkeypatch.setenv("MARBLE_HPS_WEIGHTS", str(saved["hps_file"]))
    monkeypatch.setenv("MARBLE_CLIP_TOKENIZER", str(saved["tokenizer_dir"]))
    reward = registry.build("reward", "hps", {"backend": "transformers"})
    assert reward(_images(2), PROMPTS[:2]).shape == (2,)


def test_hps_without_weights_fails_fast_with_instructions():
    with pytest.raises(MarbleError) as error:
        registry.build("reward", "hps", {})
    message = str(error.value)
    assert "\n" not in message
    for part in ("HPS_v2.1_compressed.pt", "https://huggingface.co/xswu/HPSv2",
                 "--reward-opt hps.weights=", "MARBLE_HPS_WEIGHTS"):
        assert part in message


def test_hps_missing_tokenizer_names_it(saved):
    with pytest.raises(MarbleError, match="hps.tokenizer=.*MARBLE_CLIP_TOKENIZER"):
        build_hps(weights=str(saved["hps_file"]), backend="transformers")


def test_converter_refuses_unknown_parameters(saved, tmp_path):
    state = to_open_clip_state_dict(saved["hps_model"])
    state["visual.attn_pool.query"] = torch.zeros(4, 160)
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(MarbleError, match="attn_pool"):
        build_hps(weights=str(path), tokenizer=str(saved["tokenizer_dir"]), backend="transformers")


def test_converter_refuses_wrong_checkpoint(saved, tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"layers.0.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(MarbleError, match="not an open_clip ViT state dict"):
        build_hps(weights=str(path), tokenizer=str(saved["tokenizer_dir"]), backend="transformers")


def test_hps_rejects_unknown_backend(saved):
    with pytest.raises(MarbleError, match="backend 'torch' is unknown"):
        build_hps(weights=str(saved["hps_file"]), backend="torch")


# --------------------------------------------------------------------------- clip


def test_clip_transformers_directory_matches_original(saved, tokenizer):
    reward = build_clip(weights=str(saved["clip_dir"]))
    images = _images(height=128, width=96)
    scores = _check_reward_behaviour(reward, images, PROMPTS)
    with torch.no_grad():
        pixels = _clip.clip_pixels(images, 224, "crop-torchvision")
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        out = saved["clip_model"](pixel_values=pixels, **tokens)
    expected = out.logits_per_image.diagonal() / saved["clip_model"].logit_scale.exp()  # cosine
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_clip_open_clip_file_quickgelu_matches_original(saved, tokenizer):
    """An openai-tagged open_clip checkpoint converts with QuickGELU and gives the same scores."""
    reward = build_clip(weights=str(saved["clip_file"]), model="ViT-L-14", pretrained="openai",
                        tokenizer=str(saved["tokenizer_dir"]), backend="transformers")
    images = _images(seed=5)
    expected = _reference_cosine(saved["clip_model"], tokenizer, images, PROMPTS, "crop-torchvision")
    torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)
    gelu = build_clip(weights=str(saved["clip_file"]), model="ViT-L-14", pretrained="laion2b_s32b_b82k",
                      tokenizer=str(saved["tokenizer_dir"]), backend="transformers")
    assert (gelu(images, PROMPTS) - expected).abs().max() > 1e-6  # the activation matters


def test_clip_from_hf_cache(saved, monkeypatch, tmp_path):
    """A snapshot in the local HF cache is found without any network access."""
    cache = tmp_path / "hub"
    repo = cache / "models--openai--clip-vit-large-patch14"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    import shutil

    shutil.copytree(saved["clip_dir"], snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    reward = build_clip()
    assert reward(_images(2), PROMPTS[:2]).shape == (2,)


def test_clip_without_weights_names_the_repo():
    with pytest.raises(MarbleError, match="openai/clip-vit-large-patch14.*MARBLE_CLIP_WEIGHTS"):
        build_clip()


# --------------------------------------------------------------------------- pickscore


def test_pickscore_equals_logit_scale_times_cosine(saved, tokenizer):
    reward = build_pickscore(weights=str(saved["pick_dir"]), tokenizer=str(saved["tokenizer_dir"]))
    images = _images(seed=7)
    scores = _check_reward_behaviour(reward, images, PROMPTS)
    model = saved["pick_model"]
    with torch.no_grad():
        pixels = _clip.clip_pixels(images, 224, "crop")
        image_features = _clip.pooled_features(model.get_image_features(pixel_values=pixels))
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        text_features = _clip.pooled_features(model.get_text_features(**tokens))
        expected = model.logit_scale.exp() * F.cosine_similarity(image_features, text_features)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    flow_grpo = build_pickscore(weights=str(saved["pick_dir"]), tokenizer=str(saved["tokenizer_dir"]),
                                scale="flow-grpo")
    torch.testing.assert_close(flow_grpo(images, PROMPTS), scores / 26, rtol=1e-5, atol=1e-6)


def test_pickscore_errors(saved, tmp_path):
    with pytest.raises(MarbleError, match="yuvalkirstain/PickScore_v1.*MARBLE_PICKSCORE_PATH"):
        build_pickscore()
    with pytest.raises(MarbleError, match="laion/CLIP-ViT-H-14.*pickscore.tokenizer=.*MARBLE_CLIP_TOKENIZER"):
        build_pickscore(weights=str(saved["pick_dir"]))
    with pytest.raises(MarbleError, match="scale 'half'"):
        build_pickscore(weights=str(saved["pick_dir"]), scale="half")
    with pytest.raises(MarbleError, match="not a model directory"):
        build_pickscore(weights=str(tmp_path))


# --------------------------------------------------------------------------- aesthetic


def test_aesthetic_head_on_normalized_clip_embedding(saved):
    reward = build_aesthetic(weights=str(saved["head_file"]), clip=str(saved["clip_dir"]))
    images = _images(seed=9)
    scores = _check_reward_behaviour(reward, images, [""] * 4)
    head = saved["head"]
    with torch.no_grad():
        pixels = _clip.clip_pixels(images, 224, "crop")
        x = F.normalize(_clip.pooled_features(saved["clip_model"].get_image_features(pixel_values=pixels)), dim=-1)
        for index in (0, 2, 4, 6, 7):  # the reference MLP: linear layers only, dropout in eval
            x = x @ head[f"layers.{index}.weight"].t() + head[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=1e-4, atol=1e-5)
    assert torch.equal(reward(images, ["x"] * 4), scores)  # the prompt is ignored


def test_aesthetic_errors(saved, tmp_path):
    with pytest.raises(MarbleError, match="sac\\+logos\\+ava1-l14-linearMSE.pth.*improved-aesthetic"):
        build_aesthetic(clip=str(saved["clip_dir"]))
    wrong = dict(saved["head"])
    wrong["layers.0.weight"] = torch.zeros(1024, 768)
    path = tmp_path / "head.pth"
    torch.save(wrong, path)
    with pytest.raises(MarbleError, match="expects 768-d embeddings"):
        build_aesthetic(weights=str(path), clip=str(saved["clip_dir"]))


# --------------------------------------------------------------------------- weights


def test_resolve_weights_order_and_messages(tmp_path, monkeypatch):
    spec = WeightsSpec("demo", "w.pt", "weights", "MARBLE_DEMO_WEIGHTS", "https://example.org/w")
    explicit, from_env = tmp_path / "a" / "w.pt", tmp_path / "b" / "w.pt"
    for path in (explicit, from_env):
        path.parent.mkdir()
        path.write_bytes(b"x")
    monkeypatch.setenv("MARBLE_DEMO_WEIGHTS", str(from_env))
    assert resolve_weights(spec, str(explicit)) == explicit
    assert resolve_weights(spec, str(explicit.parent)) == explicit  # a directory holding the file
    assert resolve_weights(spec) == from_env
    with pytest.raises(MarbleError, match="does not exist"):
        resolve_weights(spec, str(tmp_path / "nope.pt"))
    monkeypatch.delenv("MARBLE_DEMO_WEIGHTS")
    with pytest.raises(MarbleError) as error:
        resolve_weights(spec)
    assert str(error.value) == (
        "demo: weights file w.pt not found; download it from https://example.org/w and pass "
        "--reward-opt demo.weights=/path/w.pt or set MARBLE_DEMO_WEIGHTS"
    )


class _NotATensor:
    pass


def test_load_checkpoint_is_safe(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "object": _NotATensor()}, unsafe)
    with pytest.raises(MarbleError, match="cannot be loaded safely"):
        load_checkpoint(unsafe, "demo")
    from safetensors.torch import save_file

    tensors = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(3.0)}, str(tensors))
    torch.testing.assert_close(load_checkpoint(tensors, "demo")["w"], torch.arange(3.0))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MarbleError, match="cannot read checkpoint"):
        load_checkpoint(garbage, "demo")


# --------------------------------------------------------------------------- ocr


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("hello", "hello", 0), ("hello", "world", 4), ("ab", "ba", 2), ("intention", "execution", 5),
])
def test_levenshtein_hand_examples(a, b, distance):
    assert levenshtein(a, b) == distance


@settings(max_examples=60, deadline=None)
@given(a=st.text("abc", max_size=8), b=st.text("abc", max_size=8), c=st.text("abc", max_size=8))
def test_levenshtein_is_a_metric(a, b, c):
    assert levenshtein(a, b) == levenshtein(b, a)
    assert (levenshtein(a, b) == 0) == (a == b)
    assert abs(len(a) - len(b)) <= levenshtein(a, b) <= max(len(a), len(b))
    assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)


@pytest.mark.parametrize("found, target, reward", [
    ("HELLO", "hello", 1.0), ("a sign: Hello World!", "hello world", 1.0), ("", "hello", 0.0),
    ("HELL0", "hello", 0.8), ("cart", "cat", 1 - 1 / 3), ("completely different words", "cat", 0.0),
    ("xyz", "cat", 0.0),
])
def test_ocr_text_reward_examples(found, target, reward):
    assert ocr_text_reward(found, target) == pytest.approx(reward)


def _render(text: str, size: int = 256) -> torch.Tensor:
    image = Image.new("RGB", (size, size), (235, 232, 225))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size // 6)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - right + left) / 2, (size - bottom + top) / 2), text, fill=(20, 20, 30), font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_text_with_the_real_engine():
    reward = registry.build("reward", "ocr", {})
    images = torch.stack([_render("MARBLE"), _render("OCEAN"), _render("MARBLE"), torch.ones(3, 256, 256)])
    prompts = ['a poster that says "marble"', 'a sign reading "Ocean"', 'a sign that says "forest"',
               'a blank page with "text"']
    scores = reward(images, prompts)
    assert scores[0] > 0.8 and scores[1] > 0.8     # matching text
    assert scores[2] < 0.5                          # different text
    assert scores[3] == 0.0                         # blank image: nothing found, no crash
    tiny_black = torch.zeros(2, 3, 1, 1)
    scores = reward(tiny_black, ['a dot with "x"', "a black dot, no quotes"])
    assert scores[0] == 0.0 and math.isnan(scores[1])  # 1×1 image reads as empty; NaN without quotes


def test_ocr_rejects_bad_threads():
    with pytest.raises(MarbleError, match="threads=0"):
        build_ocr(threads=0)


def test_directory_with_missing_weights_is_refused(saved, tmp_path):
    """A directory lacking some CLIP weights must not score with randomly initialised ones."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    saved["pick_model"].save_pretrained(broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["text_projection.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MarbleError, match="lacks weights for 'text_projection.weight'"):
        build_pickscore(weights=str(broken), tokenizer=str(saved["tokenizer_dir"]))
