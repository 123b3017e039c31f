"""Checkpoints: written atomically, loaded safely, enough to resume bit-exactly.

Layout of one checkpoint (a directory, renamed into place only when complete)::

    checkpoints/step-000040/
        meta.json                    policy, rewards, balancer, step, config fingerprint
        adapter/pytorch_lora_weights.safetensors   (diffusers `load_lora_weights` accepts it)
        policy.safetensors           trainable + old-policy LoRA tensors
        state.pt                     optimizer, balancer, RNG and prompt-sampler state
                                     (plain tensors/containers; loaded with weights_only=True)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from marble_kit.errors import MarbleError

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written `.tmp` ones are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and not p.name.endswith(".tmp") and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, trainer_state: dict[str, Any], policy: Any,
                    meta: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically; keep the last ``keep`` (0 = all)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    state = dict(trainer_state)
    policy_tensors = {k: v.detach().contiguous().cpu() for k, v in state.pop("policy").items()}
    save_file(policy_tensors, str(tmp / "policy.safetensors"))
    torch.save(state, tmp / "state.pt")
    policy.save_adapter(str(tmp / "adapter"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "format": FORMAT_VERSION}, indent=2))
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        old = root / (final.name + ".old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MarbleError(f"{checkpoint} is not a marble checkpoint (no meta.json); pass a "
                          f"checkpoints/step-NNNNNN directory or a run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MarbleError(f"checkpoint {checkpoint} is corrupt (meta.json: {exc}); "
                          "use an earlier checkpoint") from None


def load_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, trainer_state) of a checkpoint directory, loaded safely; corrupt → MarbleError."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    try:
        policy_state = load_file(str(checkpoint / "policy.safetensors"))
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MarbleError(f"checkpoint {checkpoint} is incomplete ({Path(exc.filename).name} is "
                          "missing); use an earlier checkpoint") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MarbleError(f"checkpoint {checkpoint} is corrupt or truncated ({first_line}); "
                          "use an earlier checkpoint") from None
    state["policy"] = policy_state
    return meta, state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise MarbleError(f"{path} does not exist; pass a run directory or a checkpoint directory")
    if (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise MarbleError(f"{path} holds no checkpoint (expected {CHECKPOINT_DIR}/{PREFIX}NNNNNN/); "
                          "train with --checkpoint-every or pass a checkpoint directory")
    return found[-1]
