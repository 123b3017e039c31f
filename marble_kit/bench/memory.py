"""`marble bench memory`: peak memory of a training step, single reward vs the K = 5 variants.

Each variant runs in a fresh Python process (so that one variant's freed memory, which the C
allocator may keep, never counts for another): it builds its trainer, then takes ``steps``
training steps, and the probe records

* on a GPU: the peak CUDA memory allocated over the steps (``torch.cuda.max_memory_allocated``,
  reset after the build) — the figure that decides whether a batch fits;
* on the CPU: the growth of the process's peak RSS over the steps (VmHWM, reset after the build,
  minus the RSS right after the build) — what training adds on top of the loaded model. Per-step
  figures would mislead on the CPU: memory freed by one step stays in the process for the next.

and, separately, the peak of the **gradient phase** alone (per-reward gradients, Gram, balancer,
fused gradient, optimizer step; the trainer's ``gradient_step`` clock marks): on a GPU the peak
allocated between the marks (``max_memory_allocated`` reset at the start mark, read at the end),
on the CPU the peak RSS between them minus the RSS at the start mark — what the phase adds to
what is resident when it starts (memory the allocator kept from the rollout can hide part of it).
The whole step's peak is the largest of the peaks before, inside and after the phase.

The default is the CPU proxy of the `affine` memory issue: tiny-sd3 with gradient
checkpointing, P 8 × G 8 × 4 timesteps (256 training rows), K = 5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from marble_kit.bench.common import PROC_STATUS, machine_description, policy_fingerprint, reset_peak_memory
from marble_kit.bench.speed import K5_REWARDS, SPEED_PROMPTS
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError


@dataclass(frozen=True)
class MemoryVariant:
    name: str
    label: str
    balancer: str
    gram: str
    gram_rows: float = 1.0
    single: bool = False


MEMORY_VARIANTS = (
    MemoryVariant("single", "(a) single reward", "weighted-sum", "none", single=True),
    MemoryVariant("marble-affine", "(c) MARBLE affine, K=5", "marble", "affine"),
    MemoryVariant("marble-rows", "(e) MARBLE affine, rows 0.25, K=5", "marble", "affine", gram_rows=0.25),
    MemoryVariant("marble-exact", "(d) MARBLE exact, K=5", "marble", "exact"),
)


@dataclass
class MemorySettings:
    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=lambda: {"gradient_checkpointing": True})
    steps: int = 3
    prompts_per_step: int = 8
    images_per_prompt: int = 8
    timesteps_per_image: int = 4
    sample_steps: int = 8
    micro_batch: int = 0
    kl: float = TrainConfig.kl
    rewards: list = field(default_factory=lambda: list(K5_REWARDS))
    prompts: list = field(default_factory=lambda: list(SPEED_PROMPTS))
    seed: int = 0
    threads: int = 1
    variants: list = field(default_factory=lambda: [v.name for v in MEMORY_VARIANTS])

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MarbleError(f"memory bench: steps must be ≥ 1 (got {self.steps})")
        known = [v.name for v in MEMORY_VARIANTS]
        unknown = [name for name in self.variants if name not in known]
        if unknown or "single" not in self.variants or "marble-affine" not in self.variants:
            raise MarbleError(f"memory bench: variants must include single and marble-affine and come from "
                              f"{', '.join(known)}; got {', '.join(self.variants)}")

    def config(self, variant: MemoryVariant) -> TrainConfig:
        return TrainConfig(
            policy=self.policy, policy_options=dict(self.policy_options),
            rewards=[self.rewards[0]] if variant.single else list(self.rewards),
            balancer=variant.balancer, gram=variant.gram, gram_rows=variant.gram_rows,
            prompts=list(self.prompts), seed=self.seed, steps=self.steps,
            prompts_per_step=self.prompts_per_step, images_per_prompt=self.images_per_prompt,
            timesteps_per_image=self.timesteps_per_image, sample_steps=self.sample_steps,
            micro_batch=self.micro_batch, kl=self.kl, out="-", checkpoint_every=0, sample_every=0)


def _rss_mb(key: str) -> float:
    match = re.search(rf"{key}:\s+(\d+) kB", PROC_STATUS.read_text()) if PROC_STATUS.is_file() else None
    return int(match.group(1)) / 1024 if match else float("nan")


class PhasePeaks:
    """The trainer's ``phase_hook`` for the memory probe: the peak inside the gradient phase and
    the peak outside it (MiB; see the module docstring for what is measured on which device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.outside = 0.0   # highest peak reading before/after the gradient phases (absolute)
        self.gradient = 0.0  # largest gradient-phase peak (GPU: absolute; CPU: growth over its start)
        self._start_rss = 0.0

    def _peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _rss_mb("VmHWM")

    def __call__(self, boundary: str) -> None:
        if boundary == "gradient_step:start":
            self.outside = max(self.outside, self._peak())
            self._start_rss = _rss_mb("VmRSS") if self.device.type != "cuda" else 0.0
        elif boundary == "gradient_step:end":
            peak = self._peak()
            self.gradient = max(self.gradient, peak - self._start_rss)
            self.outside = max(self.outside, peak)  # (the whole step's peak includes the phase)
        else:
            return
        reset_peak_memory(self.device)

    def whole(self) -> float:
        return max(self.outside, self._peak())


def probe(config: TrainConfig, threads: int) -> dict[str, Any]:
    """In this process: build the trainer, train ``config.steps`` steps, return the peaks."""
    from marble_kit.trainer import Trainer, build_components

    torch.set_num_threads(threads)
    trainer = Trainer(config, build_components(config))
    device = trainer.policy.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = _rss_mb("VmRSS")
    peaks = trainer.phase_hook = PhasePeaks(device)
    reset_peak_memory(device)
    for _ in range(config.steps):
        trainer.step()
    fingerprint = policy_fingerprint(trainer.policy)
    if device.type == "cuda":
        return {"device": str(device), "peak_mb": peaks.whole(), "gradient_peak_mb": peaks.gradient,
                "kind": "peak CUDA allocated", "gradient_kind": "peak CUDA allocated in the gradient phase",
                "fingerprint": fingerprint}
    return {"device": str(device), "peak_mb": peaks.whole() - start, "gradient_peak_mb": peaks.gradient,
            "kind": "peak RSS growth", "gradient_kind": "peak RSS growth within the gradient phase",
            "fingerprint": fingerprint}


def run_variant(settings: MemorySettings, variant: MemoryVariant) -> dict[str, Any]:
    """One variant in a fresh interpreter."""
    payload = json.dumps({"config": settings.config(variant).to_dict(), "threads": settings.threads})
    result = subprocess.run([sys.executable, "-m", "marble_kit.bench.memory"], input=payload,
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise MarbleError(f"memory bench: variant {variant.name} failed in its process: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_memory_benchmark(settings: MemorySettings | None = None,
                         on_variant: Callable[[str], None] | None = None) -> dict[str, Any]:
    settings = settings or MemorySettings()
    rows, device, fingerprint = [], "cpu", None
    for variant in (v for v in MEMORY_VARIANTS if v.name in settings.variants):
        if on_variant is not None:
            on_variant(variant.name)
        measured = run_variant(settings, variant)
        device, fingerprint = measured["device"], fingerprint or measured.get("fingerprint")
        rows.append({"variant": variant.name, "label": variant.label, "kind": measured["kind"],
                     "peak_mb": measured["peak_mb"], "gradient_kind": measured.get("gradient_kind"),
                     "gradient_peak_mb": measured.get("gradient_peak_mb", float("nan"))})
    single, single_gradient = rows[0]["peak_mb"], rows[0]["gradient_peak_mb"]
    for row in rows:
        row["vs_single"] = row["peak_mb"] / single if single > 0 else float("nan")
        row["gradient_vs_single"] = (row["gradient_peak_mb"] / single_gradient if single_gradient > 0
                                     else float("nan"))
    limit = 1.2 if device.startswith("cuda") else 1.25
    affine = next(r for r in rows if r["variant"] == "marble-affine")
    targets = [{"target": f"(c) affine peak memory ≤ {limit}× single", "value": affine["vs_single"],
                "threshold": limit, "met": bool(affine["vs_single"] <= limit)},
               {"target": f"(c) affine gradient-phase peak ≤ {limit}× single's", "value": affine["gradient_vs_single"],
                "threshold": limit, "met": bool(affine["gradient_vs_single"] <= limit)}]
    machine = {**machine_description(device), "torch_threads": settings.threads}  # the variants' processes
    return {"benchmark": "memory", "settings": asdict(settings), "machine": machine,
            "policy_fingerprint": fingerprint, "rows": rows, "targets": targets}


def main() -> None:
    """Child process: read {config, threads} on stdin, print the probe's JSON."""
    request = json.loads(sys.stdin.read())
    config = TrainConfig.from_dict(request["config"])
    print(json.dumps(probe(config, request["threads"])))


if __name__ == "__main__":
    main()
