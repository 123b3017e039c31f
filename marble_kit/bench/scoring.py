"""The scoring section of `marble bench speed`: what scoring the K rewards concurrently, and
computing them while the next rollout is drawn (``reward_staleness = 1``), save per step.

K = 2 rewards that cost real time on the CPU proxy: ``ocr`` in the training process and
``remote:ocr`` from a `marble serve-reward ocr` subprocess on 127.0.0.1 (RapidOCR, one ONNX
thread each). Three trainers share one tiny-sd3 policy and take turns, one step each per
round, in a freshly shuffled order (as the main speed bench does):

* ``sequential``   ``reward_threads = 1``: one reward after the other (the old trainer);
* ``concurrent``   ``reward_threads = 0``: both at once (the default);
* ``async``        concurrent, and ``reward_staleness = 1``: the rewards of step s while step
  s+1's rollout is drawn (one step of staleness, docs/reward-services.md).

Per step: the wall time and the trainer's clocks (rollout, the rewards' exposed time, update).
Speed ratios are sequential time / variant time within each round, median over rounds; the
"expected" columns say what the phase times of the sequential run predict (concurrent saves
the shorter reward's time at best; async also hides min(rollout, rewards)).
"""

from __future__ import annotations

import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from marble_kit.bench.common import build_policy, components_for, machine_description, median
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.trainer import Trainer

SCORING_VARIANTS = (("sequential", 1, 0), ("concurrent", 0, 0), ("async", 0, 1))  # name, threads, staleness


@dataclass
class ScoringSettings:
    """The scoring section's run (defaults: ~1 minute on 2 CPU cores)."""

    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=dict)
    rounds: int = 5
    warmup: int = 1
    prompts_per_step: int = 2
    images_per_prompt: int = 4
    timesteps_per_image: int = 1
    sample_steps: int = 32  # a rollout about as long as one reward's scoring here
    rewards: list = field(default_factory=lambda: ["ocr", "remote:ocr"])
    prompts: list = field(default_factory=lambda: ["ocr"])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.warmup < 0:
            raise MarbleError(f"scoring bench: rounds must be ≥ 1 and warmup ≥ 0 (got {self.rounds}, {self.warmup})")

    def config(self, threads: int, staleness: int, urls: dict[str, str]) -> TrainConfig:
        options = {name: {"url": url} for name, url in urls.items()}
        if "ocr" in self.rewards:
            options["ocr"] = {"threads": 1}
        return TrainConfig(policy=self.policy, policy_options=dict(self.policy_options), rewards=list(self.rewards),
                           reward_options=options, prompts=list(self.prompts), seed=self.seed,
                           steps=self.warmup + self.rounds, prompts_per_step=self.prompts_per_step,
                           images_per_prompt=self.images_per_prompt, timesteps_per_image=self.timesteps_per_image,
                           sample_steps=self.sample_steps, out="-", checkpoint_every=0, sample_every=0,
                           reward_threads=threads, reward_staleness=staleness)


class RewardServer:
    """`marble serve-reward NAME --port 0` in a subprocess, until :meth:`stop`."""

    def __init__(self, name: str, options: list[str], timeout: float = 180.0):
        self.process = subprocess.Popen([sys.executable, "-m", "marble_cli.app", "serve-reward", name, "--port", "0",
                                         *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        deadline, seen = time.monotonic() + timeout, []
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise MarbleError(f"scoring bench: `marble serve-reward {name}` printed no URL in {timeout:.0f} s: "
                                  f"{''.join(seen)[-300:]}") from None
            seen.append(line)
            if " at http://" in line:
                self.url = line.split(" at ", 1)[1].split()[0]
                return

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_servers(rewards: list[str]) -> dict[str, RewardServer]:
    """One server per ``remote:NAME`` reward (an OCR server with one ONNX thread)."""
    servers: dict[str, RewardServer] = {}
    try:
        for name in rewards:
            if name.startswith("remote:"):
                served = name.split(":", 1)[1]
                options = ["--reward-opt", "ocr.threads=1"] if served == "ocr" else []
                servers[name] = RewardServer(served, options)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run_scoring_benchmark(settings: ScoringSettings | None = None, urls: dict[str, str] | None = None,
                          on_round: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure the three scoring variants alternately; ``urls`` names running servers of the
    ``remote:`` rewards (else they are started here and stopped after)."""
    settings = settings or ScoringSettings()
    servers = {} if urls is not None else start_servers(settings.rewards)
    try:
        urls = urls if urls is not None else {name: server.url for name, server in servers.items()}
        configs = {name: settings.config(threads, staleness, urls) for name, threads, staleness in SCORING_VARIANTS}
        policy = build_policy(configs["sequential"])
        trainers = {name: Trainer(config, components_for(config, policy)) for name, config in configs.items()}
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
        for round_index in range(settings.warmup + settings.rounds):
            order = list(trainers)
            random.Random(round_index).shuffle(order)
            for name in order:
                start = time.perf_counter()
                metrics = trainers[name].step()
                sample = {"step": time.perf_counter() - start}
                sample.update({phase: float(metrics[f"time/{phase}"]) for phase in ("rollout", "rewards", "update")})
                if round_index >= settings.warmup:
                    samples[name].append(sample)
            if on_round is not None:
                on_round(round_index + 1, settings.warmup + settings.rounds)
        reward_seconds = _reward_seconds(trainers["sequential"], policy, settings)
    finally:
        for server in servers.values():
            server.stop()
    rows = summarize_scoring(samples, reward_seconds)
    return {"benchmark": "scoring", "settings": asdict(settings), "machine": machine_description(policy.device),
            "reward_seconds": reward_seconds, "rows": rows, "samples": samples}


def _reward_seconds(trainer: Trainer, policy: Any, settings: ScoringSettings) -> dict[str, float]:
    """Each reward alone on one rollout (median of 3): what concurrency can save at best."""
    drawn = trainer._rollout()
    seconds = {}
    for name, reward in zip(trainer.reward_names, trainer.rewards):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            reward(drawn.rollout.images, drawn.prompts)
            times.append(time.perf_counter() - start)
        seconds[name] = median(times)
    return seconds


def summarize_scoring(samples: dict[str, list[dict[str, float]]], reward_seconds: dict[str, float]
                      ) -> list[dict[str, Any]]:
    """Per variant: median phase times, speed vs sequential (median of within-round ratios),
    and the speed the sequential phase times predict for it."""
    reference = samples["sequential"]
    rollout, update = median([s["rollout"] for s in reference]), median([s["update"] for s in reference])
    total = sum(reward_seconds.values())
    longest = max(reward_seconds.values()) if reward_seconds else 0.0
    sequential_step = rollout + total + update
    predicted = {"sequential": sequential_step, "concurrent": rollout + longest + update,
                 "async": max(rollout, longest) + update}
    rows = []
    for name, _, staleness in SCORING_VARIANTS:
        runs = samples[name]
        row: dict[str, Any] = {"variant": name, "reward_staleness": staleness, "steps": len(runs)}
        for phase in ("step", "rollout", "rewards", "update"):
            row[f"median_{phase}_s"] = median([s[phase] for s in runs])
        row["speed_step"] = median([ref["step"] / run["step"] for ref, run in zip(reference, runs)])
        row["saved_per_step_s"] = median([ref["step"] - run["step"] for ref, run in zip(reference, runs)])
        row["expected_speed_step"] = sequential_step / predicted[name] if predicted[name] > 0 else float("nan")
        rows.append(row)
    return rows


def plot_scoring(report: dict[str, Any], path) -> Any:
    """Stacked median phase times per variant (rewards = the time the rollout did not hide)."""
    from marble_kit.bench.common import new_figure, save_figure

    rows = report["rows"]
    fig, axes = new_figure(1, 1)
    ax = axes[0][0]
    left = [0.0] * len(rows)
    for phase in ("rollout", "rewards", "update"):
        values = [row[f"median_{phase}_s"] for row in rows]
        ax.barh(range(len(rows)), values, left=left, label=phase)
        left = [a + b for a, b in zip(left, values)]
    for index, row in enumerate(rows):
        ax.text(left[index], index, f"  {row['speed_step']:.2f}× (expected {row['expected_speed_step']:.2f}×)",
                va="center", fontsize=8)
    ax.set(yticks=list(range(len(rows))), yticklabels=[row["variant"] for row in rows],
           xlabel="median seconds per step", title=f"Scoring K={len(report['reward_seconds'])} rewards: "
                                                   + ", ".join(report["reward_seconds"]))
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.5 if max(left) > 0 else 1)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return save_figure(fig, path)
