"""`marble bench memory`: peak memory of a training step, single reward vs the K = 5 variants.

Each variant runs in a fresh Python process (so that one variant's freed memory, which the C
allocator may keep, never counts for another): it builds its trainer, then takes ``steps``
training steps, and the probe records

* on a GPU: the peak CUDA memory allocated over the steps (``torch.cuda.max_memory_allocated``,
  reset after the build) — the figure that decides whether a batch fits;
* on the CPU, the same quantity: the peak of the bytes held by tensors over the steps, minus
  what they held right after the build, from ``torch.profiler``'s allocation events (every
  allocation and free of the CPU allocator, in order; deterministic on one thread, so two runs
  give the same figure). The targets are checked on it. Beside it, from a second fresh process
  without the profiler, the growth of the process's peak RSS (VmHWM, reset after the build,
  minus the RSS right after it): what the process really asked of the machine, allocator
  caching and fragmentation included — it moves by ±0.15× between runs, so it is reported, not
  checked.

and, separately, the peak of the **gradient phase** alone (per-reward gradients, Gram, balancer,
fused gradient, optimizer step; the trainer's ``gradient_step`` clock marks): on a GPU the peak
allocated between the marks (``max_memory_allocated`` reset at the start mark, read at the end),
on the CPU the peak of the tensor bytes between the marks minus what tensors held at the start
mark (and the RSS figure: the peak RSS between them minus the RSS at the start mark; memory the
allocator kept from the rollout can hide part of it). The whole step's peak is the largest of
the peaks before, inside and after the phase.

The default is the CPU proxy of the `affine` memory issue: tiny-sd3 with gradient
checkpointing, P 8 × G 8 × 4 timesteps (256 training rows), K = 5.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from marble_kit.bench.common import (
    GRADIENT_STEP_RANGE,
    PROC_STATUS,
    GradientStepRange,
    machine_description,
    policy_fingerprint,
    reset_peak_memory,
)
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


def tensor_peaks(allocations: list[tuple[int, int]], start: int, phases: list[tuple[int, int]]
                 ) -> tuple[float, float]:
    """(whole, gradient phase) peaks in bytes from allocation events (time, ±bytes) in any order:
    the whole peak is the highest total of the bytes held after ``start`` minus the total at
    ``start``; a phase's is the highest total inside [begin, end] minus the total at its begin
    (the largest over ``phases``). Neither is below zero."""
    events = sorted(allocations)
    times = [t for t, _ in events]
    totals = list(itertools.accumulate(n for _, n in events))

    def held_before(t: int) -> int:
        i = bisect.bisect_left(times, t)
        return totals[i - 1] if i else 0

    def peak(begin: int, end: int | None) -> int:
        base = held_before(begin)
        inside = totals[bisect.bisect_left(times, begin):
                        len(times) if end is None else bisect.bisect_right(times, end)]
        return max([0, *(total - base for total in inside)])

    gradient = max([0, *(peak(begin, end) for begin, end in phases)])
    return float(peak(start, None)), float(gradient)


def profiled_tensor_peaks(build: Callable[[], Any], run: Callable[[Any], None]) -> tuple[float, float, Any]:
    """(whole, gradient phase) tensor-memory peaks in MiB of ``run(build())`` on the CPU, growth
    over what tensors held when ``build`` returned; the profiler records the build too, so that
    the frees of what it allocated are seen. ``run`` gets what ``build`` returned and must call
    its phase hook (``built.phase_hook``, set here) at the gradient phase's marks;
    the third value is what ``build`` returned."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        with torch.profiler.record_function("marble::build"):
            built = build()
        built.phase_hook = GradientStepRange()
        run(built)
    events = profiler.profiler.kineto_results.events()
    cpu = torch.autograd.DeviceType.CPU
    allocations = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu]
    start = max(e.end_ns() for e in events if e.name() == "marble::build")
    phases = [(e.start_ns(), e.end_ns()) for e in events if e.name() == GRADIENT_STEP_RANGE]
    whole, gradient = tensor_peaks(allocations, start, phases)
    return whole / 2**20, gradient / 2**20, built


def probe(config: TrainConfig, threads: int, figure: str = "rss") -> dict[str, Any]:
    """In this process: build the trainer, train ``config.steps`` steps, return the peaks —
    CUDA's on a GPU, else the process's RSS (``figure`` "rss") or the tensors' bytes ("tensors")."""
    from marble_kit.trainer import Trainer, build_components

    def train(trainer: Trainer) -> None:
        for _ in range(config.steps):
            trainer.step()

    torch.set_num_threads(threads)
    if figure == "tensors":
        whole, gradient, trainer = profiled_tensor_peaks(lambda: Trainer(config, build_components(config)), train)
        return {"device": str(trainer.policy.device), "peak_mb": whole, "gradient_peak_mb": gradient,
                "kind": "peak tensor memory growth",
                "gradient_kind": "peak tensor memory growth within the gradient phase",
                "fingerprint": policy_fingerprint(trainer.policy)}
    trainer = Trainer(config, build_components(config))
    device = trainer.policy.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = _rss_mb("VmRSS")
    peaks = trainer.phase_hook = PhasePeaks(device)
    reset_peak_memory(device)
    train(trainer)
    fingerprint = policy_fingerprint(trainer.policy)
    if device.type == "cuda":
        return {"device": str(device), "peak_mb": peaks.whole(), "gradient_peak_mb": peaks.gradient,
                "kind": "peak CUDA allocated", "gradient_kind": "peak CUDA allocated in the gradient phase",
                "fingerprint": fingerprint}
    return {"device": str(device), "peak_mb": peaks.whole() - start, "gradient_peak_mb": peaks.gradient,
            "kind": "peak RSS growth", "gradient_kind": "peak RSS growth within the gradient phase",
            "fingerprint": fingerprint}


def _run_probe(settings: MemorySettings, variant: MemoryVariant, figure: str) -> dict[str, Any]:
    payload = json.dumps({"config": settings.config(variant).to_dict(), "threads": settings.threads,
                          "figure": figure})
    result = subprocess.run([sys.executable, "-m", "marble_kit.bench.memory"], input=payload,
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise MarbleError(f"memory bench: variant {variant.name} failed in its process: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_variant(settings: MemorySettings, variant: MemoryVariant) -> dict[str, Any]:
    """One variant in a fresh interpreter; on the CPU a second one measures the tensors' peak
    (the figure then reported, the RSS figures beside it as ``rss_*``)."""
    measured = _run_probe(settings, variant, "rss")
    if measured["device"] != "cpu":
        return measured
    tensors = _run_probe(settings, variant, "tensors")
    return {**tensors, "rss_kind": measured["kind"], "rss_peak_mb": measured["peak_mb"],
            "rss_gradient_peak_mb": measured["gradient_peak_mb"]}


def _ratio(value: float, single: float) -> float:
    return value / single if single > 0 else float("nan")


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
                     "gradient_peak_mb": measured.get("gradient_peak_mb", float("nan")),
                     **{key: value for key, value in measured.items() if key.startswith("rss_")}})
    for prefix in ("", "rss_"):
        if f"{prefix}peak_mb" not in rows[0]:
            continue
        single, single_gradient = rows[0][f"{prefix}peak_mb"], rows[0][f"{prefix}gradient_peak_mb"]
        for row in rows:
            row[f"{prefix}vs_single"] = _ratio(row[f"{prefix}peak_mb"], single)
            row[f"{prefix}gradient_vs_single"] = _ratio(row[f"{prefix}gradient_peak_mb"], single_gradient)
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
    """Child process: read {config, threads, figure} on stdin, print the probe's JSON."""
    request = json.loads(sys.stdin.read())
    config = TrainConfig.from_dict(request["config"])
    print(json.dumps(probe(config, request["threads"], request.get("figure", "rss"))))


if __name__ == "__main__":
    main()
