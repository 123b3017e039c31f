"""A training run as a product: run directory, metrics.jsonl, checkpoints, grids, plots, resume.

    runs/NAME/
        config.toml          the resolved configuration
        metrics.jsonl        one JSON object per step
        checkpoints/         step-NNNNNN/ (see marble_kit.checkpoint), keep-last-N
        samples/             step-NNNNNN.png sample grids (fixed prompts and noise)
        plots/               rewards.png, weights.png, cosines.png
"""

from __future__ import annotations

import json
import math
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from marble_kit.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.distributed import Distributed
from marble_kit.errors import MarbleError
from marble_kit.images import save_grid
from marble_kit.trainer import Trainer, build_components

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
# Config keys that may change between a run and its resume (they do not change the math).
RESUMABLE_KEYS = {"steps", "out", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                  "threads"}


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    interrupted: bool = False


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise MarbleError(f"{run_dir} is not a marble run directory (no {CONFIG_FILE}); "
                          "pass the --out directory of an earlier `marble train`")
    return TrainConfig.from_toml(path)


def run_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """What makes two runs the same run (everything but bookkeeping keys)."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS}


def prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    """Create or reopen the run directory; refuse to mix two different runs in one directory."""
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise MarbleError(f"--out {run_dir} is a file; choose a directory")
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        previous = TrainConfig.from_toml(config_path)
        if not resume:
            if run_fingerprint(previous) != run_fingerprint(config):
                raise MarbleError(f"{run_dir} already holds a different run; choose another --out "
                                  "or pass --resume to continue that run")
            if list_checkpoints(run_dir) or (run_dir / METRICS_FILE).exists():
                raise MarbleError(f"{run_dir} already holds this run's results; pass --resume "
                                  f"{run_dir} to continue it or choose another --out")
        elif run_fingerprint(previous) != run_fingerprint(config):
            changed = sorted(k for k, v in run_fingerprint(config).items() if run_fingerprint(previous).get(k) != v)
            raise MarbleError(f"--resume {run_dir}: the run was made with different {', '.join(changed)}; "
                              "resume with the run's own config (only steps and output cadence may change)")
    elif resume:
        raise MarbleError(f"--resume {run_dir}: no {CONFIG_FILE} there; pass the directory of an earlier run")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise MarbleError(f"{run_dir} is not empty and holds no marble run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".toml.tmp")
    tmp.write_text(config.to_toml())
    tmp.replace(config_path)
    return run_dir


def checkpoint_meta(config: TrainConfig) -> dict[str, Any]:
    return {"policy": config.policy, "policy_options": config.policy_options,
            "rewards": list(config.rewards), "balancer": config.balancer}


def check_compatible(meta: dict[str, Any], config: TrainConfig, where: str) -> None:
    """A checkpoint must come from the same policy and reward set as the run resuming it."""
    if meta.get("policy") != config.policy:
        raise MarbleError(f"{where} was trained with policy {meta.get('policy')!r}, not {config.policy!r}; "
                          "pass --policy to match or use another checkpoint")
    if list(meta.get("rewards", [])) != list(config.rewards):
        raise MarbleError(f"{where} was trained with rewards {','.join(meta.get('rewards', []))}, not "
                          f"{','.join(config.rewards)}; use the same --rewards (same order)")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is stale too
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def _sigint_as_flag() -> Iterator[dict[str, bool]]:
    """Ctrl-C finishes the current step, then the loop checkpoints and stops."""
    state = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if state["stop"]:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        state["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield state
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def sample_prompts(trainer: Trainer, count: int = 8) -> list[str]:
    """Fixed prompts for the sample grids: the first prompts of each prompt set, round-robin."""
    sets = trainer.components.prompt_sets
    prompts: list[str] = []
    index = 0
    while len(prompts) < count and any(index < len(s.prompts) for s in sets):
        prompts.extend(s.prompts[index] for s in sets if index < len(s.prompts))
        index += 1
    return prompts[:count]


def save_samples(trainer: Trainer, run_dir: Path, step: int) -> Path:
    prompts = sample_prompts(trainer)
    generator = torch.Generator().manual_seed(trainer.config.seed + 424242)
    with torch.no_grad():
        rollout = trainer.policy.sample(prompts, generator=generator, steps=trainer.config.sample_steps,
                                        use_old=False)
    path = run_dir / "samples" / f"step-{step:06d}.png"
    save_grid(rollout.images, path, captions=prompts)
    return path


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          dist: Distributed | None = None, console: Any = None) -> RunResult:
    """Train ``config`` (or resume its run directory) and return the metric history."""
    from marble_kit.plots import plot_run
    from marble_kit.progress import TrainProgress

    dist = dist or Distributed()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.out)
    if dist.is_main:
        run_dir = prepare_run_dir(config, resume)
    dist.barrier()
    components = build_components(config)
    trainer = Trainer(config, components, dist=dist)
    metrics_path = run_dir / METRICS_FILE
    if resume:
        found = list_checkpoints(run_dir)
        if found:
            meta, state = load_checkpoint(found[-1])
            check_compatible(meta, config, str(found[-1]))
            trainer.load_state_dict(state)
        if dist.is_main:
            _truncate_metrics(metrics_path, trainer.step_count)
    meta = checkpoint_meta(config)

    def checkpoint() -> None:
        if dist.is_main:
            save_checkpoint(run_dir, trainer.step_count, trainer.state_dict(), trainer.policy, meta,
                            keep=config.keep_checkpoints)

    history: list[dict[str, Any]] = []
    interrupted = False
    bar = TrainProgress(config, enabled=progress and dist.is_main, console=console,
                        start=trainer.step_count)
    with _sigint_as_flag() as sigint, bar:
        if dist.is_main and config.sample_every and trainer.step_count == 0:
            save_samples(trainer, run_dir, 0)
        while trainer.step_count < config.steps:
            metrics = trainer.step()
            history.append(metrics)
            step = trainer.step_count
            if dist.is_main:
                if step % config.log_every == 0 or step == config.steps:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps({k: _json_safe(v) for k, v in metrics.items()}) + "\n")
                if config.sample_every and step % config.sample_every == 0:
                    save_samples(trainer, run_dir, step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint()
            bar.update(metrics)
            if sigint["stop"]:
                interrupted = True
                break
    checkpoint()
    if dist.is_main and metrics_path.exists():
        plot_run(run_dir)
    return RunResult(run_dir, history, interrupted)
