"""`marble bench speed`: ratios from alternating samples, targets, the CLI smoke run, sd3.5-arch."""

import inspect
import json

import pytest
import torch
from marble_cli.app import app
from typer.testing import CliRunner

from marble_kit.bench.speed import (
    VARIANTS,
    SpeedSettings,
    build_trainers,
    check_targets,
    rotated,
    summarize,
    time_one_step,
)
from marble_kit.errors import MarbleError

runner = CliRunner()
SMALL = ["--rounds", "1", "--warmup", "0", "--prompts-per-step", "1", "--images-per-prompt", "2",
         "--timesteps-per-image", "1", "--sample-steps", "1"]


def _samples(step_seconds: dict[str, float], rewards: float = 0.01) -> dict[str, list[dict]]:
    return {name: [{"step": seconds, "rollout": 0.1, "rewards": rewards, "update": seconds - 0.1 - rewards,
                    "gradient_step": (seconds - 0.1 - rewards) / 2, "peak_memory_mb": 100.0 + i,
                    "gram_mode": "affine"} for i in range(3)]
            for name, seconds in step_seconds.items()}


def test_ratios_are_single_reward_time_over_variant_time():
    seconds = {"single": 1.0, "weighted-sum": 1.0, "marble-affine": 1.25, "marble-periodic": 1.0,
               "marble-exact": 2.0}
    rows = {row["variant"]: row for row in summarize(_samples(seconds))}
    assert [row for row in rows] == [v.name for v in VARIANTS]
    assert rows["single"]["speed_step"] == 1.0
    assert rows["marble-affine"]["speed_step"] == pytest.approx(0.8)
    assert rows["marble-exact"]["speed_step"] == pytest.approx(0.5)
    assert rows["marble-exact"]["speed_step_without_rewards"] == pytest.approx(0.99 / 1.99)
    assert rows["single"]["peak_memory_mb"] == 102.0
    targets = {t["target"]: t for t in check_targets(list(rows.values()))}
    assert targets["(c') periodic whole step ≥ 0.99× single"]["met"]
    assert not targets["(c) affine whole step ≥ 0.85× single"]["met"]
    exact_vs_affine = targets["(d) exact update ≥ 2× slower than (c)"]
    assert exact_vs_affine["value"] == pytest.approx(1.89 / 1.14) and not exact_vs_affine["met"]


def test_rotation_puts_every_variant_in_every_position():
    names = [v.name for v in VARIANTS]
    orders = [rotated(names, i) for i in range(len(names))]
    for position in range(len(names)):
        assert sorted(order[position] for order in orders) == sorted(names)


def test_settings_errors():
    with pytest.raises(MarbleError, match="single reward"):
        SpeedSettings(single_reward="hps")
    with pytest.raises(MarbleError, match="rounds"):
        SpeedSettings(rounds=0)


@pytest.mark.slow
def test_cli_speed_smoke_writes_json_and_plot(tmp_path):
    result = runner.invoke(app, ["bench", "speed", *SMALL, "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [row["variant"] for row in summary["rows"]] == [v.name for v in VARIANTS]
    for row in summary["rows"]:
        assert row["steps"] == 1 and row["median_step_s"] > 0
        assert row["median_update_s"] >= row["median_gradient_step_s"] > 0
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert len(saved["samples"]["marble-exact"]) == 1 and saved["machine"]["cpu_cores"]
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_cli_speed_errors():
    result = runner.invoke(app, ["bench", "speed", "--rounds", "0"])
    assert result.exit_code == 2 and "--rounds" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", "speed", "--policy", "sd3.5-arch"])
        assert result.exit_code == 2 and "GPU" in result.output


def test_cli_speed_sd35_arch_on_cpu_reaches_the_policy_factory(monkeypatch):
    """--device cpu goes through to the factory, which refuses 2 B CPU weights unless told."""
    monkeypatch.delenv("MARBLE_ALLOW_CPU_ARCH", raising=False)
    result = runner.invoke(app, ["bench", "speed", "--policy", "sd3.5-arch", "--device", "cpu"])
    assert result.exit_code == 2 and "MARBLE_ALLOW_CPU_ARCH" in result.output


@pytest.mark.slow
def test_sd35_architecture_bench_is_constructible_on_cpu(monkeypatch):
    """The GPU path with a one-layer SD3.5 Medium transformer: five trainers share one policy.
    (The 384² positional table alone takes ~25 s to build on 2 cores; 32 px images need 16².)"""
    from marble_plugins.policies import sd3

    if "num_layers" not in inspect.signature(sd3.sd35_arch_pipeline).parameters:
        pytest.skip("sd35_arch_pipeline cannot build a reduced layer count in this version")
    monkeypatch.setitem(sd3.SD35_MEDIUM_TRANSFORMER_CONFIG, "pos_embed_max_size", 16)
    pipeline = sd3.sd35_arch_pipeline("cpu", num_layers=1)
    policy = sd3.SD3Policy(pipeline, name="sd3.5-arch", rank=2, device="cpu", resolution=32,
                           max_sequence_length=4, steps=1)
    settings = SpeedSettings(policy="sd3.5-arch", rounds=1, warmup=0, prompts_per_step=1,
                             images_per_prompt=2, timesteps_per_image=1, sample_steps=1)
    trainers = build_trainers(settings, policy=policy)
    assert list(trainers) == [v.name for v in VARIANTS]
    assert all(trainer.policy is policy for trainer in trainers.values())
    sample = time_one_step(trainers["marble-affine"])
    assert sample["gram_mode"] == "affine" and sample["gradient_step"] > 0
