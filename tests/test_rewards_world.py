"""Prompt-fidelity rewards of the procedural world: separation, NaN, continuity, batching."""

import itertools
import math
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.registry import build
from marble_plugins import world
from marble_plugins.rewards.world import (
    BackgroundFidelity,
    Centering,
    ColorFidelity,
    ShapeFidelity,
    WordFidelity,
    shape_templates,
    soft_iou,
    srgb_to_lab,
)

REWARDS = {"color": ColorFidelity(), "shape": ShapeFidelity(), "word": WordFidelity(),
           "background": BackgroundFidelity()}
VOCABULARY = {"color": list(world.COLORS), "shape": list(world.SHAPES), "word": list(world.WORDS),
              "background": list(world.BACKGROUNDS)}


def _image(scene, size=world.IMAGE_SIZE):
    return torch.from_numpy(world.render_array(scene, size))


def _batch(scenes, size=world.IMAGE_SIZE):
    return torch.stack([_image(scene, size) for scene in scenes])


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    return [world.random_scene(rng, "shape") for _ in range(48)] + \
           [world.random_scene(rng, "word") for _ in range(24)]


def _mismatched(scene, attribute, rng):
    other = rng.choice([v for v in VOCABULARY[attribute] if v != getattr(scene, attribute)])
    return replace(scene, **{attribute: other})


@pytest.mark.parametrize("attribute", list(REWARDS))
def test_clean_renders_score_high_for_their_prompt_and_low_for_another(scenes, attribute):
    rng = random.Random(1)
    named = [s for s in scenes if getattr(s, attribute)]
    images = _batch(named)
    reward = REWARDS[attribute]
    matching = reward(images, [s.prompt() for s in named])
    mismatching = reward(images, [_mismatched(s, attribute, rng).prompt() for s in named])
    assert matching.min() > 0.7, matching
    assert mismatching.max() < 0.15, mismatching
    assert (matching - mismatching).min() > 0.6


@pytest.mark.parametrize("attribute", list(REWARDS))
def test_every_value_of_the_vocabulary_is_recognised(attribute):
    # each value against every other, on one clean render per value
    values = VOCABULARY[attribute]
    if attribute == "word":
        scenes = [world.Scene(word=w, background="gray") for w in values]
    elif attribute == "background":
        scenes = [world.Scene(color="green", shape="circle", background=b) for b in values]
    else:
        base = world.Scene(color="purple", shape="triangle", background="black")
        scenes = [replace(base, **{attribute: v}) for v in values]
    images = _batch(scenes)
    table = torch.stack([REWARDS[attribute](images, [replace(s, **{attribute: v}).prompt() for s in scenes])
                         for v in values])  # [named value, image]
    assert torch.equal(table.argmax(dim=0), torch.arange(len(values)))
    assert table.diagonal().min() > 0.7


def test_nan_where_the_prompt_names_no_attribute():
    images = _batch([world.Scene(color="red", shape="circle"), world.Scene(word="CAT")])
    prompts = ["a red circle on a white background", 'a sign that says "cat"']
    assert torch.equal(REWARDS["color"](images, prompts).isnan(), torch.tensor([False, True]))
    assert torch.equal(REWARDS["shape"](images, prompts).isnan(), torch.tensor([False, True]))
    assert torch.equal(REWARDS["word"](images, prompts).isnan(), torch.tensor([True, False]))
    assert torch.equal(REWARDS["background"](images, prompts).isnan(), torch.tensor([False, True]))
    # an unknown colour / shape word is not a world attribute
    odd = ["a teal hexagon", "a photo of a dog"]
    for reward in REWARDS.values():
        assert reward(images, odd).isnan().all()


def test_a_quoted_word_outside_the_world_vocabulary_is_still_judged():
    image = _image(world.Scene(word="DOG", background="white")).unsqueeze(0).repeat(2, 1, 1, 1)
    scores = REWARDS["word"](image, ['a sign that says "dog"', 'a sign that says "cat"'])
    assert scores[0] > 0.8 and scores[1] < 0.1


def _strictly_decreasing(values):
    return all(a > b for a, b in itertools.pairwise(values))


def test_scores_change_gradually_along_a_morph():
    alpha = torch.linspace(0, 1, 9).view(-1, 1, 1, 1)

    def morph(a, b):
        return (1 - alpha) * _image(a) + alpha * _image(b)

    red, orange = world.Scene(color="red", shape="circle"), world.Scene(color="orange", shape="circle")
    color = REWARDS["color"](morph(red, orange), ["a red circle"] * 9).tolist()
    circle = world.Scene(color="green", shape="circle", background="black")
    shape = REWARDS["shape"](morph(circle, replace(circle, shape="square")), ["a green circle"] * 9).tolist()
    cat = world.Scene(word="CAT")
    word = REWARDS["word"](morph(cat, replace(cat, word="HAT")), ['"cat"'] * 9).tolist()
    for name, values in {"color": color, "shape": shape, "word": word}.items():
        assert values[0] > 0.8 and values[-1] < 0.1, (name, values)
        assert _strictly_decreasing(values[1:]), (name, values)
        # partial credit on the way: not a 0/1 step
        assert sum(0.1 < v < 0.9 for v in values) >= 2, (name, values)


def test_word_score_falls_smoothly_with_blur():
    image = _image(world.Scene(word="MAP", background="black")).unsqueeze(0)
    scores = []
    for sigma in (0.5, 1.0, 1.5, 2.0, 3.0):
        radius = int(3 * sigma) + 1
        kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        blurred = torch.nn.functional.conv2d(
            torch.nn.functional.pad(image, (radius,) * 4, mode="replicate"),
            (kernel.view(-1, 1) * kernel.view(1, -1)).expand(3, 1, -1, -1), groups=3)
        scores.append(REWARDS["word"](blurred, ['"map"']).item())
    assert _strictly_decreasing(scores) and scores[0] > 0.9 and 0.1 < scores[-1] < 0.7, scores


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["shape", "word"]),
       noise=st.floats(0.0, 0.5))
def test_scores_are_in_unit_interval_for_any_image(seed, kind, noise):
    rng = random.Random(seed)
    scene = world.random_scene(rng, kind)
    generator = torch.Generator().manual_seed(seed)
    image = (_image(scene) + noise * torch.randn(3, 64, 64, generator=generator)).clamp(0, 1)
    images = torch.stack([image, torch.rand(3, 64, 64, generator=generator), torch.zeros(3, 64, 64)])
    for name, reward in REWARDS.items():
        scores = reward(images, [scene.prompt()] * 3)
        if getattr(scene, name):
            assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1 + 1e-6).all()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_templates_of_a_clean_render_pick_its_shape(seed):
    # the analytic templates (centroid + area of the mask) reproduce world.render's shapes
    scene = world.random_scene(random.Random(seed), "shape")
    lab = srgb_to_lab(_image(scene).unsqueeze(0))
    background = srgb_to_lab(torch.tensor(world.BACKGROUNDS[scene.background]).view(1, 3, 1, 1) / 255)
    mask = ((lab - background) ** 2).sum(1).sqrt().gt(25).float()
    iou = soft_iou(mask, shape_templates(mask))[0]
    assert iou.argmax().item() == world.SHAPES.index(scene.shape)
    assert iou.max() > 0.85


def test_batch_of_mixed_prompts_equals_one_by_one(scenes):
    images = _batch(scenes[:10] + scenes[-6:])
    prompts = [s.prompt() for s in scenes[:10] + scenes[-6:]]
    for reward in REWARDS.values():
        together = reward(images, prompts)
        alone = torch.cat([reward(images[i:i + 1], prompts[i:i + 1]) for i in range(len(prompts))])
        assert torch.allclose(together, alone, atol=1e-5, equal_nan=True)


def test_higher_resolution_renders_are_judged_alike(scenes):
    picked = scenes[:6] + scenes[-4:]
    prompts = [s.prompt() for s in picked]
    for name, reward in REWARDS.items():
        small = reward(_batch(picked), prompts)
        large = reward(_batch(picked, size=128), prompts)
        valid = ~small.isnan()
        assert torch.equal(valid, ~large.isnan())
        assert large[valid].min() > 0.6, (name, large)


def test_registered_under_their_names():
    for name in REWARDS:
        reward = build("reward", name)
        assert reward.name == name
        assert math.isnan(reward(torch.zeros(1, 3, 64, 64), ["nothing named"]).item())


# ------------------------------------------------------------------------------- centering


def test_centering_follows_the_gaussian_of_the_subjects_offset():
    # a circle's centroid is its drawing centre: the score is exp(-d^2 / 2 sigma^2) of its offset
    # (pixel centres sit at i + 0.5, the canvas centre at 32; the mask's soft edge and the
    # presence factor a / (a + a0) cost under 1 %)
    reward = Centering()
    offsets = [(0.0, 0.0), (2.0, 0.0), (0.0, -4.0), (3.0, 4.0), (6.0, 6.0)]
    scenes = [world.Scene(color="blue", shape="circle", background="white", cx=32 + dx, cy=32 + dy)
              for dx, dy in offsets]
    scores = reward(_batch(scenes), [s.prompt() for s in scenes])
    expected = torch.tensor([math.exp(-(dx * dx + dy * dy) / (2 * 4.0**2)) for dx, dy in offsets])
    assert torch.allclose(scores, expected, atol=0.02), (scores, expected)
    assert scores[0] > 0.98


def test_centering_judges_every_prompt_and_needs_a_subject(scenes):
    reward = Centering()
    images = torch.cat([_batch(scenes[:4] + scenes[-2:]), torch.full((2, 3, 64, 64), 0.5)])
    scores = reward(images, [s.prompt() for s in scenes[:4] + scenes[-2:]] + ["", "anything"])
    assert not scores.isnan().any()
    assert (scores[:6] > 0.1).all() and (scores[6:] < 1e-3).all()   # a flat image has no subject


def test_centering_is_batch_and_resolution_independent(scenes):
    picked = scenes[:6] + scenes[-4:]
    prompts = [s.prompt() for s in picked]
    reward = Centering()
    small = reward(_batch(picked), prompts)
    alone = torch.cat([reward(_batch([s]), [p]) for s, p in zip(picked, prompts)])
    assert torch.allclose(small, alone, atol=1e-5)
    # the same pixels at twice the resolution score the same
    upsampled = torch.nn.functional.interpolate(_batch(picked), scale_factor=2, mode="nearest")
    assert torch.allclose(small, reward(upsampled, prompts), atol=1e-4)
    # shapes drawn at 128 px land within a fraction of a pixel (PIL's glyph layout differs more)
    large = reward(_batch(picked[:6], size=128), prompts[:6])
    assert torch.allclose(small[:6], large, atol=0.05), (small, large)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 0.3))
def test_centering_is_in_unit_interval_for_any_image(seed, noise):
    generator = torch.Generator().manual_seed(seed)
    scene = world.random_scene(random.Random(seed))
    image = (_image(scene) + noise * torch.randn(3, 64, 64, generator=generator)).clamp(0, 1)
    score = Centering()(image.unsqueeze(0), [scene.prompt()])
    assert 0.0 <= score.item() <= 1.0


def test_centering_rejects_bad_options():
    from marble_kit.errors import MarbleError
    with pytest.raises(MarbleError, match="centering.sigma"):
        build("reward", "centering", {"sigma": 0})
