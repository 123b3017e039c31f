"""`marble eval CKPT_OR_RUN`: per-reward table of a checkpoint vs its base policy."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from marble_cli.common import console, names_option, print_json, user_errors
from marble_kit.options import parse_plugin_options


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


@user_errors
def eval_command(
    target: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoints/step-N directory."),
    prompts: list[str] | None = typer.Option(None, "--prompts", help="Prompt sets to evaluate on (default: held-out world prompts / the run's sets)."),
    rewards: str | None = typer.Option(None, "--rewards", "-r", help="Comma-separated rewards (default: the run's)."),
    reward_opt: list[str] | None = typer.Option(None, "--reward-opt", help="Reward option NAME.OPTION=VALUE."),
    images_per_prompt: int | None = typer.Option(None, "--images-per-prompt", help="Images per prompt (same noise for base and fine-tuned; default: the run's eval_images_per_prompt, 4)."),
    max_prompts: int | None = typer.Option(None, "--max-prompts", help="At most this many prompts, 0 = all (default: the run's eval_max_prompts, 32)."),
    sample_steps: int | None = typer.Option(None, "--sample-steps", help="Sampler steps (default: the run's eval_sample_steps, else its sample_steps; the paper's protocol: 40)."),
    weights: str = typer.Option("auto", "--weights", help="Weights to evaluate: ema (the weight EMA), raw (the trained weights) or auto (ema when the run kept one)."),
    seed: int = typer.Option(1234, "--seed", help="Noise seed (the same for base and checkpoint)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default RUN/eval/step-N)."),
    json_output: bool = typer.Option(False, "--json", help="Print the JSON report."),
):
    """Score a checkpoint and its base policy on the same prompts and noise."""
    from marble_kit.evaluate import evaluate

    report = evaluate(target, prompts=prompts, rewards=names_option(rewards, "--rewards"),
                      reward_options=parse_plugin_options(reward_opt, "--reward-opt"),
                      images_per_prompt=images_per_prompt, max_prompts=max_prompts, seed=seed, out=out,
                      sample_steps=sample_steps, weights=weights)
    if json_output:
        print_json(report.as_dict())
        return
    table = Table(title=f"marble eval · {report.checkpoint} (step {report.step})")
    for column in ("reward", "n", "base", "fine-tuned", "Δ ± s.e.", "Δ / base std"):
        table.add_column(column, justify="right" if column != "reward" else "left")
    for row in report.rewards:
        table.add_row(row["reward"], str(row["n"]),
                      f"{_fmt(row['base_mean'])} ± {_fmt(row['base_std'])}",
                      f"{_fmt(row['tuned_mean'])} ± {_fmt(row['tuned_std'])}",
                      f"{_fmt(row['delta'], signed=True)} ± {_fmt(row['delta_se'])}",
                      _fmt(row["delta_in_base_std"], signed=True))
    console.print(table)
    console.print(f"report {report.json_path}\ngrid   {report.grid_path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
