"""The `geneval` reward: GenEval's geometry and verdicts against hand-worked cases, the reward
with a tiny detector built in the test (tests/tiny_geneval.py), GenEval prompt metadata from a
.jsonl prompt set reaching it in training, and the reward served over HTTP (a uvicorn server
in a thread on 127.0.0.1) scoring like the in-process one, metadata included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_geneval import canvas

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.prompts import Prompt, load_prompt_sets
from marble_kit.registry import build
from marble_kit.trainer import Trainer, build_components
from marble_plugins.rewards.geneval import (
    Detection,
    box_iou,
    from_mmdet_result,
    judge,
    keep_detections,
    relative_position,
)

TINY = {"detector": "tiny_geneval:build_detector", "color": "tiny_geneval:build_colors"}


def geneval(**options):
    return build("reward", "geneval", {**TINY, **options})


def test_boxes_overlap_and_relate_as_in_geneval():
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)  # inclusive pixels
    assert box_iou([0, 0, 1, 1], [5, 5, 6, 6]) == 0
    # B 20 px right of A (boxes 10 px wide): shrunk offset 20 − 0.1·20 = 18 → dx = −0.9
    assert relative_position([0, 0, 10, 10], [20, 0, 30, 10]) == {"left of"}
    assert relative_position([30, 30, 40, 40], [0, 0, 10, 10]) == {"right of", "below"}  # 45°: both
    assert relative_position([20, 30, 30, 40], [0, 0, 10, 10]) == {"below"}  # dx = 18/36.1 < 0.5
    assert relative_position([0, 0, 10, 10], [1, 0, 11, 10]) == set()  # within the size margin
    assert relative_position([0, 0, 10, 10], [0, 20, 10, 30]) == {"above"}  # image y grows downwards


def objects(**found: list[tuple[float, float, float, float]]) -> dict[str, list[Detection]]:
    return {name.replace("_", " "): [Detection(box, 0.95) for box in boxes] for name, boxes in found.items()}


LEFT, RIGHT = (0, 0, 10, 10), (30, 0, 40, 10)
DOGS = [LEFT, RIGHT, (0, 30, 10, 40), (30, 30, 40, 40)]


@pytest.mark.parametrize(("found", "metadata", "colors", "expected"), [
    # counting: exact 3 of 3, the exclude (4) not reached
    (objects(dog=DOGS[:3]), {"tag": "counting", "include": [{"class": "dog", "count": 3}],
                             "exclude": [{"class": "dog", "count": 4}]}, {}, (True, True, 1.0)),
    # four dogs for three: strict fails, GenEval's ≥ passes but its exclude fails; partial 1 − 1/3
    (objects(dog=DOGS), {"tag": "counting", "include": [{"class": "dog", "count": 3}],
                         "exclude": [{"class": "dog", "count": 4}]}, {}, (False, False, 2 / 3)),
    (objects(dog=DOGS), {"tag": "counting", "include": [{"class": "dog", "count": 3}]}, {}, (False, True, 2 / 3)),
    (objects(dog=DOGS[:2]), {"tag": "counting", "include": [{"class": "dog", "count": 3}]}, {}, (False, False, 2 / 3)),
    # colours: the classifier's answer per object
    (objects(car=[LEFT]), {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     {"car": ["red"]}, (True, True, 1.0)),
    (objects(car=[LEFT]), {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     {"car": ["blue"]}, (False, False, 0.5)),
    # position: clause 1 (dog) left of clause 0 (cat); a failed relation scores [1, 1, 0, 1] (Flow-GRPO)
    (objects(cat=[RIGHT], dog=[LEFT]), {"tag": "position", "include": [
        {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}, {},
     (True, True, 1.0)),
    (objects(cat=[LEFT], dog=[RIGHT]), {"tag": "position", "include": [
        {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}, {},
     (False, False, 0.75)),
    (objects(dog=[LEFT]), {"tag": "position", "include": [
        {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}, {},
     (False, False, 1 / 3)),
    # two objects, one missing; colour attributes with the coloured one missing
    (objects(cat=[LEFT]), {"tag": "two_object", "include": [{"class": "cat", "count": 1},
                                                            {"class": "tv", "count": 1}]}, {}, (False, False, 0.5)),
    (objects(car=[LEFT]), {"tag": "color_attr", "include": [{"class": "bottle", "count": 1, "color": "blue"},
                                                            {"class": "car", "count": 1, "color": "red"}]},
     {"car": ["red"]}, (False, False, 0.5)),
])
def test_verdicts_match_genevals_rules(found, metadata, colors, expected):
    verdict = judge(found, metadata, lambda name, detections: colors[name][:len(detections)])
    assert (verdict.strict, verdict.correct) == expected[:2], verdict.reason
    assert verdict.partial == pytest.approx(expected[2])


def test_detections_are_thresholded_sorted_capped_and_deduplicated():
    raw = {"boxes": torch.tensor([[0, 0, 9, 9], [1, 0, 10, 9], [20, 20, 29, 29], [0, 0, 3, 3]]),
           "scores": torch.tensor([0.5, 0.9, 0.8, 0.2]), "labels": [0, 0, "cat", 0]}
    kept = keep_detections(raw, ["dog"], threshold=0.3)
    assert [d.score for d in kept["dog"]] == [pytest.approx(0.9), pytest.approx(0.5)] and len(kept["cat"]) == 1
    assert len(keep_detections(raw, ["dog"], threshold=0.3, max_objects=1)["dog"]) == 1
    assert len(keep_detections(raw, ["dog"], threshold=0.3, nms_threshold=0.5)["dog"]) == 1  # IoU 0.82
    with pytest.raises(MarbleError, match="returned 4 boxes, 3 scores"):
        keep_detections({**raw, "scores": raw["scores"][:3]}, ["dog"], 0.3)


def test_an_mmdet_result_becomes_the_detector_dict():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:3, 1:3] = True
    result = ([np.array([[1, 1, 2, 2, 0.9]]), np.zeros((0, 5)), np.array([[4, 4, 7, 7, 0.4]])],
              [[mask], [], [~mask]])
    converted = from_mmdet_result(result)
    assert converted["labels"] == [0, 2] and converted["scores"].tolist() == pytest.approx([0.9, 0.4])
    assert converted["boxes"].tolist() == [[1, 1, 2, 2], [4, 4, 7, 7]]
    assert torch.equal(converted["masks"][0], torch.from_numpy(mask))


def scene():
    """(images, prompts, strict scores) a person checks by eye on the rectangles."""
    cases = [
        (canvas((2, 2, 8, 8, "red")), {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, 1.0),
        (canvas((2, 2, 8, 8, "red")), {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "blue"}]},
         0.0),
        (canvas((1, 1, 6, 6, "red"), (10, 1, 6, 6, "red"), (20, 1, 6, 6, "red")),
         {"tag": "counting", "include": [{"class": "dog", "count": 3}]}, 1.0),
        # the fourth blob is 3×3 = 9 px: confidence 0.5, below the counting threshold 0.9
        (canvas((1, 1, 6, 6, "red"), (10, 1, 6, 6, "red"), (20, 1, 6, 6, "red"), (1, 20, 3, 3, "red")),
         {"tag": "counting", "include": [{"class": "dog", "count": 3}]}, 1.0),
        (canvas((1, 10, 12, 4, "blue"), (20, 2, 4, 12, "green")),
         {"tag": "position", "include": [{"class": "bottle", "count": 1},
                                         {"class": "car", "count": 1, "position": ["left of", 0]}]}, 1.0),
        (canvas((1, 10, 12, 4, "blue"), (20, 2, 4, 12, "green")),
         {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "blue"},
                                           {"class": "bottle", "count": 1, "color": "red"}]}, 0.0),
    ]
    images = torch.stack([image for image, _, _ in cases] + [canvas((2, 2, 8, 8, "red"))])
    prompts = [Prompt(f"prompt {i}", metadata) for i, (_, metadata, _) in enumerate(cases)] + ["no metadata"]
    return images, prompts, [score for _, _, score in cases] + [float("nan")]


def test_the_reward_judges_rendered_scenes_with_a_tiny_detector():
    images, prompts, expected = scene()
    scores = geneval()(images, prompts)
    assert torch.equal(scores.isnan(), torch.tensor(expected).isnan())
    assert scores.nan_to_num(-1).tolist() == [s if s == s else -1 for s in expected]
    partial = geneval(score="partial")(images, prompts)
    assert partial[1] == 0.5 and partial[5] == 0.75  # colour wrong: [count 1, colour 0] (+ [1, 1] for the car)
    bad = [Prompt("a dragon", {"tag": "single_object", "include": [{"class": "dragon", "count": 1}]})]
    with pytest.raises(MarbleError, match=r"prompt 'a dragon' has unusable GenEval metadata: clause 0 names "
                                          r"class 'dragon', not one of the detector's classes"):
        geneval()(images[:1], bad)


def test_a_missing_detector_is_a_one_line_error_naming_the_weights(monkeypatch):
    monkeypatch.delenv("MARBLE_GENEVAL_DETECTOR", raising=False)
    with pytest.raises(MarbleError, match=r"detector=mmdet needs the Mask2Former checkpoint mask2former_swin-s-p4.*"
                                          r"\.pth \(from https://download\.openmmlab\.com/.*\); pass --reward-opt "
                                          r"geneval\.detector_weights=PATH or set MARBLE_GENEVAL_DETECTOR"):
        build("reward", "geneval", {"color": TINY["color"]})
    with pytest.raises(MarbleError, match=r"detector='nowhere:build' does not import"):
        build("reward", "geneval", {"detector": "nowhere:build"})


def test_geneval_prompt_metadata_reaches_the_reward_in_training(tmp_path):
    lines = [{"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
             {"prompt": "a photo of two cars", "tag": "counting", "include": [{"class": "car", "count": 2}],
              "exclude": [{"class": "car", "count": 3}]}]
    path = tmp_path / "geneval.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (loaded,) = load_prompt_sets([str(path)])
    assert [p.metadata for p in loaded.prompts] == [{k: v for k, v in line.items() if k != "prompt"} for line in lines]
    config = TrainConfig(rewards=["geneval", "brightness"], reward_options={"geneval": TINY}, prompts=[str(path)],
                         prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2, out="unused")
    trainer = Trainer(config, build_components(config))
    seen = []
    reward = trainer.rewards[0]
    score = reward.score
    reward.score = lambda images, prompts: seen.extend(prompts) or score(images, prompts)
    metrics = trainer.step()
    assert sorted(p.metadata["tag"] for p in seen) == ["counting", "counting", "single_object", "single_object"]
    assert metrics["reward_coverage/geneval"] == 1.0  # every image judged (0 or 1 each)


def test_the_served_reward_scores_like_the_in_process_one(monkeypatch):
    from marble_kit.serve import serving_in_thread

    reward = geneval()
    monkeypatch.setenv("MARBLE_REWARD_TOKEN", "t")
    with serving_in_thread("geneval", reward, token="t", max_request_mb=1, max_batch=64) as url:
        for encoding in ("float32", "png"):  # the rectangles survive 8-bit pixels exactly
            remote = build("reward", "remote:geneval", {"url": url, "encoding": encoding,
                                                        "batch_size": 3})  # 3 requests of ≤ 3 images
            images, prompts, _ = scene()
            expected = reward(images, prompts)
            assert torch.equal(remote(images, prompts).nan_to_num(-1), expected.nan_to_num(-1)), encoding
