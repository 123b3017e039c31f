"""`geneval`: GenEval's compositional correctness — objects, counts, colours and positions found
by an object detector (Ghosh et al. 2023, djghosh13/geneval; Flow-GRPO's GenEval reward).

Each prompt carries GenEval metadata (a .jsonl prompt line's extra keys, see
marble_kit/prompts.py), e.g. ``{"prompt": "a photo of a dog left of a cat", "tag": "position",
"include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of",
0]}]}``; ``tag`` is one of single_object, two_object, counting, colors, position, color_attr;
``include`` clauses have ``class`` and ``count`` and may have ``color`` and ``position``
(relation, index of an earlier clause); ``exclude`` clauses have ``class`` and ``count``.
A prompt without ``include`` is not judged (NaN).

Detections: per class, boxes above the confidence threshold (0.9 for ``counting`` prompts, else
0.3), most confident first, at most 16, optionally de-duplicated by IoU (off by default), as
GenEval keeps them. Colours: each object masked onto grey (#999), cropped to its box and
classified among GenEval's ten colours. Position: A is "left of" B when the box centres,
shrunk by 0.1·(both box sizes), point more than 60° away from vertical, and so on.

``score`` (the reward's value):

* ``"strict"`` (default): 1 when every include clause holds with the *exact* count, its colour
  for every object and its relation to every target object; else 0 (Flow-GRPO's strict reward);
* ``"correct"``: GenEval's own metric: at least ``count`` objects (colour and position checked
  on the ``count`` most confident), and no exclude clause violated;
* ``"partial"``: Flow-GRPO's graded score — the mean over clauses of 1 − |count − found|/count,
  colour matches and relation checks (what Flow-GRPO and MARBLE train on).

Components (``detector`` and ``color`` options):

* ``detector="mmdet"``: the real GenEval detector, Mask2Former Swin-S (mmdet 2.x + mmcv-full,
  see :data:`MASK2FORMER`): ``detector_weights`` (or $MARBLE_GENEVAL_DETECTOR) is the
  checkpoint, ``detector_config`` its mmdetection config;
* ``detector="MODULE:FACTORY"``: ``FACTORY()`` returns a callable
  ``detector(images [B, 3, H, W] float in [0, 1]) -> [{"boxes": [N, 4] xyxy pixels, "labels":
  [N] class indices or names, "scores": [N], "masks": [N, H, W] (optional)}, ...]`` — the
  output of a torchvision detection model, for one;
* ``color="clip"``: zero-shot CLIP (GenEval: ViT-L-14 openai; ``clip_weights``, a transformers
  CLIP directory or an open_clip file, as for the `clip` reward) over the prompts "a photo of a
  {color} {class}", "a photo of a {color}-colored {class}", "a photo of a {color} object";
* ``color="MODULE:FACTORY"``: ``FACTORY()`` returns ``classify(crops: list of [3, h, w],
  classname) -> list of colour names``.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.rewards import Reward, prompt_metadata

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
SCORES = ("strict", "correct", "partial")
# GenEval's object_names.txt: the 80 COCO classes in the detector's label order
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
MASK_BACKGROUND = 0x99 / 255.0  # GenEval composites each object onto #999 before classifying it
MASK2FORMER = {
    "file": "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth",
    "source": "https://download.openmmlab.com/mmdetection/v2.0/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/"
              "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth",
    "config": "configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",
    "env": "MARBLE_GENEVAL_DETECTOR",
}


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, confidence, optional bool mask [H, W]."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


# ------------------------------------------------------------------------------ geometry

def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (a box spans x2 − x1 + 1 pixels)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(a: Sequence[float], b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Where box ``a`` lies relative to box ``b``: a subset of left of / right of / above / below.

    The centre offset, shrunk on each axis by ``threshold``·(sum of the two boxes' sizes),
    normalized by the unshrunk offset's length; a relation holds beyond 0.5 on its axis (image
    y grows downwards, so "above" is a negative dy)."""
    boxes = np.array([a[:4], b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def keep_detections(raw: dict[str, Any], classnames: Sequence[str], threshold: float, max_objects: int = 16,
                    nms_threshold: float = 1.0) -> dict[str, list[Detection]]:
    """Per class name: detections above ``threshold``, most confident first, at most
    ``max_objects``, greedily de-duplicated at IoU ≥ ``nms_threshold`` (1 = off, GenEval's)."""
    boxes = torch.as_tensor(raw.get("boxes", []), dtype=torch.float64).reshape(-1, 4)
    scores = torch.as_tensor(raw.get("scores", []), dtype=torch.float64).reshape(-1)
    labels = raw.get("labels", [])
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    masks = raw.get("masks")
    if not (len(boxes) == len(scores) == len(labels)) or (masks is not None and len(masks) != len(boxes)):
        raise MarbleError(f"reward 'geneval': the detector returned {len(boxes)} boxes, {len(scores)} scores, "
                          f"{len(labels)} labels and {'no' if masks is None else len(masks)} masks; it must "
                          "return one of each per object")
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        name = label if isinstance(label, str) else classnames[int(label)]
        by_class.setdefault(name, []).append(index)
    kept: dict[str, list[Detection]] = {}
    for name, indices in by_class.items():
        order = sorted((i for i in indices if scores[i] > threshold), key=lambda i: -float(scores[i]))
        order = order[:max_objects]
        chosen: list[Detection] = []
        while order:
            best = order.pop(0)
            mask = None if masks is None else np.asarray(torch.as_tensor(masks[best]).cpu().numpy() > 0.5)
            chosen.append(Detection(tuple(float(v) for v in boxes[best]), float(scores[best]), mask))
            if nms_threshold < 1:
                order = [i for i in order if box_iou(boxes[best].tolist(), boxes[i].tolist()) < nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


# ------------------------------------------------------------------------------ the judgement

@dataclass(frozen=True)
class Judgement:
    strict: bool
    correct: bool
    partial: float
    reason: str


def judge(objects: dict[str, list[Detection]], metadata: dict[str, Any],
          colors_of: Callable[[str, list[Detection]], list[str]], position_threshold: float = 0.1) -> Judgement:
    """GenEval's verdicts on one image's kept ``objects`` for the prompt ``metadata``."""
    strict_ok, partial, strict_groups, why = True, [], [], []
    # Strict (Flow-GRPO's evaluate_reward): exact counts; partial credit per clause.
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])
        matched = len(found) == count
        partial.append(1 - abs(count - len(found)) / count)
        if not matched:
            why.append(f"expected {name}=={count}, found {len(found)}")
            if "color" in clause or "position" in clause:
                partial.append(0.0)
        else:
            if "color" in clause:
                hits = colors_of(name, found).count(clause["color"])
                partial.append(1 - abs(count - hits) / count)
                if hits != count:
                    matched = False
                    why.append(f"expected {count} {clause['color']} {name}, found {hits}")
            if "position" in clause and matched:
                relation, target = clause["position"]
                targets = strict_groups[target]
                if targets is None:
                    matched = False
                    why.append(f"no target for {name} to be {relation}")
                    partial.append(0.0)
                else:
                    for obj in found:
                        misplaced = [t for t in targets
                                     if relation not in relative_position(obj.box, t.box, position_threshold)]
                        if misplaced:
                            matched = False
                            why.append(f"expected {name} {relation} its target")
                            partial.append(0.0)
                            break
                    partial.append(1.0)  # (Flow-GRPO appends this after the check either way)
        strict_ok &= matched
        strict_groups.append(found if matched else None)

    # Correct (GenEval's evaluate): at least `count`, checks on the most confident ones, excludes.
    correct, groups = True, []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if matched and "color" in clause:
            matched = colors_of(name, found).count(clause["color"]) >= count
        if matched and "position" in clause:
            relation, target = clause["position"]
            targets = groups[target]
            matched = targets is not None and all(
                relation in relative_position(obj.box, t.box, position_threshold) for obj in found for t in targets)
        correct &= matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], [])) >= clause["count"]:
            correct = False
    return Judgement(bool(strict_ok), bool(correct), sum(partial) / len(partial) if partial else 0.0,
                     "; ".join(why))


def check_metadata(metadata: dict[str, Any], prompt: str, classnames: Sequence[str]) -> None:
    """A one-line error naming the prompt when its GenEval metadata cannot be judged."""
    def bad(why: str) -> MarbleError:
        return MarbleError(f"reward 'geneval': prompt {str(prompt)[:60]!r} has unusable GenEval metadata: {why}; "
                           'write e.g. {"tag": "counting", "include": [{"class": "dog", "count": 3}]}')

    if metadata.get("tag") not in TAGS:
        raise bad(f"tag {metadata.get('tag')!r} is not one of {', '.join(TAGS)}")
    clauses = metadata.get("include")
    if not isinstance(clauses, list) or not clauses:
        raise bad('"include" must be a non-empty list of clauses')
    for index, clause in enumerate([*clauses, *metadata.get("exclude", [])]):
        if not isinstance(clause, dict) or clause.get("class") not in classnames:
            raise bad(f"clause {index} names class {clause.get('class') if isinstance(clause, dict) else clause!r}, "
                      "not one of the detector's classes")
        count = clause.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise bad(f"clause {index} has count {count!r}; use an integer >= 1")
        if "color" in clause and clause["color"] not in COLORS:
            raise bad(f"clause {index} has colour {clause['color']!r}, not one of {', '.join(COLORS)}")
        if "position" in clause:
            position = clause["position"]
            if (not isinstance(position, list) or len(position) != 2 or position[0] not in RELATIONS
                    or not isinstance(position[1], int) or not 0 <= position[1] < min(index, len(clauses))):
                raise bad(f'clause {index} has position {position!r}; use ["left of", INDEX OF AN EARLIER CLAUSE]')


# ------------------------------------------------------------------------------ the reward

def object_crops(image: torch.Tensor, detections: Sequence[Detection]) -> list[torch.Tensor]:
    """Each object as GenEval shows it to the colour classifier: its mask over grey (#999),
    cropped to its box (rounded like PIL's crop); without a mask, the box of the image."""
    crops = []
    height, width = image.shape[-2:]
    for detection in detections:
        view = image
        if detection.mask is not None:
            mask = torch.from_numpy(np.ascontiguousarray(detection.mask)).to(image.device)
            view = torch.where(mask, image, torch.full_like(image, MASK_BACKGROUND))
        x1, y1, x2, y2 = (round(v) for v in detection.box)
        x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        crops.append(view[:, y1:max(min(y2, height), y1 + 1), x1:max(min(x2, width), x1 + 1)])
    return crops


class GenEvalReward(Reward):
    """GenEval correctness of each image for its prompt's metadata (NaN without metadata)."""

    name = "geneval"

    def __init__(self, detector: Callable[[torch.Tensor], list[dict[str, Any]]],
                 classify_colors: Callable[[list[torch.Tensor], str], list[str]],
                 classnames: Sequence[str] = CLASSNAMES, score: str = "strict", threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, nms_threshold: float = 1.0,
                 position_threshold: float = 0.1, batch_size: int = 16):
        if score not in SCORES:
            raise MarbleError(f"reward 'geneval': score={score!r}; use one of {', '.join(SCORES)} "
                              "(--reward-opt geneval.score=strict)")
        self.detector, self.classify_colors, self.classnames = detector, classify_colors, tuple(classnames)
        self.score_kind, self.threshold, self.counting_threshold = score, threshold, counting_threshold
        self.max_objects, self.nms_threshold, self.position_threshold = max_objects, nms_threshold, position_threshold
        self.batch_size = batch_size

    def to(self, device):
        super().to(device)
        for part in (self.detector, self.classify_colors):
            if callable(getattr(part, "to", None)):
                part.to(self.device)
        return self

    def score(self, images, prompts):
        metadata = [prompt_metadata(p) for p in prompts]
        judged = [i for i, m in enumerate(metadata) if m.get("include")]
        scores = torch.full((len(prompts),), math.nan)
        if not judged:
            return scores
        for i in judged:
            check_metadata(metadata[i], prompts[i], self.classnames)
        outputs = self.detector(images[judged])
        if len(outputs) != len(judged):
            raise MarbleError(f"reward 'geneval': the detector returned {len(outputs)} results for "
                              f"{len(judged)} images; it must return one per image")
        for raw, i in zip(outputs, judged):
            threshold = self.counting_threshold if metadata[i]["tag"] == "counting" else self.threshold
            objects = keep_detections(raw, self.classnames, threshold, self.max_objects, self.nms_threshold)
            image = images[i]

            def colors_of(name: str, found: list[Detection], _image=image) -> list[str]:
                return list(self.classify_colors(object_crops(_image, found), name))

            verdict = judge(objects, metadata[i], colors_of, self.position_threshold)
            scores[i] = {"strict": float(verdict.strict), "correct": float(verdict.correct),
                         "partial": verdict.partial}[self.score_kind]
        return scores


# ------------------------------------------------------------------------------ components

def import_factory(spec: str, option: str) -> Callable[..., Any]:
    """``"package.module:factory"`` → the factory (a one-line error naming the option)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise MarbleError(f"reward 'geneval': {option}={spec!r} is neither a built-in choice nor MODULE:FACTORY "
                          f"(e.g. --reward-opt geneval.{option}=my_package.detect:build)")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise MarbleError(f"reward 'geneval': {option}={spec!r} does not import ({exc}); put the module on "
                          "PYTHONPATH or install its package") from None


def from_mmdet_result(result: Any) -> dict[str, Any]:
    """One image's mmdet 2.x result — per class an [N, 5] array (x1, y1, x2, y2, score), and
    per class a list of N masks — as the detector dict of this module (labels = class index)."""
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    boxes, scores, labels, masks = [], [], [], []
    for label, rows in enumerate(bbox):
        for index, row in enumerate(np.asarray(rows).reshape(-1, 5)):
            boxes.append(row[:4])
            scores.append(row[4])
            labels.append(label)
            if segm is not None:
                masks.append(np.asarray(segm[label][index], dtype=bool))
    return {"boxes": torch.tensor(np.array(boxes, dtype=np.float64)).reshape(-1, 4),
            "scores": torch.tensor(np.array(scores, dtype=np.float64)), "labels": labels,
            "masks": torch.from_numpy(np.stack(masks)) if masks else None}


class MmdetDetector:
    """GenEval's Mask2Former through mmdet 2.x (``init_detector`` / ``inference_detector``)."""

    def __init__(self, config: str | None, weights: str | None, device: str = "cpu"):
        path = weights or os.environ.get(MASK2FORMER["env"])
        if not path or not Path(path).expanduser().is_file():
            raise MarbleError(f"reward 'geneval': detector=mmdet needs the Mask2Former checkpoint "
                              f"{MASK2FORMER['file']} "
                              f"(from {MASK2FORMER['source']}); pass --reward-opt geneval.detector_weights=PATH or "
                              f"set {MASK2FORMER['env']}" + (f" ({path} does not exist)" if path else ""))
        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except ImportError as exc:
            raise MarbleError(f"reward 'geneval': detector=mmdet needs mmdetection 2.x with mmcv-full ({exc}); install "
                              "them where the reward runs (GenEval's environment; serve it with `marble "
                              "serve-reward geneval` and train with --rewards remote:geneval)") from None
        config = config or str(Path(mmdet.__file__).parent.parent / MASK2FORMER["config"])
        if not Path(config).is_file():
            raise MarbleError(f"reward 'geneval': the mmdetection config {config} does not exist; pass "
                              f"--reward-opt geneval.detector_config=PATH (mmdetection's {MASK2FORMER['config']})")
        self.model = init_detector(config, str(Path(path).expanduser()), device=device)
        self.inference = inference_detector

    def __call__(self, images: torch.Tensor) -> list[dict[str, Any]]:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        arrays = [np.ascontiguousarray(p[..., ::-1]) for p in pixels]  # mmdet reads arrays as BGR
        return [from_mmdet_result(result) for result in self.inference(self.model, arrays)]


class ClipColors:
    """Zero-shot CLIP colour of object crops (clip_benchmark's classifier: per colour the mean of
    the normalized template embeddings, renormalized; the colour of the largest cosine)."""

    def __init__(self, encoders: Any):
        self.encoders = encoders
        self._classifiers: dict[str, torch.Tensor] = {}

    def to(self, device):
        self.encoders.module.to(device)
        self._classifiers.clear()
        return self

    @torch.no_grad()
    def classifier(self, classname: str) -> torch.Tensor:
        if classname not in self._classifiers:
            device = next(self.encoders.module.parameters()).device
            columns = []
            for color in COLORS:
                texts = [t.format(c=color, cls=classname) for t in COLOR_TEMPLATES]
                embedding = torch.nn.functional.normalize(self.encoders.text_features(texts, device).float(), dim=-1)
                columns.append(torch.nn.functional.normalize(embedding.mean(0), dim=0))
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    @torch.no_grad()
    def __call__(self, crops: list[torch.Tensor], classname: str) -> list[str]:
        from marble_plugins.rewards._clip import clip_pixels

        if not crops:
            return []
        device = next(self.encoders.module.parameters()).device
        pixels = torch.cat([clip_pixels(c.unsqueeze(0).float().to(device), self.encoders.image_size,
                                        "crop-torchvision") for c in crops])
        features = torch.nn.functional.normalize(
            self.encoders.image_features(pixels.to(self.encoders.dtype)).float(), dim=-1)
        return [COLORS[int(i)] for i in (features @ self.classifier(classname)).argmax(dim=1)]


def build_geneval(detector: str = "mmdet", color: str = "clip", score: str = "strict",
                  detector_weights: str | None = None, detector_config: str | None = None,
                  clip_weights: str | None = None, clip_model: str = "ViT-L-14", clip_pretrained: str = "openai",
                  classnames: str | None = None, threshold: float = 0.3, counting_threshold: float = 0.9,
                  max_objects: int = 16, nms_threshold: float = 1.0, position_threshold: float = 0.1,
                  device: str = "cpu", batch_size: int = 16) -> GenEvalReward:
    """The GenEval reward with its detector and colour classifier (both loaded now).

    Args:
        detector: "mmdet" (GenEval's Mask2Former: detector_weights, detector_config) or
            MODULE:FACTORY returning a detector callable (module docstring).
        color: "clip" (clip_weights, clip_model, clip_pretrained) or MODULE:FACTORY.
        score: "strict" (default), "correct" (GenEval's metric) or "partial" (Flow-GRPO's graded).
        classnames: a text file, one class per line in label order (default GenEval's 80 COCO).
    """
    names = CLASSNAMES
    if classnames is not None:
        path = Path(classnames).expanduser()
        if not path.is_file():
            raise MarbleError(f"reward 'geneval': classnames file {path} does not exist; one class per line")
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if detector == "mmdet":
        detect = MmdetDetector(detector_config, detector_weights, device)
    else:
        detect = import_factory(detector, "detector")()
    if color == "clip":
        from marble_plugins.rewards.clip import build_clip

        colors = ClipColors(build_clip(weights=clip_weights, model=clip_model, pretrained=clip_pretrained,
                                       device=device).encoders)
    else:
        colors = import_factory(color, "color")()
    reward = GenEvalReward(detect, colors, names, score=score, threshold=threshold,
                           counting_threshold=counting_threshold, max_objects=max_objects,
                           nms_threshold=nms_threshold, position_threshold=position_threshold, batch_size=batch_size)
    return reward.to(device)


@hookimpl
def register_rewards(register):
    register("geneval", build_geneval,
             description="GenEval compositional correctness (objects, counts, colours, positions) from a detector; "
                         "needs prompt metadata.")
