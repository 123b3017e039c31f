"""`marble train`: flags and/or a TOML config → marble_kit.run.train."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from marble_cli.common import console, names_option, user_errors
from marble_kit.config import TrainConfig, read_toml, resolve_config
from marble_kit.errors import MarbleError
from marble_kit.options import merge_options, parse_plugin_options, parse_value
from marble_kit.reward_protocol import TRANSPORT_OPTIONS
from marble_kit.tracking import TENSORBOARD_DIR


def _single_plugin_options(items: list[str] | None, flag: str) -> dict:
    """`--balancer-opt rho=0.5` (no plugin prefix: there is one balancer / one policy)."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MarbleError(f"{flag} {item!r} is malformed; write it as OPTION=VALUE (e.g. {flag} rho=0.7)")
        options[key.strip()] = parse_value(value.strip())
    return options


def build_config(config_file: Path | None, overrides: dict, reward_opts: list[str] | None,
                 balancer_opts: list[str] | None, policy_opts: list[str] | None,
                 settings: list[str] | None) -> TrainConfig:
    """Defaults ← TOML file ← `--set key=value` ← explicit flags ← plugin options."""
    config_file = resolve_config(config_file) if config_file else None
    data = read_toml(config_file) if config_file else {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MarbleError(f"--set {item!r} is malformed; write it as KEY=VALUE (e.g. --set beta=0.5)")
        data[key.strip()] = parse_value(value.strip())
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "out" not in data:  # a fresh directory per run unless told otherwise
        data["out"] = f"runs/marble-{time.strftime('%Y%m%d-%H%M%S')}"
    data["reward_options"] = merge_options(data.get("reward_options", {}),
                                           parse_plugin_options(reward_opts, "--reward-opt"))
    data["balancer_options"] = {**data.get("balancer_options", {}),
                                **_single_plugin_options(balancer_opts, "--balancer-opt")}
    data["policy_options"] = {**data.get("policy_options", {}),
                              **_single_plugin_options(policy_opts, "--policy-opt")}
    return TrainConfig.from_dict(data, source=str(config_file) if config_file else "command line")


@user_errors
def train(
    config_file: Path | None = typer.Option(None, "--config", "-c", help="TOML config file (keys of TrainConfig), or a shipped one by name: sd35-marble, sd35-equal-alpha."),
    rewards: str | None = typer.Option(None, "--rewards", "-r", help="Comma-separated reward plugins."),
    balancer: str | None = typer.Option(None, "--balancer", "-b", help="Balancer plugin (marble, mgda-qp, weighted-sum, ...)."),
    policy: str | None = typer.Option(None, "--policy", "-p", help="Policy plugin (tiny-sd3, sd3.5, flux, ...)."),
    prompts: list[str] | None = typer.Option(None, "--prompts", help="Prompt set: built-in name, .txt/.jsonl file or .toml manifest; FILE:reward1+reward2 tags its rewards. Repeatable."),
    steps: int | None = typer.Option(None, "--steps", "-n", help="Optimizer steps."),
    out: str | None = typer.Option(None, "--out", "-o", help="Run directory (default runs/marble-<time>)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    gram: str | None = typer.Option(None, "--gram", help="Gram mode: affine, exact, periodic, none."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the run."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    reward_opt: list[str] | None = typer.Option(None, "--reward-opt", help="Reward option NAME.OPTION=VALUE (repeatable)."),
    balancer_opt: list[str] | None = typer.Option(None, "--balancer-opt", help="Balancer option OPTION=VALUE (repeatable)."),
    policy_opt: list[str] | None = typer.Option(None, "--policy-opt", help="Policy option OPTION=VALUE (repeatable)."),
    settings: list[str] | None = typer.Option(None, "--set", help="Any config key KEY=VALUE (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    report_to: str | None = typer.Option(None, "--report-to", help="Also log to experiment trackers: tensorboard, wandb (comma-separated) or none; may change on --resume."),
):
    """Fine-tune a policy with MARBLE (defaults: tiny-sd3, offline specialist rewards, marble balancer)."""
    from marble_kit.distributed import CollectiveError, Distributed
    from marble_kit.run import read_run_config
    from marble_kit.run import train as run_train

    overrides = {"rewards": names_option(rewards, "--rewards"), "balancer": balancer, "policy": policy,
                 "prompts": prompts or None, "steps": steps, "out": out, "gram": gram, "seed": seed, "lr": lr,
                 "report_to": report_to}
    if resume is not None:
        base = read_run_config(resume)
        moved = parse_plugin_options(reward_opt, "--reward-opt")  # a remote reward's server may move
        if all(name.startswith("remote:") and set(opts) <= set(TRANSPORT_OPTIONS) for name, opts in moved.items()):
            base = base.replace(reward_options=merge_options(base.reward_options, moved))
            reward_opt = None
        changed = [k for k, v in overrides.items() if v is not None and k not in ("steps", "out", "report_to")]
        changed += [flag for flag, given in (("--reward-opt", reward_opt), ("--balancer-opt", balancer_opt),
                                             ("--policy-opt", policy_opt), ("--config", config_file),
                                             ("--set", settings)) if given]
        if out is not None and Path(out).resolve() != resume.resolve():
            changed.append("--out")
        if changed:
            raise MarbleError(f"--resume {resume} continues that run with its own config; only --steps and "
                              f"--report-to may be given (got {', '.join(changed)}), and for a remote reward "
                              f"whose server moved --reward-opt remote:NAME.url=URL (or {', '.join(TRANSPORT_OPTIONS[1:])})")
        config = base.replace(out=str(resume), steps=steps or base.steps,
                              report_to=base.report_to if report_to is None else report_to)
    else:
        config = build_config(config_file, overrides, reward_opt, balancer_opt, policy_opt, settings)
    dist = Distributed.from_environment()
    try:  # the run prints its header once every check has passed (an error comes alone)
        result = run_train(config, resume=resume is not None, progress=progress, dist=dist, console=console)
    except CollectiveError as exc:  # a peer died or hung: leave without teardown
        dist.exit_after_collective_failure(exc)
    finally:
        dist.close()
    if dist.is_main:
        last = result.history[-1] if result.history else {}
        status = "interrupted — checkpoint saved" if result.interrupted else "done"
        console.print(f"[bold green]{status}[/]: {len(result.history)} steps, run directory {result.run_dir}",
                      highlight=False)
        if result.checkpoint is not None:
            console.print(f"  checkpoint {result.checkpoint}  (resume: marble train --resume {result.run_dir})",
                          highlight=False, soft_wrap=True)
        if "tensorboard" in config.report_to:
            console.print(f"  tensorboard --logdir {result.run_dir / TENSORBOARD_DIR}", highlight=False,
                          soft_wrap=True)
        for name in config.rewards:
            value = last.get(f"reward/{name}")
            if isinstance(value, float):
                console.print(f"  {name:<24} last-step mean reward {value:.4f}", highlight=False)
    if result.interrupted:
        raise typer.Exit(code=130)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
