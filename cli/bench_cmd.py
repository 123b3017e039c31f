"""`marble bench`: micro-benchmarks of the library (no math here: parse, call, render)."""

from __future__ import annotations

from pathlib import Path

import typer
from marble_cli.common import console, print_json, user_errors
from rich.table import Table

from marble_kit.errors import MarbleError

bench_app = typer.Typer(help="Benchmarks: balancer QP solve time, optimizer conflict rates.",
                        no_args_is_help=True)


@bench_app.command("balancers")
@user_errors
def balancers(
    max_k: int = typer.Option(10, "--max-k", help="Largest number of rewards K (from 2)."),
    repeats: int = typer.Option(200, "--repeats", help="Timed solves per K (after 20 warm-up solves)."),
    normalize: str = typer.Option("none", "--normalize", help="Gram normalization: none or unit."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    out: Path | None = typer.Option(None, "--out", help="Also write the rows and machine as JSON here."),
):
    """Median OSQP min-norm solve time (MGDA QP) for K = 2…max-k rewards."""
    from marble_kit.bench.balancers import benchmark_qp, machine_description, write_json

    if max_k < 2 or repeats < 1:
        raise MarbleError(f"--max-k must be ≥ 2 and --repeats ≥ 1 (got {max_k}, {repeats})")
    if normalize not in ("none", "unit"):
        raise MarbleError(f"--normalize {normalize!r} is not one of none, unit")
    rows = benchmark_qp(range(2, max_k + 1), repeats=repeats, normalize=normalize)
    if out is not None:
        write_json(rows, out)
    if json_output:
        print_json({"machine": machine_description(), "rows": rows})
        return
    machine = machine_description()
    table = Table(title=f"MGDA QP solve time (osqp {machine['osqp']}, Python {machine['python']}, "
                        f"{machine['cpu_cores']} cores)")
    for column in ("K", "median ms", "p90 ms", "OSQP iterations", "max KKT residual"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["K"]), f"{row['median_ms']:.3f}", f"{row['p90_ms']:.3f}",
                      f"{row['mean_osqp_iterations']:.0f}", f"{row['max_kkt_residual']:.1e}")
    console.print(table)


@bench_app.command("conflict")
@user_errors
def conflict(
    steps: int = typer.Option(150, "--steps", help="AdamW steps per seed."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds."),
    beta1: float = typer.Option(0.9, "--beta1", help="Adam's β1 (0 removes momentum)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """How often the actual AdamW step conflicts with a reward, per Gram metric (toy problem)."""
    from marble_kit.bench.balancers import optimizer_conflict_benchmark

    if steps < 1 or seeds < 1 or not 0.0 <= beta1 < 1.0:
        raise MarbleError("--steps and --seeds must be ≥ 1 and --beta1 in [0, 1)")
    rows = optimizer_conflict_benchmark(steps=steps, seeds=tuple(range(seeds)), betas=(beta1, 0.999))
    if json_output:
        print_json(rows)
        return
    table = Table(title=f"MGDA + AdamW (β1 = {beta1}): steps with a conflicting reward")
    for column in ("Gram metric", "vs fused gradient", "vs actual update", "mean worst cos (update)"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["metric"], f"{row['conflict_rate_fused']:.1%}",
                      f"{row['conflict_rate_update']:.1%}", f"{row['mean_worst_cos_update']:.3f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
