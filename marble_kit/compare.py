"""Several runs side by side: one table, ``compare.json`` and ``compare.png``.

Per reward the score of each run is its last ``marble eval`` (Δ ± s.e. of the latest
checkpoint evaluated, from ``RUN/eval/step-N/eval.json``); a run without an eval of that reward
shows its last training-reward mean instead, labelled as such (that is a level, not a Δ).
Runs with different reward sets are compared on the rewards they all share; the others are
named. The picture overlays the runs' training curves: mean reward and λ per shared reward,
and the worst cosine of a reward gradient with the fused gradient.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.evaluate import EVAL_JSON
from marble_kit.plots import read_metrics, save_png
from marble_kit.run import read_run_config

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"
# The clocks that add up to one training step (trainer.py): rollout, reward scoring, and
# everything after scoring (advantages, gradients, optimizer, old-policy update).
STEP_CLOCKS = ("time/rollout", "time/rewards", "time/update")


@dataclass
class RunSummary:
    """What the comparison reads of one run directory."""

    label: str
    path: Path
    config: TrainConfig
    rows: list[dict[str, Any]]
    eval_report: dict[str, Any] | None = None
    eval_path: Path | None = None

    @property
    def last_step(self) -> int:
        return int(self.rows[-1]["step"])

    def train_seconds(self) -> tuple[float | None, bool]:
        """Seconds of training (the steps' clocks summed) and whether it is an estimate: with
        ``log_every`` > 1 only some steps have a line, so the mean logged step is scaled up."""
        per_line = [sum(row[k] for k in STEP_CLOCKS if _finite(row.get(k))) for row in self.rows
                    if any(_finite(row.get(k)) for k in STEP_CLOCKS)]
        if not per_line:
            return None, False
        complete = [int(row["step"]) for row in self.rows] == list(range(1, self.last_step + 1))
        if complete:
            return float(sum(per_line)), False
        return float(sum(per_line) / len(per_line) * self.last_step), True

    def eval_row(self, reward: str) -> dict[str, Any] | None:
        if self.eval_report is None:
            return None
        return next((row for row in self.eval_report.get("rewards", []) if row.get("reward") == reward), None)

    def last_training_reward(self, reward: str) -> tuple[int | None, float | None]:
        """(step, mean reward) of the last metrics line where ``reward`` judged an image."""
        for row in reversed(self.rows):
            if _finite(row.get(f"reward/{reward}")):
                return int(row["step"]), float(row[f"reward/{reward}"])
        return None, None


@dataclass
class Comparison:
    runs: list[RunSummary]
    shared: list[str]
    not_shared: dict[str, list[str]]
    cells: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    json_path: Path | None = None
    png_path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        runs = []
        for run in self.runs:
            seconds, estimated = run.train_seconds()
            runs.append({"label": run.label, "path": str(run.path), "balancer": run.config.balancer,
                         "gram": run.config.gram, "rewards": list(run.config.rewards), "steps": run.last_step,
                         "target_steps": run.config.steps, "train_seconds": seconds,
                         "train_seconds_estimated": estimated,
                         "eval": str(run.eval_path) if run.eval_path else None,
                         "eval_step": run.eval_report.get("step") if run.eval_report else None})
        return {"runs": runs, "shared_rewards": self.shared, "not_shared": self.not_shared,
                "rewards": self.cells, "json": str(self.json_path), "png": str(self.png_path)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_or_none(value: Any) -> float | None:
    return float(value) if _finite(value) else None


def latest_eval(run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The ``eval.json`` under ``RUN/eval/`` of the latest checkpoint step (None if there is none)."""
    found = []
    for path in sorted((run_dir / "eval").glob(f"*/{EVAL_JSON}")):
        try:
            report = json.loads(path.read_text())
            step = int(report["step"])
        except (OSError, ValueError, KeyError, TypeError):
            raise MarbleError(f"{path} is not a readable eval report; run `marble eval {run_dir}` again "
                              "or delete that file") from None
        found.append((step, path.stat().st_mtime_ns, path, report))
    if not found:
        return None, None
    _, _, path, report = max(found, key=lambda item: item[:2])
    return path, report


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the directory names, or more of each path where two names collide."""
    for depth in range(1, 1 + max(len(p.parts) for p in paths)):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load_run(path: Path, label: str) -> RunSummary:
    if not path.is_dir():
        raise MarbleError(f"{path} is not a directory; pass the --out directories of `marble train` runs")
    config = read_run_config(path)
    # Training steps (a run that evaluates during training also logs its base evaluation as step 0).
    rows = [row for row in read_metrics(path) if isinstance(row.get("step"), int) and row["step"] > 0]
    if not rows:
        raise MarbleError(f"{path}/metrics.jsonl has no step yet; compare runs after their first training step")
    eval_path, eval_report = latest_eval(path)
    return RunSummary(label, path, config, rows, eval_report, eval_path)


def reward_cell(run: RunSummary, reward: str) -> dict[str, Any]:
    """One run's score on one reward: its eval Δ ± s.e., or its last training-reward mean."""
    row = run.eval_row(reward)
    if row is not None:
        return {"source": "eval", "step": run.eval_report.get("step"), "delta": _number_or_none(row.get("delta")),
                "delta_se": _number_or_none(row.get("delta_se")), "n": row.get("n"),
                "base_mean": _number_or_none(row.get("base_mean")),
                "tuned_mean": _number_or_none(row.get("tuned_mean"))}
    step, value = run.last_training_reward(reward)
    return {"source": "train", "step": step, "reward": value}


def compare_runs(paths: list[str | Path], out: str | Path = "compare") -> Comparison:
    """Compare the run directories ``paths``; write ``compare.json`` and ``compare.png`` into ``out``.

    Every input is read and checked before anything is written.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise MarbleError(f"marble compare needs at least two runs, got {len(paths)}; pass two or more "
                          "run directories")
    for path in paths:
        if not path.exists():
            raise MarbleError(f"{path} does not exist; pass the --out directories of `marble train` runs")
    resolved = [p.resolve() for p in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise MarbleError(f"{paths[index]} is given twice; pass each run once")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MarbleError(f"--out {out} is a file; choose a directory")
    runs = [load_run(path, label) for path, label in zip(paths, run_labels(resolved))]

    shared = [name for name in runs[0].config.rewards if all(name in run.config.rewards for run in runs)]
    if not shared:
        listing = "; ".join(f"{run.label}: {','.join(run.config.rewards)}" for run in runs)
        raise MarbleError(f"the runs share no reward ({listing}); compare runs trained on a common reward")
    not_shared = {run.label: [n for n in run.config.rewards if n not in shared] for run in runs}
    comparison = Comparison(runs, shared, {k: v for k, v in not_shared.items() if v})
    comparison.cells = {name: {run.label: reward_cell(run, name) for run in runs} for name in shared}

    out.mkdir(parents=True, exist_ok=True)
    comparison.png_path = plot_comparison(runs, shared, out / COMPARE_PNG)
    comparison.json_path = out / COMPARE_JSON
    tmp = comparison.json_path.with_name(COMPARE_JSON + ".tmp")
    tmp.write_text(json.dumps(comparison.as_dict(), indent=2, allow_nan=False) + "\n")
    tmp.replace(comparison.json_path)
    return comparison


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(row["step"]), float(row[key])) for row in rows if _finite(row.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def plot_comparison(runs: list[RunSummary], shared: list[str], path: Path) -> Path:
    """compare.png: per shared reward its mean training reward and λ; the worst cosine; one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = len(shared)
    fig = plt.figure(figsize=(max(6.4, 3.2 * columns), 8.4), dpi=110)
    grid = fig.add_gridspec(3, columns)
    panels = [(fig.add_subplot(grid[0, k]), f"reward/{name}", f"reward: {name}") for k, name in enumerate(shared)]
    panels += [(fig.add_subplot(grid[1, k]), f"lambda/{name}", f"λ: {name}") for k, name in enumerate(shared)]
    worst = fig.add_subplot(grid[2, :])
    panels.append((worst, "cos/worst", "worst cosine of a reward gradient with the fused gradient"))
    for ax, key, title in panels:
        drawn = False
        for index, run in enumerate(runs):
            steps, values = _series(run.rows, key)
            if steps:
                # markers on short series: a run logged once (log_every) is still a visible point
                ax.plot(steps, values, color=f"C{index}", lw=1.4, label=run.label,
                        marker="o" if len(steps) <= 30 else None, ms=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if key == "cos/worst":
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{i}", lw=2) for i in range(len(runs))]
    worst.legend(handles, [f"{run.label} ({run.config.balancer}, gram {run.config.gram})" for run in runs],
                 fontsize=8, loc="best")
    return save_png(fig, path)
