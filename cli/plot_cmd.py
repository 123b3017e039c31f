"""`marble plot RUN`: reward-curve, λ and cosine plots of a run (PNG)."""

from __future__ import annotations

from pathlib import Path

import typer

from marble_cli.common import console, user_errors


@user_errors
def plot(run_dir: Path = typer.Argument(..., help="Run directory (holds metrics.jsonl).")):
    """Draw the run's plots into RUN/plots/ (also done at the end of training)."""
    from marble_kit.plots import plot_run

    for path in plot_run(run_dir):
        console.print(str(path), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)
