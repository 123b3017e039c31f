"""Shared pieces of the training benchmarks (`marble bench speed / conflict / fidelity`).

Components built around an existing policy (so several trainers share one model), the machine
description recorded next to every figure, peak-memory probes, summary statistics and the JSON
writer. No benchmark logic here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.prompts import load_prompt_sets
from marble_kit.registry import build
from marble_kit.trainer import Components

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# ---------------------------------------------------------------- components
def components_for(config: TrainConfig, policy: Any) -> Components:
    """Rewards, balancer and prompt sets of ``config`` around an already built ``policy``.

    Benchmarks build the policy once and give every variant its own rewards and balancer, so
    all variants time or train the very same network (and a large one is loaded only once).
    """
    rewards = [build("reward", name, config.reward_options.get(name, {})) for name in config.rewards]
    reward_device = policy.device if config.reward_device == "policy" else torch.device(config.reward_device)
    for reward in rewards:
        reward.to(reward_device)
    balancer = build("balancer", config.balancer, config.balancer_options, len(config.rewards))
    return Components(policy, rewards, list(config.rewards), balancer, load_prompt_sets(config.prompts))


def build_policy(config: TrainConfig) -> Any:
    return build("policy", config.policy, {"seed": config.seed, **config.policy_options})


# ---------------------------------------------------------------- the machine
def machine_description(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a figure came from: CPU, threads, load, library versions and the GPU if any."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu_cores": os.cpu_count(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
    return match.group(1).strip() if match else None


def weights_fingerprint(module: torch.nn.Module | Sequence[torch.nn.Module],
                        max_parameters: int = 50_000_000) -> str | None:
    """Short hash of the base weights of a module (or of several, in order), LoRA excluded (which
    prior a figure came from, before or after training); None for big models."""
    modules = [module] if isinstance(module, torch.nn.Module) else list(module)
    tensors = [t for m in modules for name, t in m.state_dict().items() if "lora_" not in name]
    if sum(t.numel() for t in tensors) > max_parameters:
        return None
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def policy_fingerprint(policy, max_parameters: int = 50_000_000) -> str | None:
    """`weights_fingerprint` of everything a policy samples with: the trainable module and, for
    a diffusers-backed policy, every other model of its pipeline (VAE, text encoders) in name
    order — so a prior whose decoder alone changed gets a new fingerprint."""
    modules = [policy.trainable_module()]
    components = getattr(getattr(policy, "pipeline", None), "components", None) or {}
    modules += [m for _, m in sorted(components.items())
                if isinstance(m, torch.nn.Module) and all(m is not other for other in modules)]
    return weights_fingerprint(modules, max_parameters)


# ---------------------------------------------------------------- memory
GRADIENT_STEP_RANGE = "marble::gradient_step"


class GradientStepRange:
    """A trainer's ``phase_hook`` that puts a profiler range (:data:`GRADIENT_STEP_RANGE`) around
    every gradient phase, between the ``gradient_step`` clock marks; :meth:`close` ends one left
    open (a step that raised)."""

    def __init__(self) -> None:
        self._range: Any = None

    def __call__(self, boundary: str) -> None:
        if boundary == "gradient_step:start" and self._range is None:
            self._range = torch.profiler.record_function(GRADIENT_STEP_RANGE)
            self._range.__enter__()
        elif boundary == "gradient_step:end":
            self.close()

    def close(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator statistics, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif PROC_CLEAR_REFS.exists():
        try:
            PROC_CLEAR_REFS.write_text("5")  # "5" resets VmHWM (Linux ≥ 4.0)
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA allocated bytes, else peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if PROC_STATUS.is_file():
        match = re.search(r"VmHWM:\s+(\d+) kB", PROC_STATUS.read_text())
        if match:
            return int(match.group(1)) / 1024
    return float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (spread 0 for a single seed)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def fraction(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


# ---------------------------------------------------------------- output
def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """The report as JSON (NaN written as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=2))
    tmp.replace(path)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def new_figure(rows: int, cols: int, width: float = 6.4, height: float = 3.6):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=110, squeeze=False)


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_positive(**values: int) -> None:
    """One-line error for a count that must be ≥ 1 (``--steps 0``)."""
    for name, value in values.items():
        if int(value) < 1:
            flag = "--" + name.replace("_", "-")
            raise MarbleError(f"{flag} must be ≥ 1 (got {value}); pass a positive count")
