"""A training run as a product: run directory, metrics.jsonl, checkpoints, grids, plots, resume.

    runs/NAME/
        config.toml          the resolved configuration
        metrics.jsonl        one JSON object per step
        checkpoints/         step-NNNNNN/ (see marble_kit.checkpoint), keep-last-N
        samples/             step-NNNNNN.png sample grids (fixed prompts and noise)
        eval/                step-NNNNNN/eval.json + eval_grid.png (eval_every; marble eval)
        plots/               rewards.png, weights.png, cosines.png, update_cosines.png, eval.png

Bad input (config, prompts, run directory, checkpoint) is detected before anything is written,
so a failed start never changes what is already on disk.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import inspect
import json
import math
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marble_kit.checkpoint import BEST, list_checkpoints, load_checkpoint, save_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.distributed import Distributed, tensors_digest
from marble_kit.errors import MarbleError
from marble_kit.images import save_grid
from marble_kit.prompts import _split_tags
from marble_kit.reward_protocol import TRANSPORT_OPTIONS
from marble_kit.tracking import Tracker, check_trackers, open_tracker
from marble_kit.trainer import RewardFailure, Trainer, build_components

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".marble.lock"  # one writer per run directory (see RunDirectoryLock)
SAMPLES_DIR = "samples"
SAMPLE_SEED_OFFSET = 424242  # sample grids use their own noise, never the training generator
SAMPLE_COUNT = 8
# Config keys that may change between a run and its resume (they do not change the math).
RESUMABLE_KEYS = {"steps", "out", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                  "threads", "optimizer_sharding", "report_to", "reward_threads"}


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    interrupted: bool = False
    checkpoint: Path | None = None


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise MarbleError(f"{run_dir} is not a marble run directory (no {CONFIG_FILE}); "
                          "pass the --out directory of an earlier `marble train`")
    return TrainConfig.from_toml(path)


def run_fingerprint(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run (everything but bookkeeping keys, and how a remote
    reward is reached: its server may move between a run and its resume)."""
    data = config.to_dict() if isinstance(config, TrainConfig) else config
    fingerprint = {k: v for k, v in data.items() if k not in RESUMABLE_KEYS}
    options = fingerprint.get("reward_options")
    if isinstance(options, dict):
        fingerprint["reward_options"] = {
            name: {k: v for k, v in opts.items() if k not in TRANSPORT_OPTIONS}
            if str(name).startswith("remote:") and isinstance(opts, dict) else opts
            for name, opts in options.items()}
    return fingerprint


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def check_run_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse to mix two different runs in one directory (reads only, writes nothing)."""
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise MarbleError(f"--out {run_dir} is a file; choose a directory")
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        if resume:
            raise MarbleError(f"--resume {run_dir}: no {CONFIG_FILE} there; pass the directory of an earlier run")
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise MarbleError(f"{run_dir} is not empty and holds no marble run; choose another --out")
        return
    previous = TrainConfig.from_toml(config_path)
    changed = changed_keys(run_fingerprint(previous), run_fingerprint(config))
    if resume and changed:
        raise MarbleError(f"--resume {run_dir}: the run was made with different {', '.join(changed)}; "
                          "resume with the run's own config (only steps and output cadence may change)")
    if not resume and changed:
        raise MarbleError(f"{run_dir} already holds a different run (it differs in {', '.join(changed[:4])}); "
                          "choose another --out or pass --resume to continue that run")
    if not resume and (list_checkpoints(run_dir) or (run_dir / METRICS_FILE).exists()):
        raise MarbleError(f"{run_dir} already holds this run's results; pass --resume {run_dir} to "
                          "continue it or choose another --out")


def config_digest(config: TrainConfig) -> str:
    """A short hash of the run fingerprint (to check that every rank runs the same config)."""
    text = json.dumps(run_fingerprint(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def absolute_prompt_specs(specs: list[str]) -> list[str]:
    """User prompt files as absolute paths (tags kept), so a run resumes from any directory."""
    resolved = []
    for spec in specs:
        source, tags = _split_tags(str(spec))
        path = Path(source).expanduser()
        if path.is_file():
            spec = str(path.resolve()) + (":" + "+".join(tags) if tags else "")
        resolved.append(spec)
    return resolved


def write_config(config: TrainConfig) -> Path:
    """The resolved config, written atomically (the run directory is created here)."""
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config.to_toml())
    tmp.replace(path)
    return path


def checkpoint_meta(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records about its run; ``config`` makes it self-contained for eval."""
    return {"policy": config.policy, "policy_options": config.policy_options,
            "rewards": list(config.rewards), "balancer": config.balancer, "config": config.to_dict()}


def check_compatible(meta: dict[str, Any], config: TrainConfig, where: str, same_rewards: bool = True) -> None:
    """A checkpoint must come from the same policy (and reward set) as the run that loads it."""
    if meta.get("policy") != config.policy:
        raise MarbleError(f"{where} was trained with policy {meta.get('policy')!r}, not {config.policy!r}; "
                          "use a checkpoint of this run's policy")
    if meta.get("policy_options", {}) != config.policy_options:
        raise MarbleError(f"{where} was trained with policy options {meta.get('policy_options')}, not "
                          f"{config.policy_options}; use a checkpoint made with the same policy options")
    if same_rewards and list(meta.get("rewards", [])) != list(config.rewards):
        raise MarbleError(f"{where} was trained with rewards {','.join(meta.get('rewards', []))}, not "
                          f"{','.join(config.rewards)}; use a checkpoint of the same reward set (same order)")
    if same_rewards and meta.get("balancer") != config.balancer:
        raise MarbleError(f"{where} was trained with balancer {meta.get('balancer')!r}, not "
                          f"{config.balancer!r}; use a checkpoint of this run")
    saved = meta.get("config")
    if same_rewards and isinstance(saved, dict):
        changed = changed_keys(run_fingerprint(saved), run_fingerprint(config))
        if changed:
            raise MarbleError(f"{where} was trained with different {', '.join(changed[:4])}; "
                              "use a checkpoint of this run")


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps({k: _json_safe(v) for k, v in metrics.items()}) + "\n")


def merge_metrics(path: Path, step: int, metrics: dict[str, Any]) -> None:
    """Add ``metrics`` to the line of ``step`` (the last line: a resume truncated the later ones),
    or append them as that step's line when it has none; rewritten atomically."""
    lines = path.read_text().splitlines() if path.exists() else []
    last = json.loads(lines[-1]) if lines else {}
    if last.get("step") == step:
        lines[-1] = json.dumps({**last, **{k: _json_safe(v) for k, v in metrics.items()}})
    else:
        lines.append(json.dumps({"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)


# ------------------------------------------------------------------ RNG outside the trainer

def capture_global_rng() -> dict[str, Any]:
    """torch's global RNG states (the trainer's own generator is in its state_dict)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _sigint_as_flag() -> Iterator[dict[str, bool]]:
    """Ctrl-C finishes the current step, then the loop checkpoints and stops."""
    state = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if state["stop"]:  # a second Ctrl-C: stop now (the last complete checkpoint stays valid)
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


# ------------------------------------------------------------------ reward counters

def reward_metrics(trainer: Trainer) -> dict[str, float]:
    """Counters a reward keeps about its last call (a ``metrics`` dict, e.g. the OCR reward's
    ``failures``), summed over ranks, as ``reward_<key>/<reward name>``."""
    keys, values = [], []
    for name, reward in zip(trainer.reward_names, trainer.rewards):
        counters = getattr(reward, "metrics", None)
        for key, value in (counters.items() if isinstance(counters, dict) else ()):
            keys.append(f"reward_{key}/{name}")
            values.append(float(value))
    if not keys:
        return {}
    total = trainer.dist.all_reduce_mean(torch.tensor(values, dtype=torch.float64)) * trainer.dist.world_size
    return dict(zip(keys, total.tolist()))


# ------------------------------------------------------------------ sample grids

def sample_prompts(prompt_sets, count: int = SAMPLE_COUNT) -> list[str]:
    """Fixed prompts for the sample grids: the first prompts of each prompt set, round-robin."""
    prompts: list[str] = []
    index = 0
    while len(prompts) < count and any(index < len(s.prompts) for s in prompt_sets):
        prompts.extend(s.prompts[index] for s in prompt_sets if index < len(s.prompts))
        index += 1
    return prompts[:count]


def sample_images(policy, config: TrainConfig, prompts: list[str]) -> torch.Tensor:
    """Images of the policy's current trainable weights with the run's fixed sample noise."""
    generator = torch.Generator().manual_seed(config.seed + SAMPLE_SEED_OFFSET)
    with torch.no_grad():
        rollout = policy.sample(prompts, generator=generator, steps=config.sample_steps, use_old=False)
    return rollout.images


def save_samples(trainer: Trainer, run_dir: Path, step: int) -> Path:
    """samples/step-NNNNNN.png: the fixed sample prompts (captions) with the current weights
    (the weight EMA's when ema_decay > 0)."""
    prompts = sample_prompts(trainer.components.prompt_sets)
    path = run_dir / SAMPLES_DIR / f"step-{step:06d}.png"
    with trainer.eval_weights():
        images = sample_images(trainer.policy, trainer.config, prompts)
    return save_grid(images, path, captions=prompts)


# ------------------------------------------------------------------ one writer per run directory

class RunDirectoryLock:
    """An exclusive OS lock (``flock``) on ``<run dir>/.marble.lock``, held for a run's life.

    The kernel releases it when the holder exits in any way (Ctrl-C, a crash, kill -9), so a
    stale lock file never blocks anything. The file holds the holder's pid and host, for the
    error message of a second writer. A run that fails before writing anything leaves no trace:
    :meth:`release` removes the lock file, and the directory when the lock created it.
    """

    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir, self.fd, self.created = run_dir, fd, created  # created: directories, deepest first

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunDirectoryLock:
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise MarbleError(f"--out {run_dir} is a file; choose a directory")
        created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MarbleError(f"cannot create the run directory {run_dir}: {exc.strerror}; "
                              "choose another --out") from None
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise MarbleError(f"cannot lock the run directory {run_dir} ({exc.strerror}); its "
                                      "filesystem does not support flock: choose an --out on a local disk") from None
                raise MarbleError(f"{run_dir} is in use by another marble process ({_lock_holder(path)}); "
                                  "wait for it to finish, or stop it, or choose another --out") from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else can see; open the current one again.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return cls(run_dir, fd, created)

    def release(self) -> None:
        """Remove the lock file (and the directories the lock created, if nothing else was
        written into them), then unlock: a file removed while locked cannot be locked twice."""
        try:
            self.path.unlink(missing_ok=True)
            for directory in self.created:
                if any(directory.iterdir()):
                    break
                directory.rmdir()
        except OSError:
            pass  # the kernel still releases the lock below
        finally:
            os.close(self.fd)


def _lock_holder(path: Path) -> str:
    """'pid N' (and the host when it is another one) of a lock file's holder."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        pid, host = "", ""
    if not pid:
        return "its pid is not recorded yet"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def holding_run_directory(train_function: Callable[..., RunResult]) -> Callable[..., RunResult]:
    """Run ``train_function(config, ..., dist=...)`` holding its run directory's lock.

    Only rank 0 of a multi-process run takes it; when it cannot, every rank raises the same
    one-line MarbleError (naming the holder's pid) before anything else happens.
    """
    signature = inspect.signature(train_function)

    @functools.wraps(train_function)
    def wrapper(*args: Any, **kwargs: Any) -> RunResult:
        bound = signature.bind(*args, **kwargs)
        dist = bound.arguments.get("dist") or Distributed()
        bound.arguments["dist"] = dist
        run_dir = Path(bound.arguments["config"].out)
        lock = dist.run_on_main(lambda: RunDirectoryLock.acquire(run_dir))
        try:
            return train_function(*bound.args, **bound.kwargs)
        finally:
            if lock is not None:
                lock.release()

    return wrapper


# ------------------------------------------------------------------ the run

def _resume_point(config: TrainConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(meta, state) of the run's latest checkpoint, verified against the run's config."""
    found = list_checkpoints(config.out)
    if not found:
        return None, None
    meta, state = load_checkpoint(found[-1])
    check_compatible(meta, config, f"checkpoint {found[-1]}")
    record = state.get("evaluation") or {}
    evaluated = int(record["last_step"]) if "last_step" in record else meta["step"]
    final_evaluation_pending = bool(config.eval_every) and meta["step"] == config.steps != evaluated
    if meta["step"] >= config.steps and not final_evaluation_pending:
        raise MarbleError(f"--resume {config.out}: the run is already at step {meta['step']}; pass "
                          f"--steps larger than {meta['step']} to train further")
    return meta, state


@holding_run_directory
def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          dist: Distributed | None = None, console: Any = None) -> RunResult:
    """Train ``config`` (or resume its run directory) and return the metric history.

    Order matters: every check (run directory, checkpoint, prompts, plugins) runs before the
    first write, so bad input leaves the disk as it was. The whole run holds the directory's
    lock (:class:`RunDirectoryLock`): a second writer is refused.
    """
    from marble_kit.evaluate import TrainingEvaluation, eval_prompt_sets
    from marble_kit.plots import plot_run
    from marble_kit.progress import TrainProgress

    dist = dist or Distributed()
    dist.check_same(config_digest(config), "the run configuration (digest)",
                    "launch every rank with the same config file and flags")
    config = config.replace(prompts=absolute_prompt_specs(list(config.prompts)))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.out)
    check_run_dir(config, resume)
    dist.run_on_main(lambda: check_trackers(config.report_to))
    meta, state = _resume_point(config) if resume else (None, None)
    # torch's global RNG starts from a random seed in every process: seed it, so that a plugin
    # drawing from it is reproducible; a resume then restores the checkpoint's state.
    torch.manual_seed(config.seed)
    components = build_components(config)
    trainer = Trainer(config, components, dist=dist)
    evaluation = (TrainingEvaluation(config, components.rewards + components.eval_rewards,
                                     [*config.rewards, *config.eval_rewards], eval_prompt_sets(config), dist)
                  if config.eval_every else None)
    if state is not None:
        restore_global_rng(state.pop("global_rng", None))
        if evaluation is not None:
            evaluation.load_state_dict(state.pop("evaluation", None))
        trainer.load_state_dict(state)
    start_step = trainer.step_count
    dist.check_device(trainer.policy.device)
    if dist.active:  # every rank loaded the same checkpoint (or built the same seeded LoRA init)
        weights = trainer.policy.state_dict()
        dist.check_same((start_step, tensors_digest(weights[k] for k in sorted(weights))),
                        "the starting (step, weights digest)",
                        "every rank must read the same checkpoint: on several nodes put --out on a "
                        "filesystem all nodes share; a policy must seed its LoRA init from `seed`")

    metrics_path = run_dir / METRICS_FILE
    dist.barrier()
    if dist.is_main:
        write_config(config)
        if resume:
            _truncate_metrics(metrics_path, start_step)
    dist.barrier()
    meta = checkpoint_meta(config)
    saved: dict[str, Any] = {"step": start_step if state is not None else None, "path": None}

    def write_checkpoint(name: str | None = None, extra_meta: dict[str, Any] | None = None) -> Path | None:
        trainer.consolidate()  # every rank: a sharded optimizer state is gathered on rank 0
        if not dist.is_main:
            return None
        full_state = {**trainer.state_dict(), "global_rng": capture_global_rng()}
        if evaluation is not None:
            full_state["evaluation"] = evaluation.state_dict()
        return save_checkpoint(run_dir, trainer.step_count, full_state, trainer.policy,
                               {**meta, **(extra_meta or {})}, keep=config.keep_checkpoints, name=name,
                               ema_weights=trainer.eval_weights if trainer.ema is not None else None)

    def checkpoint() -> None:
        if saved["step"] == trainer.step_count:
            return
        saved["path"] = write_checkpoint()
        saved["step"] = trainer.step_count

    def evaluate_now(step: int) -> dict[str, Any]:
        """The held-out evaluation (every rank); a new best composite writes checkpoints/best."""
        eval_metrics, best = evaluation.run(trainer, step, run_dir)
        if best:
            write_checkpoint(BEST, {"best": {"step": step, "composite": eval_metrics["eval/composite"]}})
        bar.note(evaluation.summary(eval_metrics, step, best))
        return eval_metrics

    def evaluation_failed(exc: RewardFailure, step: int) -> MarbleError:
        """A reward failed in the evaluation of ``step``: the step itself is complete, so its
        checkpoint is written (one process: the callers re-raise on several) and a resume runs
        the evaluation first."""
        checkpoint()
        return MarbleError(f"{exc}; in the held-out evaluation of step {step}: the run stopped after step {step} "
                           f"(checkpoint saved): once the reward works again, `marble train --resume {run_dir}` "
                           "runs that evaluation first and continues")

    history: list[dict[str, Any]] = []
    interrupted = False
    bar = TrainProgress(config, enabled=progress and dist.is_main, console=console if dist.is_main else None,
                        start=start_step)  # with a console: the header, now that every check passed
    tracker = open_tracker(config, start_step) if dist.is_main else Tracker()  # report_to: rank 0 only
    with _sigint_as_flag() as sigint:
        with bar, tracker:
            if dist.is_main and config.sample_every and start_step == 0:
                tracker.log_image("samples", save_samples(trainer, run_dir, 0), 0)
            if evaluation is not None and start_step == 0:  # the base every evaluation is measured against
                base_line = {"step": 0, **evaluate_now(0)}
                if dist.is_main:
                    append_metrics(metrics_path, base_line)
                    tracker.log_metrics(base_line)
            elif evaluation is not None and evaluation.pending(start_step):
                # the evaluation of the checkpoint's step failed: run it now, into that step's line
                try:
                    eval_metrics = evaluate_now(start_step)
                except RewardFailure as exc:
                    raise MarbleError(f"{exc}; in the held-out evaluation of step {start_step} (run again "
                                      "once the reward works)") from exc
                if dist.is_main:
                    merge_metrics(metrics_path, start_step, eval_metrics)
                    tracker.log_metrics({"step": start_step, **eval_metrics})
                saved["step"] = None  # the checkpoint of start_step now records its evaluation
            # A Ctrl-C seen by any rank stops every rank after the same step.
            while trainer.step_count < config.steps and not dist.any(sigint["stop"]):
                try:
                    metrics = trainer.step()
                except RewardFailure as exc:
                    # The trainer is still at its last complete step: keep it (one process; on
                    # several the other ranks are not at a collective to join the save).
                    if dist.active or trainer.step_count == start_step:
                        raise
                    checkpoint()
                    raise MarbleError(f"{exc}; the run stopped after step {trainer.step_count} (checkpoint "
                                      f"saved): once the reward works again, continue it with "
                                      f"`marble train --resume {run_dir}`") from exc
                metrics.update(reward_metrics(trainer))
                evaluated = evaluation is not None and evaluation.due(trainer.step_count)
                failure: RewardFailure | None = None
                if evaluated:
                    try:
                        metrics.update(evaluate_now(trainer.step_count))
                    except RewardFailure as exc:  # the step is kept: logged, checkpointed below
                        if dist.active:
                            raise
                        failure = exc
                history.append(metrics)
                step = trainer.step_count
                if dist.is_main:
                    if step % config.log_every == 0 or step == config.steps or evaluated:
                        append_metrics(metrics_path, metrics)
                        tracker.log_metrics(metrics)
                    if config.sample_every and step % config.sample_every == 0:
                        tracker.log_image("samples", save_samples(trainer, run_dir, step), step)
                if failure is not None:
                    raise evaluation_failed(failure, step) from failure
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    checkpoint()
                bar.update(metrics)
            interrupted = trainer.step_count < config.steps
        checkpoint()  # still inside the handler: a Ctrl-C now cannot cut the final save
    if dist.is_main and metrics_path.exists():
        plot_run(run_dir)
    # No rank leaves before rank 0 has written: an interrupted run exits non-zero, and torchrun
    # stops the whole job as soon as one rank does.
    dist.barrier()
    last = list_checkpoints(run_dir)
    return RunResult(run_dir, history, interrupted, last[-1] if last else None)
