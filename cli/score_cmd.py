"""`marble score`: score image files with rewards and print a table (or JSON)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from marble_cli.common import console, names_option, print_json, user_errors
from marble_kit.options import parse_plugin_options


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _json_value(value: float) -> float | None:
    return None if math.isnan(value) else value


@user_errors
def score(
    paths: list[str] = typer.Argument(..., help="Image files (PNG/JPEG) or directories of images."),
    rewards: str = typer.Option(..., "--rewards", help="Comma-separated reward names, e.g. hps,ocr."),
    prompt: str | None = typer.Option(None, "--prompt", help="The prompt of every image."),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", help="One prompt per line, in the sorted order of the images."),
    reward_opt: list[str] | None = typer.Option(
        None, "--reward-opt", help="Reward option NAME.KEY=VALUE, e.g. hps.weights=/path (repeatable)."),
    device: str | None = typer.Option(None, "--device", help="Run the reward models here (cpu, cuda)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Score images with one or more rewards (NaN / n/a: the reward does not apply)."""
    from marble_kit.scoring import mean_scores, score_images  # torch-heavy: import on use

    rows = score_images(paths, names_option(rewards, "--rewards") or [], prompt=prompt, prompts_file=prompts_file,
                        reward_options=parse_plugin_options(reward_opt, "--reward-opt"), device=device)
    means = mean_scores(rows)
    if json_output:
        print_json({
            "images": [{"path": row.path, "prompt": row.prompt,
                        "scores": {k: _json_value(v) for k, v in row.scores.items()}} for row in rows],
            "mean": {k: _json_value(v) for k, v in means.items()},
        })
        return
    table = Table(title="marble score")
    table.add_column("image", overflow="fold")
    table.add_column("prompt", overflow="fold")
    for name in means:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row.path, row.prompt, *(_cell(row.scores[name]) for name in means))
    table.add_section()
    table.add_row("mean", "", *(_cell(value) for value in means.values()))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("score")(score)
