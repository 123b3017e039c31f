"""`marble bench`: benchmarks of the library and of the paper's claims (parse, call, render)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from marble_cli.common import console, err_console, names_option, print_json, split_names, user_errors
from marble_kit.errors import MarbleError

bench_app = typer.Typer(help="Benchmarks: training-step speed, reward conflicts, Gram fidelity, "
                             "balancer solve time, optimizer conflicts.",
                        no_args_is_help=True)


@bench_app.command("balancers")
@user_errors
def balancers(
    max_k: int = typer.Option(10, "--max-k", help="Largest number of rewards K (from 2)."),
    repeats: int = typer.Option(100, "--repeats", help="Timed solves per K and balancer (CAGrad: a tenth; after 10 warm-up solves)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    out: Path | None = typer.Option(None, "--out", help="Also write the rows and machine as JSON here."),
):
    """Solve time and exactness of every Gram balancer for K = 2…max-k, next to torchjd's
    equivalent measured in the same run (when torchjd is installed: the `test` extra)."""
    from marble_kit.bench.balancers import benchmark_balancers, machine_description, write_json

    if max_k < 2 or repeats < 1:
        raise MarbleError(f"--max-k must be ≥ 2 and --repeats ≥ 1 (got {max_k}, {repeats})")
    rows = benchmark_balancers(range(2, max_k + 1), repeats=repeats)
    if out is not None:
        write_json(rows, out)
    machine = machine_description()
    if json_output:
        print_json({"machine": machine, "rows": rows})
        return
    table = Table(title=f"Balancer solve time (median ms) vs torchjd {machine['torchjd']} "
                        f"(osqp {machine['osqp']}, Python {machine['python']}, {machine['cpu_cores']} cores)",
                  box=box.SIMPLE_HEAD)
    for column in ("K", "balancer", "ms", "torchjd ms", "× torchjd", "error", "torchjd error"):
        table.add_column(column, justify="right")

    def shown(value, spec):
        return "—" if value is None else format(value, spec)

    for row in rows:
        table.add_row(str(row["K"]), row["balancer"], f"{row['median_ms']:.3f}", shown(row["torchjd_median_ms"], ".3f"),
                      shown(row["ratio_to_torchjd"], ".2f"), f"{row['max_error']:.1e}",
                      shown(row["torchjd_max_error"], ".1e"))
    table.caption = ("error: marble-kit's relative KKT residual (pcgrad: distance from the definition); "
                     "torchjd error: its distance from the exact answer (MGDA: objective gap)")
    console.print(table)


def _maybe(value, spec: str) -> str:
    return "–" if value is None else spec.format(value)


@bench_app.command("optimizer")
@user_errors
def optimizer(
    steps: int | None = typer.Option(None, "--steps", help="AdamW steps per seed (default 150; 30 with --policy)."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds."),
    beta1: float = typer.Option(0.9, "--beta1", help="Adam's β1 (0 removes momentum; toy only)."),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", help="AdamW's decoupled weight decay (default 0 on the toy, the trainer's with --policy)."),
    anchor: float | None = typer.Option(
        None, "--anchor", help="Unbalanced pull: ½·a·‖θ‖² on the toy (default 0); with --policy the kl anchor's "
        "weight (default: the trainer's)."),
    max_norm: float | None = typer.Option(
        None, "--grad-clip", help="Gradient clipping norm, 0 = off (default 0 on the toy, the trainer's with --policy)."),
    policy: str | None = typer.Option(
        None, "--policy", help="Measure on real training steps of this policy (tiny-sd3) instead of the toy."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """How often the actual AdamW step conflicts with a reward, per Gram metric, and the worst
    margin of the adam-momentum guarantee (toy problem, or real steps with --policy)."""
    from marble_kit.bench.balancers import optimizer_conflict_benchmark

    if ((steps is not None and steps < 1) or seeds < 1 or not 0.0 <= beta1 < 1.0
            or any(v is not None and v < 0 for v in (weight_decay, anchor, max_norm))):
        raise MarbleError("--steps and --seeds must be ≥ 1, --beta1 in [0, 1), --weight-decay, --anchor "
                          "and --grad-clip ≥ 0")
    if policy is not None:
        from marble_kit.bench.optimizer import policy_optimizer_benchmark

        if beta1 != 0.9:
            raise MarbleError("--beta1 applies to the toy problem only; the trainer's AdamW uses β1 = 0.9")
        report = policy_optimizer_benchmark(steps=steps or 30, seeds=tuple(range(seeds)), policy=policy,
                                            weight_decay=weight_decay, grad_clip=max_norm, kl=anchor)
        rows = report["rows"]
        if json_output:
            print_json(report)
            return
        title = f"MGDA + AdamW on {policy} (prior {report['prior']}): steps with a conflicting reward"
    else:
        rows = optimizer_conflict_benchmark(steps=steps or 150, seeds=tuple(range(seeds)), betas=(beta1, 0.999),
                                            weight_decay=weight_decay or 0.0, anchor=anchor or 0.0,
                                            max_norm=max_norm or 0.0)
        if json_output:
            print_json(rows)
            return
        title = f"MGDA + AdamW (β1 = {beta1}): steps with a conflicting reward"
    table = Table(title=title)
    for column in ("Gram metric", "vs fused gradient", "vs actual update", "mean worst cos (update)",
                   "worst margin steps 0–1", "2–10", ">10"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["metric"], _maybe(row["conflict_rate_fused"], "{:.1%}"),
                      _maybe(row["conflict_rate_update"], "{:.1%}"), _maybe(row["mean_worst_cos_update"], "{:.3f}"),
                      *(_maybe(row[f"worst_margin_steps_{b}"], "{:+.1e}") for b in ("0-1", "2-10", ">10")))
    console.print(table)


# ---------------------------------------------------------------- training benchmarks
DEFAULT_OUT = Path("runs/bench")
POLICY_OPTION = typer.Option("tiny-sd3", "--policy", help="tiny-sd3 (CPU), or sd3.5-arch / flux-arch (GPU, random weights).")
DEVICE_OPTION = typer.Option(None, "--device", help="Policy device (default: the policy's own).")
POLICY_OPT_OPTION = typer.Option(None, "--policy-opt", help="Policy option OPTION=VALUE (repeatable).")
IMAGES_OPTION = typer.Option(None, "--images-per-prompt", help="G images per prompt.")
TIMESTEPS_OPTION = typer.Option(None, "--timesteps-per-image", help="Training timesteps per image.")
SAMPLE_STEPS_OPTION = typer.Option(None, "--sample-steps", help="Sampler steps of each rollout.")


def _batch_overrides(**values: int | None) -> dict:
    """The batch options given (not None), each checked ≥ 1 (``warmup`` ≥ 0)."""
    overrides = {k: v for k, v in values.items() if v is not None}
    for name, value in overrides.items():
        if value < (0 if name == "warmup" else 1):
            raise MarbleError(f"--{name.replace('_', '-')} must be ≥ {0 if name == 'warmup' else 1} (got {value})")
    return overrides


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
    if not targets:
        console.print("targets: none of them compares only the variants measured here", highlight=False)
        return
    table = Table(title="Targets")
    intervals = any(target.get("interval") for target in targets)
    for column in (label, "measured", *(["95 % interval"] if intervals else []), "met"):
        table.add_column(column)
    for target in targets:
        value = target["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else (", ".join(value) or "none"
                                                                 if isinstance(value, list) else str(value))
        name = f"{target['method']}: {target['target']}" if "method" in target else target["target"]
        met = "[green]yes[/]" if target["met"] else "[red]no[/]"
        if target.get("decided") is False:
            met += " (interval straddles)"
        interval = target.get("interval")
        cells = [f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "–"] if intervals else []
        table.add_row(name, shown, *cells, met)
    console.print(table)


def _ratio_cell(row: dict, key: str) -> str:
    lower, upper = row.get(f"ci_speed_{key}") or (float("nan"), float("nan"))
    value = row[f"speed_{key}"]
    if lower == lower and upper == upper:  # not NaN
        return f"{value:.2f}× ({lower:.2f}–{upper:.2f})"
    return f"{value:.2f}×"


@bench_app.command("speed")
@user_errors
def speed(
    policy: str = POLICY_OPTION,
    device: str | None = DEVICE_OPTION,
    policy_opt: list[str] | None = POLICY_OPT_OPTION,
    rounds: int | None = typer.Option(None, "--rounds", help="At most this many measured steps per variant "
                                      "(default 60; 80 for sd3.5-arch / flux-arch)."),
    min_rounds: int | None = typer.Option(None, "--min-rounds", help="At least this many (default 20; 10 for "
                                          "sd3.5-arch / flux-arch), then stop once periodic's interval is within the target "
                                          "(without marble-periodic: at this many). Ctrl-C keeps the rounds done."),
    target_halfwidth: float | None = typer.Option(None, "--target-halfwidth", help="Stop when the 95 % interval "
                                                  "of periodic's whole-step ratio is within ± this (default 0.01; 0: "
                                                  "always --rounds)."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Add no round after this long (default: no limit)."),
    variants: str | None = typer.Option(None, "--variants", help="Comma-separated variants (default the six; "
                                        "also marble-affine-stacked, marble-rows-stacked)."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured rounds first."),
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", help="P prompts per step (same for all variants)."),
    images_per_prompt: int | None = IMAGES_OPTION,
    timesteps_per_image: int | None = TIMESTEPS_OPTION,
    sample_steps: int | None = SAMPLE_STEPS_OPTION,
    kl: float | None = typer.Option(None, "--kl", help="Weight of the reference anchor (default: the trainer's; "
                                    "0 = no anchor and no anchor backward pass)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for speed.json and speed.png."),
    scoring_rounds: int | None = typer.Option(None, "--scoring-rounds", help="Rounds of the scoring section on the CPU proxy (sequential / concurrent / async rewards, K = 2 OCR, one served; default 5 with tiny-sd3, else 0 = skipped)."),
):
    """Time per training step: single reward vs weighted sum / MARBLE affine / periodic / exact / sampled rows at K = 5;
    then the time concurrent and async scoring save."""
    from marble_cli.train_cmd import _single_plugin_options
    from marble_kit.bench.speed import (
        GPU_ARCH_POLICIES,
        SpeedSettings,
        ensure_device,
        plot_speed,
        run_speed_benchmark,
        sd35_arch_settings,
    )

    overrides = _batch_overrides(rounds=rounds, min_rounds=min_rounds, warmup=warmup, prompts_per_step=prompts_per_step,
                                 images_per_prompt=images_per_prompt, timesteps_per_image=timesteps_per_image,
                                 sample_steps=sample_steps)
    if target_halfwidth is not None:
        if not target_halfwidth >= 0:
            raise MarbleError(f"--target-halfwidth must be ≥ 0 (got {target_halfwidth})")
        overrides["target_halfwidth"] = target_halfwidth
    if max_minutes is not None:
        if not max_minutes > 0:
            raise MarbleError(f"--max-minutes must be > 0 (got {max_minutes})")
        overrides["max_seconds"] = 60.0 * max_minutes
    if variants is not None:
        overrides["variants"] = split_names(variants)
    if kl is not None:
        if not kl >= 0:
            raise MarbleError(f"--kl must be ≥ 0 (got {kl})")
        overrides["kl"] = kl
    settings = (sd35_arch_settings(policy=policy, **overrides) if policy in GPU_ARCH_POLICIES
                else SpeedSettings(policy=policy, **overrides))
    options = {**settings.policy_options, **_single_plugin_options(policy_opt, "--policy-opt")}
    if device is not None:
        options["device"] = device
    settings.policy_options = ensure_device(options, policy)
    if scoring_rounds is None:
        scoring_rounds = 5 if policy == "tiny-sd3" else 0
    err_console.print(f"marble bench speed: {policy}, {settings.warmup} + {settings.min_rounds}–{settings.rounds} "
                      f"rounds × {len(settings.variants)} variants", highlight=False)
    try:
        report = run_speed_benchmark(settings, on_round=lambda i, n: err_console.print(f"  round {i}/{n}",
                                                                                       highlight=False))
    except KeyboardInterrupt:
        err_console.print("marble bench speed: interrupted (Ctrl-C) before the first measured round; nothing "
                          "written", highlight=False)
        raise typer.Exit(code=130) from None
    json_path, plot_path = _write_outputs(report, out, "speed", plot_speed)
    stopping = report["stopping"]
    interrupted = stopping["reason"] == "interrupted"
    if interrupted:  # what was measured is kept; the scoring section is not started
        err_console.print(f"marble bench speed: interrupted (Ctrl-C) after {stopping['rounds']} rounds: their "
                          f"results follow and are in {json_path}", highlight=False)
    if json_output:
        print_json(_summary(report))
        if scoring_rounds > 0 and not interrupted:  # its table is not printed; scoring.json holds it
            _scoring_section(policy, settings.policy_options, scoring_rounds, out, quiet=True)
        if interrupted:
            raise typer.Exit(code=130)
        return
    table = Table(title=f"Time per training step (median s) — {_machine_line(report)}", box=box.SIMPLE_HEAD,
                  show_edge=False, collapse_padding=True)
    table.add_column("variant", no_wrap=True)
    for column in ("step", "rollout", "rewards", "update", "grad step", "× step", "× step − rollout",
                   "× grad step", "peak MiB"):
        table.add_column(column, justify="right")
    table.caption = (f"seconds (median, {report['clock']}), then speed vs (a) with its 95 % bootstrap interval "
                     f"over {stopping['rounds']} rounds (stopped: {stopping['reason']}), then peak memory")
    for row in report["rows"]:
        table.add_row(row["label"], *(f"{row[f'median_{k}_s']:.3f}" for k in
                                      ("step", "rollout", "rewards", "update", "gradient_step")),
                      *(_ratio_cell(row, k) for k in ("step", "step_without_rollout", "gradient_step")),
                      f"{row['peak_memory_mb']:.0f}")
    console.print(table)
    _print_targets(report["targets"])
    console.print(f"wrote {json_path} and {plot_path}", highlight=False)
    if interrupted:
        raise typer.Exit(code=130)
    if scoring_rounds > 0:
        _scoring_section(policy, settings.policy_options, scoring_rounds, out)


def _scoring_section(policy: str, policy_options: dict, rounds: int, out: Path, quiet: bool = False) -> None:
    """`bench speed`'s scoring section (marble_kit/bench/scoring.py): its own table and files."""
    from marble_kit.bench.scoring import ScoringSettings, plot_scoring, run_scoring_benchmark

    settings = ScoringSettings(policy=policy, policy_options=dict(policy_options), rounds=rounds)
    err_console.print(f"scoring section: {', '.join(settings.rewards)}, {settings.warmup} + {rounds} rounds × 3 variants",
                      highlight=False)
    report = run_scoring_benchmark(settings, on_round=lambda i, n: err_console.print(f"  round {i}/{n}", highlight=False))
    json_path, plot_path = _write_outputs(report, out, "scoring", plot_scoring)
    if quiet:
        return
    alone = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in report["reward_seconds"].items())
    table = Table(title=f"Scoring the rewards (median s per step; each reward alone: {alone})", box=box.SIMPLE_HEAD)
    for column in ("variant", "step", "rollout", "rewards", "update", "saved / step", "× step", "expected ×"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(row["variant"], *(f"{row[f'median_{k}_s']:.3f}" for k in ("step", "rollout", "rewards", "update")),
                      f"{row['saved_per_step_s']:.3f}", f"{row['speed_step']:.2f}×", f"{row['expected_speed_step']:.2f}×")
    table.caption = ("rewards: the time the rollout did not hide; × step: sequential / variant within each round (one "
                     "machine, shared with other work: ratios, not absolute times); expected: from the sequential phases")
    console.print(table)
    console.print(f"wrote {json_path} and {plot_path}", highlight=False)


@bench_app.command("counts")
@user_errors
def counts(
    policy: str = POLICY_OPTION,
    device: str | None = DEVICE_OPTION,
    policy_opt: list[str] | None = POLICY_OPT_OPTION,
    variants: str | None = typer.Option(None, "--variants", help="Comma-separated variants of `bench speed` "
                                        "(default: all six; on sd3.5-arch profile one per call, ~1 min each)."),
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", help="P prompts per step."),
    images_per_prompt: int | None = IMAGES_OPTION,
    timesteps_per_image: int | None = TIMESTEPS_OPTION,
    sample_steps: int | None = SAMPLE_STEPS_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for counts.json."),
):
    """Operators, kernel launches, casts, host syncs, capture hook calls and rows per phase and
    per pass of one training step per variant (torch.profiler: counts, not timings)."""
    from marble_cli.train_cmd import _single_plugin_options
    from marble_kit.bench.common import write_report
    from marble_kit.bench.counts import PASS_PHASES, PHASES, check_count_targets, run_counts_benchmark
    from marble_kit.bench.speed import GPU_ARCH_POLICIES, SpeedSettings, ensure_device, sd35_arch_settings

    overrides = _batch_overrides(prompts_per_step=prompts_per_step, images_per_prompt=images_per_prompt,
                                 timesteps_per_image=timesteps_per_image, sample_steps=sample_steps)
    base = {"rounds": 1, "warmup": 0, "min_rounds": 1}
    settings = (sd35_arch_settings(policy=policy, **base, **overrides) if policy in GPU_ARCH_POLICIES
                else SpeedSettings(policy=policy, **base, **overrides))
    options = {**settings.policy_options, **_single_plugin_options(policy_opt, "--policy-opt")}
    if device is not None:
        options["device"] = device
    settings.policy_options = ensure_device(options, policy, "counts")
    chosen = split_names(variants) if variants else None
    err_console.print(f"marble bench counts: {policy}, one profiled step per variant", highlight=False)
    def written(report: dict) -> None:  # after every variant: a stage cut short keeps what it measured
        report["targets"] = check_count_targets(report)
        write_report(report, out / "counts.json")

    report = run_counts_benchmark(settings, chosen, on_variant=lambda name: err_console.print(f"  {name}", highlight=False),
                                  on_report=written)
    json_path = out / "counts.json"
    if json_output:
        print_json(report)
        return
    gpu = report["machine"].get("gpu")
    launches = "kernels launched" if gpu else "launching ops"
    syncs = "host syncs" if gpu else "value reads"
    table = Table(title=f"One training step, per phase — {_machine_line(report)}", box=box.SIMPLE_HEAD)
    for column in ("variant", "phase", "passes", "ops", launches, "casts", syncs, "rows"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        for phase in PHASES:
            values = row["phases"].get(phase)
            if values:
                table.add_row(row["variant"], phase, str(values.get("calls", "–")), str(values.get("ops", 0)),
                              str(values.get("launches", 0)), str(values.get("casts", 0)),
                              str(values.get("syncs", 0)), str(values.get("rows", 0) or ""))
        totals = row["totals"]
        kernels = f" (device kernels {row['device_kernels']})" if row["device_kernels"] is not None else ""
        table.add_row(row["variant"], f"step{kernels}", "", str(totals.get("ops", 0)), str(totals.get("launches", 0)),
                      str(totals.get("casts", 0)), str(totals.get("syncs", 0)), str(totals.get("rows", 0)),
                      end_section=True)
    table.caption = (f"{launches}: " + ("CUDA launch and copy calls" if gpu else "top-level operators that "
                     "compute (views and metadata left out)") + f"; {syncs}: " + ("CUDA synchronize calls" if gpu
                     else ".item()/float()/nonzero/bool() of tensors (host syncs if on a GPU)") +
                     "; rows: training rows through the transformer's first block")
    console.print(table)
    passes = Table(title="Per pass (gradient step)", box=box.SIMPLE_HEAD)
    for column in ("variant", "pass", "passes", "ops", launches, "casts", syncs, "rows", "capture calls"):
        passes.add_column(column, justify="right")
    for row in report["rows"]:
        for phase in PASS_PHASES:
            values = row["per_pass"].get(phase)
            if values:
                hooks = row["capture_calls"]
                calls = f"{hooks['forward']} + {hooks['backward']}" if phase == "capture backward" else ""
                passes.add_row(row["variant"], phase, str(values["passes"]),
                               *(f"{values.get(k, 0):.0f}" for k in ("ops", "launches", "casts", "syncs", "rows")),
                               calls)
    passes.caption = "capture calls: the LoRA factor hooks' Python calls in the step (forward + backward)"
    console.print(passes)
    if report["targets"]:
        _print_targets(report["targets"])
    console.print(f"wrote {json_path}", highlight=False)


@bench_app.command("memory")
@user_errors
def memory(
    policy: str = POLICY_OPTION,
    device: str | None = DEVICE_OPTION,
    policy_opt: list[str] | None = POLICY_OPT_OPTION,
    steps: int = typer.Option(3, "--steps", help="Training steps per variant (each in a fresh process)."),
    prompts_per_step: int = typer.Option(8, "--prompts-per-step", help="P prompts per step."),
    images_per_prompt: int = typer.Option(8, "--images-per-prompt", help="G images per prompt."),
    timesteps_per_image: int = typer.Option(4, "--timesteps-per-image", help="Training timesteps per image."),
    sample_steps: int = typer.Option(8, "--sample-steps", help="Sampler steps of each rollout."),
    variants: str | None = typer.Option(None, "--variants", help="Comma-separated variants (default all four; "
                                        "single and marble-affine are needed)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for memory.json."),
):
    """Peak memory of training: single reward vs MARBLE affine / sampled rows / exact at K = 5."""
    from marble_cli.train_cmd import _single_plugin_options
    from marble_kit.bench.common import check_positive, write_report
    from marble_kit.bench.memory import MemorySettings, run_memory_benchmark
    from marble_kit.bench.speed import GPU_ARCH_POLICIES, ensure_device

    check_positive(steps=steps, prompts_per_step=prompts_per_step, images_per_prompt=images_per_prompt,
                   timesteps_per_image=timesteps_per_image, sample_steps=sample_steps)
    options = {"gradient_checkpointing": True}
    if policy in GPU_ARCH_POLICIES:
        options.update({"device": "cuda", "mixed_precision": "bf16"})
    options.update(_single_plugin_options(policy_opt, "--policy-opt"))
    if device is not None:
        options["device"] = device
    settings = MemorySettings(policy=policy, policy_options=ensure_device(options, policy, "memory"), steps=steps,
                              prompts_per_step=prompts_per_step, images_per_prompt=images_per_prompt,
                              timesteps_per_image=timesteps_per_image, sample_steps=sample_steps,
                              **({"variants": split_names(variants)} if variants else {}))
    err_console.print(f"marble bench memory: {policy}, {steps} steps per variant", highlight=False)
    report = run_memory_benchmark(settings, on_variant=lambda name: err_console.print(f"  {name}", highlight=False))
    json_path = write_report(report, out / "memory.json")
    if json_output:
        print_json(report)
        return
    table = Table(title=f"Peak memory — {_machine_line(report)}")
    first = report["rows"][0]
    prefixes = ("", "rss_") if "rss_peak_mb" in first else ("",)  # (the CPU: tensors, then RSS)
    table.add_column("variant", justify="right")
    for prefix in prefixes:
        name = "RSS " if prefix else ""
        for column in (f"{name}peak MiB", "× single", f"{name}gradient phase MiB", "× single"):
            table.add_column(column, justify="right")
    for row in report["rows"]:
        cells = [row["label"]]
        for prefix in prefixes:
            cells += [f"{row[f'{prefix}peak_mb']:.0f}", f"{row[f'{prefix}vs_single']:.2f}×",
                      f"{row[f'{prefix}gradient_peak_mb']:.0f}", f"{row[f'{prefix}gradient_vs_single']:.2f}×"]
        table.add_row(*cells)
    table.caption = f"peak: {first['kind']}; gradient phase: {first['gradient_kind']}" + (
        f"; RSS: {first['rss_kind']} in a second process without the profiler (not deterministic: "
        "the targets use the first figure)" if len(prefixes) > 1 else "")
    console.print(table)
    _print_targets(report["targets"])
    console.print(f"wrote {json_path}", highlight=False)


@bench_app.command("conflict")
@user_errors
def conflict(
    steps: int = typer.Option(30, "--steps", help="Training steps per method and seed."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds (0, 1, ...)."),
    methods: str | None = typer.Option(None, "--methods", help="Comma-separated methods (default: the first six; "
                                       "also marble-unit, marble-none)."),
    eval_images_per_prompt: int = typer.Option(4, "--eval-images-per-prompt", help="Held-out images per prompt."),
    reward_scope: str = typer.Option("judged", "--reward-scope", help="Rows of each reward's loss: judged or all."),
    rewards: str | None = typer.Option(None, "--rewards", help="Comma-separated rewards (default: the default "
                                       "run's, color,shape,centering)."),
    prompts: list[str] | None = typer.Option(None, "--prompts", help="Training prompt sets, as `marble train "
                                             "--prompts` (default: default; world_sharpness is the previous "
                                             "mixture). Repeatable."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for conflict.json and conflict.png."),
):
    """Weighted sum vs MGDA vs MARBLE (EMA, periodic, optimizer-aware) on the tiny policy: per-step
    worst-reward cosines and held-out reward changes."""
    from marble_kit.bench.conflict import (
        DEFAULT_METHODS,
        ConflictSettings,
        plot_conflict,
        run_conflict_benchmark,
    )

    overrides = {"rewards": names_option(rewards, "--rewards"), "prompts": list(prompts or []) or None}
    settings = ConflictSettings(steps=steps, seeds=seeds, eval_images_per_prompt=eval_images_per_prompt,
                                methods=names_option(methods, "--methods") or list(DEFAULT_METHODS),
                                reward_scope=reward_scope, **{k: v for k, v in overrides.items() if v is not None})
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
    steps: int | None = typer.Option(None, "--steps", help="Training steps per seed, driven by `exact` (default 40; 4 for sd3.5-arch / flux-arch)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Number of seeds 0, 1, ... (default 3; 1 for sd3.5-arch / flux-arch)."),
    period: int = typer.Option(10, "--period", help="Solve interval n of the periodic mode."),
    balancer: str = typer.Option("marble", "--balancer", help="Balancer of every mode (marble, mgda-qp)."),
    policy: str = POLICY_OPTION,
    device: str | None = DEVICE_OPTION,
    policy_opt: list[str] | None = POLICY_OPT_OPTION,
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", help="P prompts per step (default 4; 2 for sd3.5-arch / flux-arch)."),
    images_per_prompt: int | None = IMAGES_OPTION,
    timesteps_per_image: int | None = TIMESTEPS_OPTION,
    sample_steps: int | None = SAMPLE_STEPS_OPTION,
    kl: float | None = typer.Option(None, "--kl", help="Weight of the reference anchor (default: the trainer's)."),
    reward_scope: str = typer.Option("judged", "--reward-scope", help="Rows of each reward's loss: judged or all."),
    rows: str = typer.Option("0.5,0.25", "--rows", help="Comma-separated row fractions f of the sampled-Gram modes."),
    fp32_reference: bool = typer.Option(False, "--fp32-reference", help="Also compare exact and affine (mixed "
                                        "precision) with exact in float32 on the same batch."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Directory for fidelity.json and fidelity.png."),
):
    """How `periodic` (stale λ), `affine` and the sampled Gram compare with `exact` every step, on the same batches."""
    from marble_cli.train_cmd import _single_plugin_options
    from marble_kit.bench.fidelity import (
        FidelitySettings,
        plot_fidelity,
        run_fidelity_benchmark,
        sd35_arch_fidelity_settings,
    )
    from marble_kit.bench.speed import GPU_ARCH_POLICIES, ensure_device

    try:
        fractions = [float(f) for f in split_names(rows)]
    except ValueError:
        raise MarbleError(f"--rows {rows!r} must be comma-separated numbers in (0, 1), e.g. --rows 0.5,0.25") from None
    overrides = {"steps": steps, "seeds": seeds, "gram_period": period, "balancer": balancer,
                 "prompts_per_step": prompts_per_step, "images_per_prompt": images_per_prompt,
                 "timesteps_per_image": timesteps_per_image, "sample_steps": sample_steps, "kl": kl,
                 "reward_scope": reward_scope, "fractions": fractions, "fp32_reference": fp32_reference}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for name in ("prompts_per_step", "images_per_prompt", "timesteps_per_image", "sample_steps"):
        if name in overrides and overrides[name] < 1:
            raise MarbleError(f"--{name.replace('_', '-')} must be ≥ 1 (got {overrides[name]})")
    if reward_scope not in ("judged", "all"):
        raise MarbleError(f"--reward-scope {reward_scope!r} is not one of judged, all")
    settings = (sd35_arch_fidelity_settings(policy=policy, **overrides) if policy in GPU_ARCH_POLICIES
                else FidelitySettings(policy=policy, **overrides))
    options = {**settings.policy_options, **_single_plugin_options(policy_opt, "--policy-opt")}
    if device is not None:
        options["device"] = device
    settings.policy_options = ensure_device(options, policy, "fidelity")
    err_console.print(f"marble bench fidelity: {policy}, {balancer}, {settings.seeds} seeds × {settings.steps} steps, "
                      f"period {period}", highlight=False)
    report = run_fidelity_benchmark(settings, on_seed=lambda seed: err_console.print(f"  seed {seed}",
                                                                                     highlight=False))
    json_path, plot_path = _write_outputs(report, out, "fidelity", plot_fidelity)
    if json_output:
        print_json(_summary(report))
        return
    table = Table(title=f"Balancing modes vs exact every step ({balancer}, period {period}, "
                        f"P {settings.prompts_per_step}) — {_machine_line(report)}")
    for column in ("mode", "mean cos(d, d_exact)", "min cos", "mean |Δλ|₁", "max |Δλ|₁",
                   "worst cos < 0", "mean worst cos"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(row["mode"], f"{row['mean_cos_to_exact']:.4f}", f"{row['min_cos_to_exact']:.4f}",
                      f"{row['mean_lambda_l1']:.3f}", f"{row['max_lambda_l1']:.3f}",
                      f"{row['negative_worst_cos']:.0%}", f"{row['mean_worst_cos']:+.3f}")
    console.print(table)
    console.print(f"affine Gram vs exact Gram: max relative error {report['max_gram_relative_error']:.1e}; "
                  f"same active rewards on {report['affine_active_set_agrees']:.0%} of steps; exact λ moves "
                  f"{report['exact_lambda_step_movement']:.3f} (|Δλ|₁) per step", highlight=False)
    for key, value in report.get("precision_vs_fp32", {}).items():
        console.print(f"  vs float32 exact: {key} mean {value['mean']:.3g}, worst {value['worst']:.3g}",
                      highlight=False)
    console.print(f"wrote {json_path} and {plot_path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
