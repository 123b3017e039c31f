"""The rich progress bar of `marble train`: per-reward rewards, λ and the worst cosine."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def summarize(metrics: dict[str, Any], reward_names: list[str]) -> str:
    parts = []
    for name in reward_names:
        value = metrics.get(f"reward/{name}")
        lam = metrics.get(f"lambda/{name}")
        text = f"{name} {value:.3f}" if isinstance(value, float) and math.isfinite(value) else f"{name} –"
        if isinstance(lam, float):
            text += f" (λ {lam:.2f})"
        parts.append(text)
    worst = metrics.get("cos/worst")
    if isinstance(worst, float):
        parts.append(f"worst cos {worst:+.2f}")
    return " · ".join(parts)


class TrainProgress:
    def __init__(self, config, enabled: bool = True, console: Console | None = None, start: int = 0):
        self.config, self.enabled, self.start = config, enabled, start
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[summary]}"),
            console=console, disable=not enabled, transient=False,
        )
        self.task = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.config.steps, completed=self.start,
                                           summary="rollout…")
        return self

    def update(self, metrics: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=metrics["step"],
                             summary=summarize(metrics, list(self.config.rewards)))
        if self.enabled and self.config.log_every and metrics["step"] % max(1, self.config.log_every * 10) == 0:
            self.progress.console.print(f"step {metrics['step']:>5} · {summarize(metrics, list(self.config.rewards))}",
                                        highlight=False)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
