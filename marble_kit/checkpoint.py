"""Checkpoints: written atomically, verified on load, enough to resume bit-exactly.

Layout of one checkpoint (a directory, renamed into place only when complete)::

    checkpoints/step-000040/
        meta.json                    policy, rewards, balancer, step, the run's config, and the
                                     size + sha256 of every other file (truncation / corruption)
        adapter/pytorch_lora_weights.safetensors   (diffusers `load_lora_weights` accepts it)
        ema_adapter/pytorch_lora_weights.safetensors   the weight EMA's, with ema_decay > 0
        policy.safetensors           trainable + old-policy LoRA tensors
        state.pt                     optimizer, balancer, RNG and prompt-sampler state (and
                                     the weight EMA, the held-out evaluation's record)
                                     (plain tensors/containers; loaded with weights_only=True)

``checkpoints/best/`` (``eval_every``) is a checkpoint of the same layout, written the same
way, at the step whose held-out composite was the best so far; ``keep_checkpoints`` never
prunes it and ``--resume`` never starts from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from marble_kit.errors import MarbleError

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"
NAME_PATTERN = re.compile(r"step-(\d{6,})")
FORMAT_VERSION = 2
META_FILE = "meta.json"
POLICY_FILE = "policy.safetensors"
STATE_FILE = "state.pt"
ADAPTER_DIR = "adapter"
EMA_ADAPTER_DIR = "ema_adapter"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
BEST = "best"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``step-NNNNNN`` directory name (None for any other name)."""
    match = NAME_PATTERN.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written `.tmp` / `.old` ones are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / META_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file in ``directory`` except meta.json."""
    return {file.relative_to(directory).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
            for file in sorted(directory.rglob("*")) if file.is_file() and file.name != META_FILE}


def save_checkpoint(run_dir: str | Path, step: int, trainer_state: dict[str, Any], policy: Any,
                    meta: dict[str, Any], keep: int = 0, name: str | None = None,
                    ema_weights: Callable[[], ContextManager[Any]] | None = None) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically; keep the last ``keep`` (0 = all).

    Everything is written into ``step-N.tmp`` first, fsynced, then renamed into place: a crash
    or Ctrl-C at any moment leaves either the previous complete checkpoint or the new one.
    ``name`` (e.g. ``best``) writes it under that name instead, outside the pruned step-N
    series; ``ema_weights`` (a context that swaps the weight EMA in) adds ``ema_adapter/``.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or checkpoint_name(step))
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    state = dict(trainer_state)
    policy_tensors = {k: v.detach().contiguous().cpu() for k, v in state.pop("policy").items()}
    save_file(policy_tensors, str(tmp / POLICY_FILE))
    torch.save(state, tmp / STATE_FILE)
    policy.save_adapter(str(tmp / ADAPTER_DIR))
    if ema_weights is not None:
        with ema_weights():
            policy.save_adapter(str(tmp / EMA_ADAPTER_DIR))
    full_meta = {**meta, "step": step, "format": FORMAT_VERSION, "files": _manifest(tmp)}
    (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():  # re-saving the same step: swap, so a complete copy exists at every moment
        old = root / (final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0 and name is None:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _corrupt(checkpoint: Path, what: str) -> MarbleError:
    return MarbleError(f"checkpoint {checkpoint} is unusable: {what}; resume or evaluate an earlier "
                       "checkpoint (delete this one to make `--resume` use the previous one)")


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    checkpoint = Path(checkpoint)
    path = checkpoint / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise MarbleError(f"{checkpoint} is not a marble checkpoint (no {META_FILE}); pass a "
                          "checkpoints/step-NNNNNN directory or a run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(checkpoint, f"{META_FILE} is not valid JSON (truncated or overwritten)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "policy" not in meta:
        raise _corrupt(checkpoint, f"{META_FILE} lacks the step and policy entries")
    if meta.get("format") != FORMAT_VERSION:
        raise MarbleError(f"checkpoint {checkpoint} has format {meta.get('format')!r}, this marble-kit "
                          f"reads format {FORMAT_VERSION}; use the marble-kit version that wrote it")
    return meta


def verify_files(checkpoint: Path, meta: dict[str, Any]) -> None:
    """Every file listed in meta.json exists with its recorded size and sha256."""
    files = meta.get("files")
    if not isinstance(files, dict) or not {POLICY_FILE, STATE_FILE} <= set(files):
        raise _corrupt(checkpoint, f"{META_FILE} lists no file checksums")
    for name, record in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise _corrupt(checkpoint, f"{name} is missing")
        size = path.stat().st_size
        if size != record.get("size"):
            raise _corrupt(checkpoint, f"{name} has {size} bytes, {record.get('size')} were written "
                                       "(truncated or overwritten)")
        if _sha256(path) != record.get("sha256"):
            raise _corrupt(checkpoint, f"{name} does not match its sha256 (corrupted on disk)")


def _first_line(exc: BaseException, limit: int = 120) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def load_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, trainer_state) of a checkpoint directory, verified and loaded safely.

    A missing, truncated or corrupted file is a one-line MarbleError naming the file.
    """
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    verify_files(checkpoint, meta)
    adapter = checkpoint / ADAPTER_DIR / ADAPTER_FILE
    try:
        with safe_open(str(adapter), framework="pt") as handle:
            if not list(handle.keys()):
                raise _corrupt(checkpoint, f"{ADAPTER_DIR}/{ADAPTER_FILE} holds no tensors")
        policy_state = load_file(str(checkpoint / POLICY_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(checkpoint, f"a safetensors file does not load ({_first_line(exc)})") from None
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise _corrupt(checkpoint, f"{STATE_FILE} does not load ({_first_line(exc)})") from None
    if not isinstance(state, dict) or int(state.get("step", -1)) != meta["step"]:
        raise _corrupt(checkpoint, f"{STATE_FILE} does not hold the state of step {meta['step']}")
    state["policy"] = policy_state
    return meta, state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise MarbleError(f"{path} does not exist; pass a run directory or a checkpoint directory")
    if (path / META_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise MarbleError(f"{path} holds no checkpoint (expected {CHECKPOINT_DIR}/{PREFIX}NNNNNN/); "
                          "pass a run directory of `marble train` or a checkpoint directory")
    return found[-1]
