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
from rich.table import Column


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


def header(config) -> str:
    """The line a run starts with (printed once every check has passed)."""
    return (f"[bold]marble train[/] → {config.out}  policy={config.policy}  rewards={','.join(config.rewards)}  "
            f"balancer={config.balancer}  gram={config.gram}")


class TrainProgress:
    """The progress line; with a ``console``, the run's header is printed first.

    The step count and the ETA keep their width on a narrow terminal (80 columns): only the
    reward summary at the end of the line is cut (with an ellipsis), and the bar shrinks.
    """

    def __init__(self, config, enabled: bool = True, console: Console | None = None, start: int = 0):
        self.config, self.enabled, self.start, self.console = config, enabled, start, console
        fixed = {"no_wrap": True}
        self.progress = Progress(
            TextColumn("[bold]train", table_column=Column(**fixed)),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=5, max_width=30, **fixed)),
            MofNCompleteColumn(table_column=Column(**fixed)),
            TimeElapsedColumn(table_column=Column(**fixed)),
            TimeRemainingColumn(table_column=Column(**fixed)),
            TextColumn("{task.fields[summary]}",
                       table_column=Column(ratio=3, overflow="ellipsis", **fixed)),
            console=console, disable=not enabled, transient=False, expand=True,
        )
        self.task = None

    def __enter__(self) -> TrainProgress:
        if self.console is not None:
            self.console.print(header(self.config), highlight=False, overflow="fold")
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

    def note(self, text: str) -> None:
        """One line above the bar (e.g. a held-out evaluation's summary)."""
        if self.enabled:
            self.progress.console.print(text, highlight=False)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
