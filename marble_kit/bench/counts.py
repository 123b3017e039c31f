"""`marble bench counts`: what one training step launches, per phase and per pass.

One step of each variant of `marble bench speed` (after one unmeasured step) runs under
``torch.profiler`` and every operator is attributed to the innermost phase it ran in:

* the step's phases: ``rollout``, ``rewards``, ``fold`` (old and reference velocities of the
  training rows), ``gradient step`` (between the trainer's ``gradient_step`` clock marks), inside
  it ``balance`` and ``optimizer``, and ``other`` (advantages, the old-policy EMA, diagnostics);
* the passes inside the gradient step, by the trainer's and the capture's profiler ranges:
  ``forward`` (v_θ of training rows), ``backward`` (one ordinary backward), ``capture backward``
  (one pass of the `affine` Gram) and ``exact backward`` (one per reward loss).

Counted per phase (and so per pass, dividing by the number of ranges):

* ``ops`` — operator calls made by Python or by autograd (top-level aten operators): what the
  host dispatches one by one;
* ``launches`` — on a GPU the kernels launched (CUDA runtime launch calls: kernels, memsets,
  copies); on the CPU the top-level operators that compute something (views, allocations and
  metadata ops left out), the CPU stand-in for kernel launches;
* ``casts`` — dtype/device conversions (``aten::to``/``_to_copy`` that copy);
* ``syncs`` — on a GPU, host–device synchronizations (CUDA runtime synchronize calls, which
  every ``.item()``, ``.cpu()``, ``nonzero`` and boolean-mask index makes); on the CPU, the
  operators that would make one on a GPU if their tensor lived there (``item``/``float(t)``,
  ``nonzero``, ``bool(t)``); the optimizer's are reads of its per-parameter step counters, which
  torch's AdamW keeps on the CPU (no GPU synchronization);
* ``rows`` — training rows that reached the transformer's blocks (a checkpointed block's replay
  in the backward counts again);
* ``capture calls`` — Python calls of :class:`marble_kit.gram.LoraCapture`'s factor hooks
  (forward and backward).

The profiler slows a step down several times (an SD3.5-Medium step to about a minute on an
H200): these are counts, not timings.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from marble_kit.bench.common import GRADIENT_STEP_RANGE, GradientStepRange, machine_description, policy_fingerprint
from marble_kit.bench.speed import VARIANTS, SpeedSettings, build_trainers
from marble_kit.errors import MarbleError
from marble_kit.gram import LoraCapture

PHASES = ("rollout", "rewards", "fold", "gradient step", "forward", "backward", "capture backward",
          "exact backward", "balance", "optimizer", "other")
PASS_PHASES = ("forward", "backward", "capture backward", "exact backward")
_RANGES = {"marble::rollout": "rollout", "marble::rewards": "rewards", "marble::fold": "fold",
           GRADIENT_STEP_RANGE: "gradient step", "marble::forward": "forward",
           "marble::backward": "backward", "marble::capture_backward": "capture backward",
           "marble::exact_backward": "exact backward", "marble::balance": "balance",
           "marble::optimizer": "optimizer"}
# Operators that compute nothing on a device (views, allocation, metadata): not launches.
METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "expand", "expand_as", "slice", "select", "narrow", "split", "split_with_sizes",
    "chunk", "unbind", "as_strided", "alias", "detach", "view_as", "unflatten", "flatten",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
    "lift_fresh", "result_type", "_has_compatible_shallow_copy_type", "numpy_T", "set_",
    "is_nonzero", "_local_scalar_dense", "item", "contiguous", "squeeze_", "unsqueeze_",
    "detach_", "resolve_conj", "resolve_neg", "size", "stride", "dim", "is_same_size"))
# Operators that are views unless they have to copy: a launch only when they do.
MAYBE_COPIES = frozenset({"aten::to", "aten::type_as", "aten::reshape", "aten::contiguous", "aten::flatten",
                          "aten::repeat_interleave"})
COPIES = frozenset({"aten::_to_copy", "aten::copy_", "aten::clone"})
VALUE_READS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero"})
CASTS = frozenset({"aten::_to_copy"})
CUDA_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync",
                 "cudaMemsetAsync", "cudaLaunchCooperativeKernel")
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _traced(function: Callable, name: str) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return function(*args, **kwargs)
    return wrapper


_MISSING = object()
ROWS_MARK = "marble::rows="


class PhaseLabels:
    """Profiler ranges around a trainer's phases, for the duration of a ``with`` block: the
    rollout, rewards, fold, balance and optimizer calls of this trainer (instance attributes,
    removed afterwards) and its gradient step (its ``phase_hook``). Also counts the rows that
    reach the transformer's blocks, per phase."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self._gradient = GradientStepRange()
        self._handles: list = []
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> PhaseLabels:
        trainer = self.trainer
        for owner, attribute, name in ((trainer.policy, "sample", "marble::rollout"),
                                       (trainer, "_score", "marble::rewards"),
                                       (trainer, "_fold_timesteps", "marble::fold"),
                                       (trainer, "_balance", "marble::balance"),
                                       (trainer.optimizer, "step", "marble::optimizer")):
            self._patched.append((owner, attribute, owner.__dict__.get(attribute, _MISSING)))
            setattr(owner, attribute, _traced(getattr(owner, attribute), name))
        trainer.phase_hook = self._gradient
        blocks = _blocks(trainer.policy.trainable_module())
        self._handles = [block.register_forward_pre_hook(self._on_block, with_kwargs=True) for block in blocks]
        return self

    def __exit__(self, *exc) -> None:
        for owner, attribute, before in reversed(self._patched):
            if before is _MISSING:
                owner.__dict__.pop(attribute, None)
            else:
                setattr(owner, attribute, before)
        self._patched = []
        for handle in self._handles:
            handle.remove()
        self.trainer.phase_hook = None
        self._gradient.close()

    def _on_block(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor):  # an instant range the profiler places in its phase
            with torch.profiler.record_function(f"{ROWS_MARK}{hidden.shape[0]}"):
                pass


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The first block of the transformer (rows through it = rows through the model), or the
    module itself when it has no block list."""
    for name in ("transformer_blocks", "blocks", "layers"):
        blocks = getattr(module, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return [blocks[0]]
    return [module]


def attribute(events: Sequence[Any], on_gpu: bool) -> dict[str, dict[str, float]]:
    """Per phase: number of ranges and the counts of the operators inside them (innermost)."""
    ranges = sorted(((e.time_range.start, e.time_range.end, _RANGES[e.name], getattr(e, "thread", 0))
                     for e in events if e.name in _RANGES), key=lambda r: r[0])
    counts: dict[str, Counter] = defaultdict(Counter)
    for range_ in ranges:
        counts[range_[2]]["calls"] += 1

    def phase_of(event) -> str:
        """The innermost range around the event in its own thread (a reward scored in the
        background overlaps the rollout), else in any thread (a GPU's backward runs in
        autograd's device thread while the range waits in the caller's)."""
        start, end, thread = event.time_range.start, event.time_range.end, getattr(event, "thread", 0)
        for same_thread in (True, False):
            best, width = None, None
            for r_start, r_end, phase, r_thread in ranges:
                if r_start > start:
                    break
                inside = end <= r_end and (not same_thread or r_thread == thread)
                if inside and (width is None or r_end - r_start < width):
                    best, width = phase, r_end - r_start
            if best is not None:
                return best
        return "other"

    for event in events:
        name = event.name
        if name.startswith(ROWS_MARK):
            counts[phase_of(event)]["rows"] += int(name[len(ROWS_MARK):])
        elif name.startswith("aten::"):
            parent = event.cpu_parent
            if parent is not None and parent.name.startswith("aten::"):
                continue  # called by another operator, not by Python or autograd
            phase = counts[phase_of(event)]
            phase["ops"] += 1
            casts = _casts(event)
            phase["casts"] += casts
            if not on_gpu:  # one launch per computing operator, plus the casts autocast adds inside it
                if name in MAYBE_COPIES or name in CASTS:
                    phase["launches"] += bool(casts) or any(c.name in COPIES for c in event.cpu_children)
                else:
                    phase["launches"] += (name not in METADATA_OPS) + casts
                phase["syncs"] += name in VALUE_READS
        elif on_gpu and (name.startswith(CUDA_LAUNCHES) or name.startswith(CUDA_SYNCS)):
            phase = counts[phase_of(event)]
            phase["launches" if name.startswith(CUDA_LAUNCHES) else "syncs"] += 1
    return {phase: {k: v for k, v in c.items() if v} for phase, c in counts.items()}


def _casts(event: Any) -> int:
    """Dtype/device copies made by a top-level operator: its ``aten::_to_copy`` calls."""
    if event.name in CASTS:
        return 1
    return sum(_casts(child) for child in event.cpu_children if child.name.startswith("aten::"))


def count_step(trainer: Any) -> dict[str, Any]:
    """One profiled training step of ``trainer``: per-phase counts (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.policy.device
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    before = Counter(LoraCapture.calls)
    with PhaseLabels(trainer), profile(activities=activities) as prof:
        metrics = trainer.step()
        if on_gpu:
            torch.cuda.synchronize(device)
    hooks = Counter(LoraCapture.calls) - before
    phases = attribute(prof.events(), on_gpu)
    kernels = sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) \
        if on_gpu else None
    totals = Counter()
    for values in phases.values():
        totals.update({k: v for k, v in values.items() if k != "calls"})
    return {"phases": phases, "totals": dict(totals), "device_kernels": kernels,
            "capture_calls": {"forward": hooks["forward"], "backward": hooks["backward"]},
            "backward_passes": float(metrics["backward_passes"]), "gram_mode": metrics["gram_mode"]}


def per_pass(phases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The counts of each pass phase divided by its number of passes."""
    out = {}
    for phase in PASS_PHASES:
        values = phases.get(phase)
        if values and values.get("calls"):
            out[phase] = {k: v / values["calls"] for k, v in values.items() if k != "calls"}
            out[phase]["passes"] = values["calls"]
    return out


def run_counts_benchmark(settings: SpeedSettings | None = None, variants: Sequence[str] | None = None,
                         policy: Any = None, on_variant: Callable[[str], None] | None = None,
                         on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One unmeasured and one profiled step per variant (each variant's own trainer);
    ``on_report`` gets the report so far after each variant (e.g. to write it)."""
    settings = settings or SpeedSettings(rounds=1, warmup=0)
    known = [v.name for v in VARIANTS]
    chosen = list(variants) if variants else known
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise MarbleError(f"counts bench: unknown variant {unknown[0]!r}; choose from {', '.join(known)}")
    trainers = build_trainers(settings, policy, names=chosen)
    shared = next(iter(trainers.values())).policy
    report = {"benchmark": "counts", "settings": asdict(settings), "variants": chosen,
              "machine": machine_description(shared.device), "policy_fingerprint": policy_fingerprint(shared),
              "rows": []}
    for name in chosen:
        if on_variant is not None:
            on_variant(name)
        trainers[name].step()  # caches, allocator, OSQP set-up
        counted = count_step(trainers[name])
        report["rows"].append({"variant": name, **counted, "per_pass": per_pass(counted["phases"])})
        if on_report is not None:
            on_report(report)
    return report


# 2026-12-04, NVIDIA H200, main at db82c71 (docs/benchmarks.md): one single-reward step of
# `marble bench speed --policy sd3.5-arch` launched 73,410 CUDA kernels.
H200_SINGLE_STEP_KERNELS = 73_410


def check_count_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """On SD3.5 Medium's architecture on a GPU: kernels of one single-reward step halved."""
    rows = {row["variant"]: row for row in report["rows"]}
    single = rows.get("single")
    if single is None or single["device_kernels"] is None or report["settings"]["policy"] != "sd3.5-arch":
        return []
    value = single["device_kernels"] / H200_SINGLE_STEP_KERNELS
    return [{"target": f"single step kernels ≤ 0.5× the {H200_SINGLE_STEP_KERNELS:,} of 2026-12-04",
             "value": value, "interval": None, "threshold": 0.5, "met": bool(value <= 0.5), "decided": None}]
