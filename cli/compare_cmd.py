"""`marble compare RUN RUN…`: runs side by side (table, compare.json, compare.png)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from marble_cli.common import console, print_json, user_errors


def _seconds(value: float | None, estimated: bool) -> str:
    if value is None:
        return "–"
    text = f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"
    return ("≈ " if estimated else "") + text


def _cell(cell: dict) -> str:
    if cell["source"] == "eval":
        if cell["delta"] is None:
            return "–"
        se = f"{cell['delta_se']:.4f}" if cell["delta_se"] is not None else "–"
        return f"{cell['delta']:+.4f} ± {se}"
    if cell["reward"] is None:
        return "– (train)"
    return f"{cell['reward']:.4f} (train, step {cell['step']})"


@user_errors
def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more run directories (the --out of `marble train`)."),
    out: Path = typer.Option(Path("compare"), "--out", "-o", help="Where compare.json and compare.png go."),
    json_output: bool = typer.Option(False, "--json", help="Print the JSON report."),
):
    """Compare runs: per shared reward the eval Δ ± s.e. (or the last training reward), steps,
    balancer, Gram mode, training time; reward, λ and worst-cosine curves overlaid."""
    from marble_kit.compare import compare_runs

    result = compare_runs(runs, out)
    report = result.as_dict()
    if json_output:
        print_json(report)
        return
    table = Table(title="marble compare")
    table.add_column("")
    for run in report["runs"]:
        table.add_column(run["label"], justify="right")
    rows = [("balancer", lambda r: r["balancer"]), ("gram", lambda r: r["gram"]),
            ("steps", lambda r: str(r["steps"]) if r["steps"] == r["target_steps"] else f"{r['steps']} of {r['target_steps']}"),
            ("train time", lambda r: _seconds(r["train_seconds"], r["train_seconds_estimated"])),
            ("scores", lambda r: f"eval @ step {r['eval_step']}" if r["eval"] else "training (no eval.json)")]
    for name, render in rows:
        table.add_row(name, *(render(run) for run in report["runs"]))
    table.add_section()
    for reward in report["shared_rewards"]:
        table.add_row(reward, *(_cell(report["rewards"][reward][run["label"]]) for run in report["runs"]))
    notes = ["Δ ± s.e.: `marble eval` of the checkpoint against the base policy (same prompts and noise).",
             "(train, step N): the mean training reward at step N, for a run without that eval: a level, not a Δ.",
             "train time: the training steps' clocks summed (start-up, sample grids and checkpoints left out)."]
    if report["not_shared"]:
        notes.append("not compared (not in every run): " + "; ".join(
            f"{', '.join(names)} ({label})" for label, names in report["not_shared"].items()))
    console.print(table)
    console.print("\n".join(notes), highlight=False)
    console.print(f"json  {result.json_path}\nplot  {result.png_path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
