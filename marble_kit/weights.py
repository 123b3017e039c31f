"""Find reward-model weights on the local disk and load them safely; never download.

A reward names what it needs with a :class:`WeightsSpec`. :func:`resolve_weights` looks, in
order, at (1) the explicit option (``--reward-opt hps.weights=/path``), (2) an environment
variable (``MARBLE_HPS_WEIGHTS``), (3) the local Hugging Face cache (``local_files_only``; the
cache location follows ``HF_HUB_CACHE`` / ``HF_HOME`` as usual). When nothing is found the
:class:`MarbleError` says which file is missing, where to download it and how to pass it.

Checkpoints are read with :func:`load_checkpoint`: safetensors, or ``torch.load`` with
``weights_only=True`` (no arbitrary code from pickles).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marble_kit.errors import MarbleError


@dataclass(frozen=True)
class WeightsSpec:
    """What one reward needs on disk and where users get it.

    Attributes:
        reward: reward name, used in messages and in ``--reward-opt REWARD.OPTION``.
        filename: the file to find (``kind="file"``) or a file that marks a valid model
            directory (``kind="dir"``, e.g. ``config.json``).
        option: the reward option that takes the path.
        env_var: environment variable that may hold the path.
        source: public download location (URL), for the error message.
        hf_repo: Hugging Face repo id whose local cache may hold the weights.
        kind: ``"file"`` or ``"dir"``.
        description: what the directory is, for messages (``"CLIP tokenizer directory"``).
    """

    reward: str
    filename: str
    option: str
    env_var: str
    source: str
    hf_repo: str | None = None
    kind: str = "file"
    description: str = "model directory"

    def missing_message(self) -> str:
        what = "weights file" if self.kind == "file" else f"{self.description} with"
        example = f"/path/{self.filename}" if self.kind == "file" else "/path/to/dir"
        return (
            f"{self.reward}: {what} {self.filename} not found; download it from {self.source} "
            f"and pass --reward-opt {self.reward}.{self.option}={example} or set {self.env_var}"
        )


def _hf_cache_dir() -> str | None:
    # Read at call time (huggingface_hub reads its env vars once, at import).
    return os.environ.get("HF_HUB_CACHE") or None


def _from_hf_cache(spec: WeightsSpec) -> Path | None:
    """The cached file / snapshot directory of ``spec.hf_repo``, without any network access."""
    if spec.hf_repo is None:
        return None
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = _hf_cache_dir()
    if spec.kind == "file":
        found = try_to_load_from_cache(spec.hf_repo, spec.filename, cache_dir=cache_dir)
        return Path(found) if isinstance(found, str) else None
    try:
        snapshot = Path(snapshot_download(spec.hf_repo, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return snapshot if (snapshot / spec.filename).is_file() else None


def _check_candidate(spec: WeightsSpec, path: Path, origin: str) -> Path:
    """``path`` as given by the user (``origin``), adjusted to the file or directory ``spec`` wants."""
    if not path.exists():
        raise MarbleError(
            f"{spec.reward}: {origin} points to {path}, which does not exist; fix the path "
            f"(expected {spec.filename}, from {spec.source})"
        )
    if spec.kind == "file" and path.is_dir():
        inside = path / spec.filename
        if not inside.is_file():
            raise MarbleError(
                f"{spec.reward}: {origin} is the directory {path}, which has no {spec.filename}; "
                f"pass the file itself (download it from {spec.source})"
            )
        return inside
    if spec.kind == "dir" and not (path / spec.filename).is_file():
        raise MarbleError(
            f"{spec.reward}: {origin} {path} is not a {spec.description} (no {spec.filename}); "
            f"pass a directory laid out like {spec.source}"
        )
    return path


def resolve_weights(spec: WeightsSpec, explicit: str | os.PathLike | None = None) -> Path:
    """The local path of ``spec``'s weights: option, then env var, then the HF cache, else error."""
    if explicit not in (None, ""):
        origin = f"--reward-opt {spec.reward}.{spec.option}"
        return _check_candidate(spec, Path(explicit).expanduser(), origin)
    from_env = os.environ.get(spec.env_var)
    if from_env:
        return _check_candidate(spec, Path(from_env).expanduser(), spec.env_var)
    cached = _from_hf_cache(spec)
    if cached is not None:
        return cached
    raise MarbleError(spec.missing_message())


def load_checkpoint(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A checkpoint dict from ``.safetensors`` or a torch pickle, loaded with ``weights_only``.

    ``what`` names the reward for error messages (``"hps"``).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused is None:  # not a pickle at all
            raise MarbleError(f"{what}: cannot read checkpoint {path} (corrupt or not a torch "
                              "file); re-download it") from exc
        raise MarbleError(
            f"{what}: {path} holds more than tensors ({refused.group(1)}) and cannot be loaded "
            "safely with weights_only=True; re-save it as a plain state dict or safetensors"
        ) from exc
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise MarbleError(f"{what}: cannot read checkpoint {path}: {exc}; re-download it") from exc
    if not isinstance(loaded, dict):
        raise MarbleError(
            f"{what}: {path} holds a {type(loaded).__name__}, not a state dict; pass the "
            "checkpoint file the reward documents (see docs/rewards.md)"
        )
    return loaded


def state_dict_from(checkpoint: dict[str, Any], path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensor state dict in ``checkpoint`` (``checkpoint["state_dict"]`` when wrapped).

    Strips a ``module.`` prefix left by DistributedDataParallel.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not state:
        raise MarbleError(f"{what}: {path} has no state dict; pass the checkpoint file the reward documents")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise MarbleError(f"{what}: {path} contains no tensors; pass the checkpoint file the reward documents")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return tensors
