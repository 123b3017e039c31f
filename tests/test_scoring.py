"""`marble_kit.scoring` and the `marble score` command (offline rewards + the real OCR engine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.errors import MarbleError
from marble_kit.scoring import (
    ScoredImage,
    build_rewards,
    find_images,
    load_image,
    mean_scores,
    read_prompts,
    score_images,
)

runner = CliRunner()


@pytest.fixture
def image_dir(tmp_path):
    """Two PNGs of different sizes, one JPEG in a sub-directory, and a non-image file."""
    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "b_white.png")
    Image.new("L", (20, 20), 0).save(tmp_path / "a_black.png")
    (tmp_path / "nested").mkdir()
    Image.new("RGB", (40, 30), (128, 128, 128)).save(tmp_path / "nested" / "c_gray.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_find_images_sorted_recursive_and_filtered(image_dir):
    found = find_images([image_dir])
    assert [p.relative_to(image_dir).as_posix() for p in found] == [
        "a_black.png", "b_white.png", "nested/c_gray.jpg"]
    assert find_images([image_dir / "b_white.png"]) == [image_dir / "b_white.png"]


@pytest.mark.parametrize("name, message", [
    ("missing.png", "does not exist"), ("notes.txt", "not a PNG or JPEG"),
])
def test_find_images_errors(image_dir, name, message):
    with pytest.raises(MarbleError, match=message):
        find_images([image_dir / name])


def test_find_images_empty_directory(tmp_path):
    with pytest.raises(MarbleError, match="no PNG/JPEG images"):
        find_images([tmp_path])


def test_load_image_converts_modes(tmp_path):
    rgba = np.zeros((3, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    assert image.shape == (3, 3, 5) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.ones(3, 5)) and image[1:].abs().max() == 0
    Image.new("L", (4, 2), 51).save(tmp_path / "gray.png")
    torch.testing.assert_close(load_image(tmp_path / "gray.png"), torch.full((3, 2, 4), 0.2))


def test_read_prompts(tmp_path):
    assert read_prompts(2, prompt="a cat") == ["a cat", "a cat"]
    assert read_prompts(1) == [""]
    path = tmp_path / "prompts.txt"
    path.write_text('one "a"\ntwo\n')
    assert read_prompts(2, prompts_file=path) == ['one "a"', "two"]
    with pytest.raises(MarbleError, match="2 lines for 3 images"):
        read_prompts(3, prompts_file=path)
    with pytest.raises(MarbleError, match="either --prompt or --prompts-file"):
        read_prompts(2, prompt="x", prompts_file=path)


def test_build_rewards_checks_names_and_options():
    rewards = build_rewards(["brightness", "ocr"], {"ocr": {"threads": 1}})
    assert list(rewards) == ["brightness", "ocr"]
    with pytest.raises(MarbleError, match="not in --rewards"):
        build_rewards(["brightness"], {"hps": {"weights": "/x"}})
    with pytest.raises(MarbleError, match="listed twice"):
        build_rewards(["brightness", "brightness"])
    with pytest.raises(MarbleError, match="no rewards given"):
        build_rewards([])
    with pytest.raises(MarbleError, match="unknown reward 'brightnes'"):
        build_rewards(["brightnes"])


def test_build_rewards_fails_fast_on_missing_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("MARBLE_HPS_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MarbleError, match="hps: weights file HPS_v2.1_compressed.pt not found"):
        build_rewards(["brightness", "hps", "ocr"])


def test_score_images_mixed_sizes(image_dir):
    prompts = image_dir / "prompts.txt"
    prompts.write_text('a sign "hi"\nplain white\n"gray"\n')
    rows = score_images([image_dir], ["brightness", "ocr"], prompts_file=prompts)
    assert [row.prompt for row in rows] == ['a sign "hi"', "plain white", '"gray"']
    brightness = [row.scores["brightness"] for row in rows]
    assert brightness[0] == pytest.approx(0.0) and brightness[1] == pytest.approx(1.0)
    assert brightness[2] == pytest.approx(128 / 255, abs=0.01)
    ocr = [row.scores["ocr"] for row in rows]
    assert ocr[0] == 0.0 and math.isnan(ocr[1]) and ocr[2] == 0.0  # blank images read nothing


def test_mean_scores_ignore_nan():
    rows = [ScoredImage("a", "", {"x": 1.0, "y": math.nan}), ScoredImage("b", "", {"x": 3.0, "y": math.nan})]
    means = mean_scores(rows)
    assert means["x"] == 2.0 and math.isnan(means["y"])


def test_cli_score_json(image_dir):
    result = runner.invoke(app, ["score", str(image_dir / "a_black.png"), str(image_dir / "b_white.png"),
                                 "--rewards", "brightness,ocr", "--prompt", "no quotes", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["scores"]["brightness"] for row in data["images"]] == pytest.approx([0.0, 1.0])
    assert data["images"][0]["scores"]["ocr"] is None and data["mean"]["ocr"] is None
    assert data["mean"]["brightness"] == pytest.approx(0.5)


def test_cli_score_table(image_dir):
    result = runner.invoke(app, ["score", str(image_dir), "--rewards", "brightness",
                                 "--reward-opt", "brightness.unknown=1"])
    assert result.exit_code == 2 and "has no option 'unknown'" in result.output
    result = runner.invoke(app, ["score", str(image_dir), "--rewards", "brightness"])
    assert result.exit_code == 0, result.output
    assert "brightness" in result.output and "mean" in result.output and "c_gray.jpg" in result.output


def test_cli_score_missing_weights_one_line_error(image_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("MARBLE_PICKSCORE_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["score", str(image_dir), "--rewards", "pickscore"])
    assert result.exit_code == 2
    assert "pickscore:" in result.output and "MARBLE_PICKSCORE_PATH" in result.output
    assert "Traceback" not in result.output
