"""Prompt sets, their reward tags, and a seeded stratified sampler (SPEC §1.2).

A training run draws prompts from several *prompt sets*. A set may list the rewards that judge
it (its tags); every other reward is NaN on its samples, so each rollout is judged by the
"specialist" rewards of its set — the setting MARBLE is built for. A set without tags is judged
by every reward.

Sources (``load_prompt_sets``):

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.jsonl``: one JSON object per line, ``{"prompt": "...", "rewards": ["ocr"]}`` (``rewards``
  optional). Lines with different tags become separate sets. Any other keys are the prompt's
  *metadata* (e.g. GenEval's ``tag`` / ``include`` / ``exclude``): the prompt is then a
  :class:`Prompt`, a ``str`` that carries them to the rewards (``prompt.metadata``).
* ``.toml`` manifest: ``[[prompt_set]]`` tables with ``path`` (relative to the manifest),
  optional ``rewards``, ``weight`` (share of the draws, default 1) and ``name``.
* built-in sets shipped in ``marble_kit/data/prompts`` (``builtin:NAME`` or plain ``NAME`` when
  no such file exists); ``default`` is the manifest of the embedded default run.
* ``SOURCE:reward1+reward2`` tags every set of ``SOURCE`` with those rewards.

A tag names a reward as it judges, in process or served: a set tagged ``ocr`` is judged by
``ocr`` and by ``remote:ocr`` alike (and one tagged ``remote:ocr`` by both), see
:func:`judged_name`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib
import torch

from marble_kit.errors import MarbleError

PROMPT_SUFFIXES = (".txt", ".jsonl")
MANIFEST_SUFFIX = ".toml"
BUILTIN_PREFIX = "builtin:"
_TAGS = re.compile(r"[A-Za-z0-9_-]+(\+[A-Za-z0-9_-]+)*")
_MANIFEST_KEYS = {"path", "rewards", "weight", "name"}
REMOTE_PREFIX = "remote:"


def judged_name(reward: str) -> str:
    """The name a reward judges prompt sets under: ``remote:NAME`` is the reward NAME served
    (``marble serve-reward NAME``), so it judges the sets tagged NAME, as NAME does in process."""
    return reward[len(REMOTE_PREFIX):] if reward.startswith(REMOTE_PREFIX) else reward


def names_reward(tag: str, reward: str) -> bool:
    """Whether the tag ``tag`` names ``reward`` (``ocr`` and ``remote:ocr`` name each other)."""
    return judged_name(tag) == judged_name(reward)


def configured_reward(tag: str, rewards: Sequence[str]) -> bool:
    """Whether some reward of ``rewards`` judges the sets tagged ``tag``."""
    return any(names_reward(tag, name) for name in rewards)


class Prompt(str):
    """A prompt with metadata: a ``str`` (so every consumer of prompts works unchanged) whose
    ``metadata`` dict holds the other keys of its .jsonl line. Rewards read it through
    :func:`prompt_metadata`; equal text means an equal (and equally hashed) prompt."""

    metadata: dict[str, Any]

    def __new__(cls, text: str, metadata: dict[str, Any] | None = None) -> Prompt:
        prompt = super().__new__(cls, text)
        prompt.metadata = dict(metadata or {})
        return prompt

    def __reduce__(self):  # pickles (and deep-copies) with its metadata
        return (Prompt, (str(self), self.metadata))


def prompt_metadata(prompt: str) -> dict[str, Any]:
    """The metadata of a prompt (empty for a plain string)."""
    return getattr(prompt, "metadata", None) or {}


@dataclass
class PromptSet:
    """Prompts judged by the same rewards.

    Attributes:
        name: shown in logs (file stem or manifest name).
        prompts: the prompts, in file order.
        rewards: names of the rewards that judge this set; None = every reward.
        weight: relative share of the draws in a :class:`PromptSampler`.
        source: where the prompts came from (for messages).
    """

    name: str
    prompts: list[str]
    rewards: list[str] | None = None
    weight: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or self.name
        if not self.prompts:
            raise MarbleError(f"prompt set {self.name!r} ({where}) is empty; add at least one prompt")
        if not self.weight > 0:
            raise MarbleError(
                f"prompt set {self.name!r} ({where}) has weight {self.weight}; use a weight > 0"
            )

    def applies(self, reward: str) -> bool:
        """Whether ``reward`` judges the prompts of this set (``remote:NAME`` judges the sets
        tagged NAME, and NAME those tagged ``remote:NAME``)."""
        return self.rewards is None or any(names_reward(tag, reward) for tag in self.rewards)


# ------------------------------------------------------------------------------ loading


def builtin_prompt_dir() -> Path:
    """The directory of the shipped prompt sets."""
    return Path(str(resources.files("marble_kit").joinpath("data", "prompts")))


def builtin_prompt_sets() -> list[str]:
    """Names of the shipped prompt sets (``default`` is the manifest of the default run)."""
    directory = builtin_prompt_dir()
    suffixes = (*PROMPT_SUFFIXES, MANIFEST_SUFFIX)
    return sorted(p.stem for p in directory.iterdir() if p.suffix in suffixes)


def _builtin_path(name: str) -> Path | None:
    directory = builtin_prompt_dir()
    for candidate in (name, *(name + suffix for suffix in (MANIFEST_SUFFIX, *PROMPT_SUFFIXES))):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MarbleError(f"prompt file {path} does not exist; check the path") from None
    except UnicodeDecodeError as exc:
        raise MarbleError(f"prompt file {path} is not UTF-8 text ({exc}); save it as UTF-8") from None
    except OSError as exc:
        raise MarbleError(f"prompt file {path} cannot be read: {exc}") from None


def _text_prompts(path: Path) -> list[str]:
    lines = (line.strip() for line in _read_lines(path))
    return [line for line in lines if line and not line.startswith("#")]


def _jsonl_prompts(path: Path) -> list[tuple[str, tuple[str, ...] | None]]:
    """(prompt, tags) per non-blank line of a .jsonl file; a line with other keys gives a
    :class:`Prompt` carrying them as its metadata."""
    entries = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"prompt file {path} line {number}"
        fix = 'write one JSON object per line, e.g. {"prompt": "a red circle", "rewards": ["color"]}'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MarbleError(f"{where} is not valid JSON ({exc.msg}); {fix}") from None
        if not isinstance(record, dict):
            raise MarbleError(f"{where} is a JSON {type(record).__name__}, not an object; {fix}")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise MarbleError(f'{where} has no non-empty string "prompt"; {fix}')
        tags = record.get("rewards")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise MarbleError(f'{where}: "rewards" must be a list of reward names; {fix}')
        metadata = {key: value for key, value in record.items() if key not in ("prompt", "rewards")}
        text = Prompt(prompt.strip(), metadata) if metadata else prompt.strip()
        entries.append((text, tuple(tags) if tags is not None else None))
    return entries


def load_prompt_file(path: str | Path) -> list[PromptSet]:
    """Prompt sets of one .txt or .jsonl file.

    A .txt file is one untagged set named after the file. A .jsonl file is one set per distinct
    ``rewards`` tag list (in order of first appearance), each weighted by its share of the
    lines, so the file as a whole weighs 1.
    """
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise MarbleError(
            f"prompt file {path} has suffix {path.suffix!r}; use .txt (one prompt per line), "
            ".jsonl ({\"prompt\": ...} per line) or a .toml manifest"
        )
    if path.suffix == ".txt":
        entries = [(prompt, None) for prompt in _text_prompts(path)]
    else:
        entries = _jsonl_prompts(path)
    if not entries:
        raise MarbleError(
            f"prompt file {path} has no prompts (blank lines and # comments are skipped); "
            "add one prompt per line"
        )
    groups: dict[tuple[str, ...] | None, list[str]] = {}
    for prompt, tags in entries:
        groups.setdefault(tags, []).append(prompt)
    sets = []
    for tags, prompts in groups.items():
        name = path.stem if len(groups) == 1 else f"{path.stem}[{'+'.join(tags or ('all',))}]"
        sets.append(PromptSet(name, prompts, list(tags) if tags is not None else None,
                              weight=len(prompts) / len(entries), source=str(path)))
    return sets


def load_manifest(path: str | Path) -> list[PromptSet]:
    """Prompt sets listed by a TOML manifest (``[[prompt_set]]`` tables)."""
    path = Path(path)
    try:
        manifest = tomllib.loads("\n".join(_read_lines(path)))
    except tomllib.TOMLDecodeError as exc:
        raise MarbleError(f"prompt manifest {path} is not valid TOML: {exc}") from None
    example = 'a [[prompt_set]] table with path = "colors.txt" and optional rewards = ["color"]'
    unknown = sorted(set(manifest) - {"prompt_set"})
    if unknown:
        raise MarbleError(f"prompt manifest {path}: unknown key {unknown[0]!r}; "
                          f"list each set as {example}")
    entries = manifest.get("prompt_set")
    if not isinstance(entries, list) or not entries:
        raise MarbleError(f"prompt manifest {path} lists no prompt sets; add {example}")
    sets: list[PromptSet] = []
    for number, entry in enumerate(entries, start=1):
        where = f"prompt manifest {path}, prompt_set #{number}"
        bad_keys = sorted(set(entry) - _MANIFEST_KEYS)
        if bad_keys:
            raise MarbleError(f"{where}: unknown key {bad_keys[0]!r}; valid keys: "
                              f"{', '.join(sorted(_MANIFEST_KEYS))}")
        if not isinstance(entry.get("path"), str):
            raise MarbleError(f'{where} has no "path"; add path = "FILE.txt" (relative to the manifest)')
        tags = entry.get("rewards")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise MarbleError(f'{where}: "rewards" must be a list of reward names, e.g. ["color"]')
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise MarbleError(f'{where}: "weight" must be a number > 0, got {weight!r}')
        source = entry["path"]
        if source.startswith(BUILTIN_PREFIX):
            file = _builtin_path(source[len(BUILTIN_PREFIX):])
            if file is None:
                raise MarbleError(f"{where}: no built-in prompt set {source!r}; built-ins: "
                                  f"{', '.join(builtin_prompt_sets())}")
        else:
            file = path.parent / source
        if file.suffix == MANIFEST_SUFFIX:
            raise MarbleError(f"{where}: {source!r} is a manifest; entries must be .txt or .jsonl files")
        if not file.is_file():
            raise MarbleError(f"{where}: prompt file {file} does not exist; fix the path "
                              "(relative to the manifest's directory)")
        for prompt_set in load_prompt_file(file):
            if tags is not None:
                prompt_set.rewards = list(tags)
            if "name" in entry:
                prompt_set.name = str(entry["name"]) + prompt_set.name[len(file.stem):]
            prompt_set.weight *= float(weight)
            sets.append(prompt_set)
    return sets


def _split_tags(spec: str) -> tuple[str, list[str] | None]:
    """``"SOURCE:reward1+reward2"`` → (SOURCE, [reward1, reward2]); no suffix → (spec, None)."""
    if Path(spec).exists():
        return spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and head != BUILTIN_PREFIX[:-1] and _TAGS.fullmatch(tail):
        return head, tail.split("+")
    return spec, None


def _resolve(source: str) -> Path:
    """The file behind a user path, ``builtin:NAME`` or plain built-in ``NAME``."""
    builtins = ", ".join(builtin_prompt_sets())
    if source.startswith(BUILTIN_PREFIX):
        path = _builtin_path(source[len(BUILTIN_PREFIX):])
        if path is None:
            raise MarbleError(f"no built-in prompt set {source!r}; built-ins: {builtins}")
        return path
    path = Path(source).expanduser()
    if path.is_file():
        return path
    builtin = None if ("/" in source or path.suffix) else _builtin_path(source)
    if builtin is None and path.exists():
        raise MarbleError(f"prompt set {source!r} is a directory; pass a .txt, .jsonl or .toml file")
    if builtin is None:
        raise MarbleError(
            f"prompt set {source!r} is neither a file nor a built-in set; pass a path to a "
            f".txt/.jsonl/.toml file or one of the built-ins: {builtins}"
        )
    return builtin


def load_prompt_sets(spec: str | Path | Sequence[str | Path]) -> list[PromptSet]:
    """Prompt sets from one or several sources (see the module docstring for the forms)."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items:
        raise MarbleError("no prompt sets given; pass --prompts FILE or a built-in name (e.g. default)")
    sets: list[PromptSet] = []
    for item in items:
        source, tags = _split_tags(str(item))
        path = _resolve(source)
        loaded = load_manifest(path) if path.suffix == MANIFEST_SUFFIX else load_prompt_file(path)
        for prompt_set in loaded:
            if tags is not None:
                prompt_set.rewards = list(tags)
            sets.append(prompt_set)
    return sets


def resolve_prompt_sets(spec: str | Path | Sequence[str | Path], rewards: Sequence[str]) -> list[PromptSet]:
    """Prompt sets for a run with ``rewards``; the plain ``default`` adapts to the rewards.

    ``default`` is the world mixture (``default.toml``) when some configured reward judges
    world prompts: each set keeps the tags that are configured, configured rewards the
    manifest never tags (e.g. ``brightness``) judge every set, and sets left with no reward
    are dropped. With none of the world rewards (e.g. ``hps,pickscore,ocr``) it is the
    ``general`` prompt set, plus the ``ocr`` set when ``ocr`` is configured. A served reward
    counts as the reward it serves (``remote:ocr`` as ``ocr``, ``remote:color`` as ``color``).
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if [str(item) for item in items] != ["default"]:
        return load_prompt_sets(items)
    world_sets = load_prompt_sets(["default"])
    world_rewards = tagged_rewards(world_sets)
    if not any(configured_reward(name, rewards) for name in world_rewards):
        return load_prompt_sets(["general"] + (["ocr"] if configured_reward("ocr", rewards) else []))
    global_rewards = [name for name in rewards if not configured_reward(name, world_rewards)]
    kept = []
    for prompt_set in world_sets:
        tags = [name for tag in prompt_set.rewards or [] for name in rewards if names_reward(tag, name)]
        tags += global_rewards
        if tags:
            prompt_set.rewards = tags
            kept.append(prompt_set)
    return kept


def tagged_rewards(sets: Sequence[PromptSet]) -> list[str]:
    """Every reward some set is tagged with, in order of first appearance."""
    names: list[str] = []
    for prompt_set in sets:
        names.extend(name for name in prompt_set.rewards or [] if name not in names)
    return names


# ------------------------------------------------------------------------------ sampling


def _permutation_seed(seed: int, set_index: int, epoch: int) -> int:
    # distinct, reproducible stream per (seed, set, pass over the set)
    return (seed * 1_000_003 + set_index * 7_919 + epoch * 104_729) % (2**63 - 1)


class PromptSampler:
    """Seeded stratified draws of prompts across sets.

    Sets take turns by smooth weighted round-robin (with equal weights: 0, 1, 2, 0, 1, 2, ...),
    so every batch mixes the sets in proportion to their weights. Within a set, prompts come
    in a fresh seeded permutation per pass, so every prompt is used once before any repeats.
    The whole state is a few numbers; ``state_dict``/``load_state_dict`` resume bit-exactly.
    """

    def __init__(self, sets: Sequence[PromptSet], seed: int = 0):
        if not sets:
            raise MarbleError("no prompt sets to sample from; pass --prompts FILE")
        self.sets = list(sets)
        self.seed = int(seed)
        self.credits = [0.0] * len(self.sets)
        self.positions = [0] * len(self.sets)
        self.epochs = [0] * len(self.sets)
        self._orders: dict[int, tuple[int, list[int]]] = {}

    def _next_set(self) -> int:
        weights = [prompt_set.weight for prompt_set in self.sets]
        self.credits = [credit + weight for credit, weight in zip(self.credits, weights)]
        chosen = max(range(len(self.sets)), key=lambda i: (self.credits[i], -i))
        self.credits[chosen] -= sum(weights)
        return chosen

    def _order(self, set_index: int) -> list[int]:
        epoch = self.epochs[set_index]
        cached = self._orders.get(set_index)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(_permutation_seed(self.seed, set_index, epoch))
            size = len(self.sets[set_index].prompts)
            cached = (epoch, torch.randperm(size, generator=generator).tolist())
            self._orders[set_index] = cached
        return cached[1]

    def _next_prompt(self, set_index: int) -> str:
        order = self._order(set_index)
        prompt = self.sets[set_index].prompts[order[self.positions[set_index]]]
        self.positions[set_index] += 1
        if self.positions[set_index] == len(order):
            self.positions[set_index] = 0
            self.epochs[set_index] += 1
        return prompt

    def sample(self, n_prompts: int) -> list[tuple[str, int]]:
        """``n_prompts`` draws of (prompt, index of its set)."""
        drawn = []
        for _ in range(n_prompts):
            set_index = self._next_set()
            drawn.append((self._next_prompt(set_index), set_index))
        return drawn

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "set_sizes": [len(s.prompts) for s in self.sets],
            "credits": list(self.credits),
            "positions": list(self.positions),
            "epochs": list(self.epochs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = [len(s.prompts) for s in self.sets]
        if list(state["set_sizes"]) != sizes:
            raise MarbleError(
                f"the prompt sets changed since the checkpoint (set sizes {list(state['set_sizes'])} "
                f"then, {sizes} now); resume with the same --prompts"
            )
        self.seed = int(state["seed"])
        self.credits = [float(c) for c in state["credits"]]
        self.positions = [int(p) for p in state["positions"]]
        self.epochs = [int(e) for e in state["epochs"]]
        self._orders.clear()


def applicability_mask(set_indices: torch.Tensor | Sequence[int], reward_names: Sequence[str],
                       sets: Sequence[PromptSet]) -> torch.Tensor:
    """``[K, B]`` bool: True where reward k judges sample b (its set has no tags or lists k)."""
    indices = torch.as_tensor(set_indices, dtype=torch.long).reshape(-1)
    if indices.numel() and (indices.min() < 0 or indices.max() >= len(sets)):
        raise MarbleError(f"set index out of range 0..{len(sets) - 1}: {indices.tolist()}")
    table = torch.tensor([[s.applies(name) for s in sets] for name in reward_names],
                         dtype=torch.bool).reshape(len(reward_names), len(sets))
    return table[:, indices]
