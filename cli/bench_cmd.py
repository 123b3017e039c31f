"""`marble bench`: benchmarks of the library and of the paper's claims (parse, call, render)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from marble_cli.common import console, err_console, names_option, print_json, user_errors
from marble_kit.errors import MarbleError

bench_app = typer.Typer(help="Benchmarks: training-step speed, reward conflicts, Gram fidelity, "
                             "QP solve time, optimizer conflicts.",
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


@bench_app.command("optimizer")
@user_errors
def optimizer(
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


# ---------------------------------------------------------------- training benchmarks
DEFAULT_OUT = Path("runs/bench")


def _summary(report: dict) -> dict:
    """The report without its raw per-step records (those stay in the JSON file)."""
    return {k: v for k, v in report.items() if k not in ("samples", "runs")}


def _write_outputs(report: dict, out: Path, name: str, plot) -> tuple[Path, Path]:
    from marble_kit.bench.common import write_report

    json_path = write_report(report, out / f"{name}.json")
    return json_path, plot(report, out / f"{name}.png")


def _machine_line(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['processor']}, {m['cpu_cores']} cores"
    return (f"{where}, torch {m['torch']} ({m['torch_threads']} threads), load {m['load_average_1m']}, "
            f"policy weights {report.get('policy_fingerprint')}")


def _print_targets(targets: list[dict], label: str = "target") -> None:
    table = Table(title="Targets")
    for column in (label, "measured", "met"):
        table.add_column(column)
    for target in targets:
        value = target["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else (", ".join(value) or "none"
                                                                 if isinstance(value, list) else str(value))
        name = f"{target['method']}: {target['target']}" if "method" in target else target["target"]
        table.add_row(name, shown, "[green]yes[/]" if target["met"] else "[red]no[/]")
    console.print(table)


@bench_app.command("speed")
@user_errors
def speed(
    policy: str = typer.Option("tiny-sd3", "--policy", help="tiny-sd3 (CPU) or sd3.5-arch (GPU, random weights)."),
    device: str | None = typer.Option(None, "--device", help="Policy device (default: the policy's own)."),
    policy_opt: list[str] | None = typer.Option(None, "--policy-opt", help="Policy option OPTION=VALUE (repeatable)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Measured steps per variant (default 40; 10 for sd3.5-arch)."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured rounds first."),
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", help="P prompts per step (same for all variants)."),
    images_per_prompt: int | None = typer.Option(None, "--images-per-prompt", help="G images per prompt."),
    timesteps_per_image: int | None = typer.Option(None, "--timesteps-per-image", help="Training timesteps per image."),
    sample_steps: int | None = typer.Option(None, "--sample-steps", help="Sampler steps of each rollout."),
    kl: float | None = typer.Option(None, "--kl", help="Weight of the reference anchor (default: the trainer's; "
                                    "0 = no anchor and no anchor backward pass)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for speed.json and speed.png."),
):
    """Time per training step: single reward vs weighted sum / MARBLE affine / periodic / exact at K = 5."""
    from marble_cli.train_cmd import _single_plugin_options
    from marble_kit.bench.speed import (
        SpeedSettings,
        ensure_device,
        plot_speed,
        run_speed_benchmark,
        sd35_arch_settings,
    )

    overrides = {"rounds": rounds, "warmup": warmup, "prompts_per_step": prompts_per_step,
                 "images_per_prompt": images_per_prompt, "timesteps_per_image": timesteps_per_image,
                 "sample_steps": sample_steps}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for name, value in overrides.items():
        if value < (0 if name == "warmup" else 1):
            raise MarbleError(f"--{name.replace('_', '-')} must be ≥ {0 if name == 'warmup' else 1} (got {value})")
    if kl is not None:
        if not kl >= 0:
            raise MarbleError(f"--kl must be ≥ 0 (got {kl})")
        overrides["kl"] = kl
    settings = sd35_arch_settings(**overrides) if policy == "sd3.5-arch" else SpeedSettings(policy=policy, **overrides)
    options = {**settings.policy_options, **_single_plugin_options(policy_opt, "--policy-opt")}
    if device is not None:
        options["device"] = device
    settings.policy_options = ensure_device(options, policy)
    err_console.print(f"marble bench speed: {policy}, {settings.warmup} + {settings.rounds} rounds × 5 variants",
                      highlight=False)
    report = run_speed_benchmark(settings, on_round=lambda i, n: err_console.print(f"  round {i}/{n}", highlight=False))
    json_path, plot_path = _write_outputs(report, out, "speed", plot_speed)
    if json_output:
        print_json(_summary(report))
        return
    table = Table(title=f"Time per training step (median s) — {_machine_line(report)}", box=box.SIMPLE_HEAD,
                  show_edge=False, collapse_padding=True)
    table.add_column("variant", no_wrap=True)
    for column in ("step", "rollout", "rewards", "update", "grad step", "× step", "× step − rewards",
                   "× update", "× grad step", "peak MiB"):
        table.add_column(column, justify="right")
    table.caption = "seconds (median), then speed vs (a) on the same clock, then peak memory"
    for row in report["rows"]:
        table.add_row(row["label"], *(f"{row[f'median_{k}_s']:.3f}" for k in
                                      ("step", "rollout", "rewards", "update", "gradient_step")),
                      *(f"{row[f'speed_{k}']:.2f}×" for k in
                        ("step", "step_without_rewards", "update", "gradient_step")),
                      f"{row['peak_memory_mb']:.0f}")
    console.print(table)
    _print_targets(report["targets"])
    console.print(f"wrote {json_path} and {plot_path}", highlight=False)


@bench_app.command("conflict")
@user_errors
def conflict(
    steps: int = typer.Option(30, "--steps", help="Training steps per method and seed."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds (0, 1, ...)."),
    methods: str | None = typer.Option(None, "--methods", help="Comma-separated subset of the six methods."),
    eval_images_per_prompt: int = typer.Option(4, "--eval-images-per-prompt", help="Held-out images per prompt."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for conflict.json and conflict.png."),
):
    """Weighted sum vs MGDA vs MARBLE (EMA, periodic, optimizer-aware) on the tiny policy: per-step
    worst-reward cosines and held-out reward changes."""
    from marble_kit.bench.conflict import (
        METHOD_NAMES,
        ConflictSettings,
        plot_conflict,
        run_conflict_benchmark,
    )

    settings = ConflictSettings(steps=steps, seeds=seeds, eval_images_per_prompt=eval_images_per_prompt,
                                methods=names_option(methods, "--methods") or list(METHOD_NAMES))
    err_console.print(f"marble bench conflict: {len(settings.methods)} methods × {seeds} seeds × {steps} steps",
                      highlight=False)
    report = run_conflict_benchmark(
        settings, on_run=lambda method, seed: err_console.print(f"  {method}, seed {seed}", highlight=False))
    json_path, plot_path = _write_outputs(report, out, "conflict", plot_conflict)
    if json_output:
        print_json(_summary(report))
        return
    rewards = list(report["rows"][0]["changes"])
    table = Table(title=f"Worst-reward cosine and held-out change (base-std units, mean ± spread over "
                        f"{seeds} seeds) — {_machine_line(report)}")
    for column in ("method", "cos<0 fused", "cos<0 update", "mean worst cos", "mean worst cos (update)",
                   *rewards):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        changes = [f"{row['changes'][n]['mean']:+.2f} ± {row['changes'][n]['spread']:.2f}" for n in rewards]
        table.add_row(row["method"], f"{row['negative_fused']:.0%}", f"{row['negative_update']:.0%}",
                      f"{row['mean_worst_cos_fused']:+.3f}", f"{row['mean_worst_cos_update']:+.3f}", *changes)
    console.print(table)
    _print_targets(report["targets"])
    console.print(f"wrote {json_path} and {plot_path}", highlight=False)


@bench_app.command("fidelity")
@user_errors
def fidelity(
    steps: int = typer.Option(40, "--steps", help="Training steps per seed (driven by `exact`)."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds (0, 1, ...)."),
    period: int = typer.Option(10, "--period", help="Solve interval n of the periodic mode."),
    balancer: str = typer.Option("marble", "--balancer", help="Balancer of every mode (marble, mgda-qp)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for fidelity.json and fidelity.png."),
):
    """How `periodic` (stale λ) and `affine` compare with `exact` every step, on the same batches."""
    from marble_kit.bench.fidelity import (
        FidelitySettings,
        plot_fidelity,
        run_fidelity_benchmark,
    )

    settings = FidelitySettings(steps=steps, seeds=seeds, gram_period=period, balancer=balancer)
    err_console.print(f"marble bench fidelity: {balancer}, {seeds} seeds × {steps} steps, period {period}",
                      highlight=False)
    report = run_fidelity_benchmark(settings, on_seed=lambda seed: err_console.print(f"  seed {seed}",
                                                                                     highlight=False))
    json_path, plot_path = _write_outputs(report, out, "fidelity", plot_fidelity)
    if json_output:
        print_json(_summary(report))
        return
    table = Table(title=f"Balancing modes vs exact every step ({balancer}, period {period}) — "
                        f"{_machine_line(report)}")
    for column in ("mode", "mean cos(d, d_exact)", "min cos", "mean |Δλ|₁", "max |Δλ|₁",
                   "worst cos < 0", "mean worst cos"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(row["mode"], f"{row['mean_cos_to_exact']:.4f}", f"{row['min_cos_to_exact']:.4f}",
                      f"{row['mean_lambda_l1']:.3f}", f"{row['max_lambda_l1']:.3f}",
                      f"{row['negative_worst_cos']:.0%}", f"{row['mean_worst_cos']:+.3f}")
    console.print(table)
    console.print(f"affine Gram vs exact Gram: max relative error {report['max_gram_relative_error']:.1e}",
                  highlight=False)
    console.print(f"wrote {json_path} and {plot_path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
