"""Offline pixel-statistic rewards: brightness, colorfulness, sharpness, crispness, JPEG size."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.errors import MarbleError
from marble_kit.registry import build
from marble_plugins.rewards.offline import Brightness, Colorfulness, Crispness, JpegSize, Sharpness


def _solid(rgb, size=32, batch=1):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def _blur(images, sigma):
    radius = int(3 * sigma) + 1
    kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    horizontal = F.conv2d(padded, kernel, groups=3)
    return F.conv2d(horizontal, kernel.transpose(2, 3), groups=3)


def _checkerboard(size=64, cell=8):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((ys // cell + xs // cell) % 2).float()
    return board.expand(1, 3, size, size).clone()


def test_brightness_of_solid_images():
    images = torch.cat([_solid([0, 0, 0]), _solid([1, 1, 1]), _solid([1, 0, 0])])
    scores = Brightness()(images, ["", "", ""])
    assert torch.allclose(scores, torch.tensor([0.0, 1.0, 0.299]), atol=1e-6)


def test_colorfulness_is_zero_for_grey_and_matches_the_formula():
    grey = Colorfulness()(_solid([0.4, 0.4, 0.4]), [""])
    assert grey.item() == pytest.approx(0.0, abs=1e-6)
    # half red, half blue: rg = 255 | 0, yb = 127.5 | -255 (0-255 scale)
    image = torch.zeros(1, 3, 8, 8)
    image[:, 0, :, :4] = 1.0
    image[:, 2, :, 4:] = 1.0
    rg, yb = torch.tensor([255.0, 0.0]), torch.tensor([127.5, -255.0])
    expected = ((rg.var(unbiased=False) + yb.var(unbiased=False)).sqrt()
                + 0.3 * (rg.mean() ** 2 + yb.mean() ** 2).sqrt()) / 100
    assert Colorfulness()(image, [""]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_colorfulness_grows_with_saturation():
    grey = torch.full((1, 3, 16, 16), 0.5)
    red = _solid([0.9, 0.1, 0.1], size=16)
    scores = [Colorfulness()(grey + a * (red - grey), [""]).item() for a in (0.0, 0.3, 0.6, 1.0)]
    assert scores == sorted(scores) and scores[0] < scores[-1]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_colorfulness_ignores_pixel_order(seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 12, 12, generator=generator)
    order = torch.randperm(144, generator=generator)
    shuffled = image.flatten(2)[:, :, order].view(1, 3, 12, 12)
    assert torch.allclose(Colorfulness()(image, [""]), Colorfulness()(shuffled, [""]), atol=1e-5)


def test_sharpness_is_zero_when_flat_and_falls_with_blur():
    assert Sharpness()(_solid([0.3, 0.6, 0.9], size=64), [""]).item() == 0.0
    board = _checkerboard()
    scores = [Sharpness()(_blur(board, s) if s else board, [""]).item() for s in (0, 0.7, 1.5, 3.0)]
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    assert 0 < scores[-1] < scores[0] < 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), offset=st.floats(-0.2, 0.2))
def test_sharpness_ignores_a_brightness_offset(seed, offset):
    # the Laplacian annihilates constants: only the edges count
    image = 0.3 + 0.4 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(Sharpness()(image, [""]), Sharpness()(image + offset, [""]), atol=1e-5)


def test_sharpness_does_not_depend_on_resolution():
    board = _checkerboard()
    upsampled = F.interpolate(board, scale_factor=4, mode="nearest")
    assert Sharpness()(upsampled, [""]).item() == pytest.approx(Sharpness()(board, [""]).item(), abs=1e-6)


def test_sharpness_scale_is_the_half_point_and_is_validated():
    board = _checkerboard()
    raw_std = Sharpness(scale=1.0)(board, [""]).item()
    raw_std = raw_std / (1 - raw_std)
    assert Sharpness(scale=raw_std)(board, [""]).item() == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(MarbleError, match="scale"):
        Sharpness(scale=0.0)


def test_crispness_of_a_step_edge_by_hand():
    # a vertical black|white edge: on the 63 × 63 grid of forward differences one column has
    # |∇y| = 1, every other pixel 0; each pixel also counts with the noise floor
    image = torch.zeros(1, 3, 64, 64)
    image[..., 32:] = 1.0
    n, floor = 63 * 63, 0.004
    l1, l2 = 63 * 1.0 + n * floor, (63 * 1.0 + n * floor**2) ** 0.5
    assert Crispness()(image, [""]).item() == pytest.approx(1 - l1 / (l2 * n**0.5), rel=1e-5)
    assert Crispness()(_solid([0.3, 0.6, 0.9], size=64), [""]).item() == 0.0  # flat: 0, not 1


def test_crispness_falls_with_blur_noise_and_texture_where_sharpness_rises():
    board = _checkerboard(cell=16)
    blurred = [Crispness()(_blur(board, s) if s else board, [""]).item() for s in (0, 0.7, 1.5, 3.0)]
    assert all(a > b for a, b in itertools.pairwise(blurred)), blurred
    noisy = (board * 0.6 + 0.2 + 0.05 * torch.randn(board.shape, generator=torch.Generator().manual_seed(0)))
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    lines = ((ys % 8 == 0) | (xs % 8 == 0)).float().expand(1, 3, 64, 64)
    textured = board * 0.6 + 0.2 + 0.1 * lines                # the token-grid artefact of a patch model
    clean = board * 0.6 + 0.2
    for degraded in (noisy, textured):
        assert Crispness()(degraded, [""]).item() < Crispness()(clean, [""]).item() - 0.1
        assert Sharpness()(degraded, [""]).item() > Sharpness()(clean, [""]).item()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), offset=st.floats(-0.2, 0.2))
def test_crispness_ignores_a_brightness_offset_and_the_resolution(seed, offset):
    image = 0.3 + 0.4 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(Crispness()(image, [""]), Crispness()(image + offset, [""]), atol=1e-5)
    upsampled = F.interpolate(image, scale_factor=2, mode="nearest")
    assert torch.allclose(Crispness()(upsampled, [""]), Crispness()(image, [""]), atol=1e-5)
    with pytest.raises(MarbleError, match="floor"):
        Crispness(floor=0.0)


def test_jpeg_rewards_rank_noise_above_flat_and_are_opposite():
    torch.manual_seed(0)
    images = torch.cat([_solid([0.5, 0.5, 0.5], size=64), torch.rand(1, 3, 64, 64)])
    incompressible = JpegSize()(images, ["", ""])
    compressible = JpegSize("jpeg-compressibility", -1.0)(images, ["", ""])
    assert incompressible[1] > 4 * incompressible[0]
    assert torch.equal(compressible, -incompressible)


@pytest.mark.parametrize("name", ["brightness", "colorfulness", "sharpness",
                                  "jpeg-incompressibility", "jpeg-compressibility"])
def test_registered_and_batch_independent(name):
    reward = build("reward", name)
    torch.manual_seed(1)
    images = torch.rand(5, 3, 32, 32)
    together = reward(images, [""] * 5)
    alone = torch.cat([reward(images[i:i + 1], [""]) for i in range(5)])
    assert together.shape == (5,) and torch.isfinite(together).all()
    assert torch.allclose(together, alone, atol=1e-5)
