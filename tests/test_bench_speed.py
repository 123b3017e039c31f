"""`marble bench speed`: ratios from alternating samples, targets, the CLI smoke run, sd3.5-arch, flux-arch."""

import inspect
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.bench.speed import (
    DEFAULT_VARIANTS,
    VARIANTS,
    SpeedSettings,
    bootstrap_interval,
    build_trainers,
    check_targets,
    measure,
    periodic_halfwidth,
    round_order,
    summarize,
    time_one_step,
)
from marble_kit.errors import MarbleError

runner = CliRunner()
SMALL = ["--rounds", "1", "--warmup", "0", "--prompts-per-step", "1", "--images-per-prompt", "2",
         "--timesteps-per-image", "1", "--sample-steps", "1", "--scoring-rounds", "0"]


PASSES = {"marble-affine": 3.0, "marble-exact": 6.0, "marble-rows": 1.5}


def _samples(step_seconds: dict[str, float], rewards: float = 0.01) -> dict[str, list[dict]]:
    return {name: [{"step": seconds, "rollout": 0.1, "rewards": rewards, "update": seconds - 0.1 - rewards,
                    "gradient_step": (seconds - 0.1 - rewards) / 2, "peak_memory_mb": 100.0 + i,
                    "gram_mode": "affine", "backward_passes": PASSES.get(name, 1.0)} for i in range(3)]
            for name, seconds in step_seconds.items()}


def test_ratios_are_single_reward_time_over_variant_time():
    seconds = {"single": 1.0, "weighted-sum": 1.0, "marble-affine": 1.25, "marble-periodic": 1.0,
               "marble-exact": 2.0, "marble-rows": 1.1}
    rows = {row["variant"]: row for row in summarize(_samples(seconds))}
    assert list(rows) == DEFAULT_VARIANTS
    assert rows["single"]["speed_step"] == 1.0
    assert rows["marble-affine"]["speed_step"] == pytest.approx(0.8)
    assert rows["marble-exact"]["speed_step"] == pytest.approx(0.5)
    assert rows["marble-exact"]["speed_step_without_rewards"] == pytest.approx(0.99 / 1.99)
    assert rows["single"]["peak_memory_mb"] == 102.0
    targets = {t["target"]: t for t in check_targets(list(rows.values()))}
    assert targets["(c') periodic whole step ≥ 0.99× single"]["met"]
    assert targets["(c) affine whole step ≥ 0.80× single"]["met"]  # 0.8 exactly
    # one backward pass costs (0.945 − 0.445)/(6 − 1) = 0.1 s, the forward 0.345 s: affine's
    # three passes allow 0.645 s, it took 0.57 s
    limit = targets["(c) affine gradient step ≤ 1.10× its pass-count limit"]
    assert limit["value"] == pytest.approx(0.57 / 0.645) and limit["met"]
    assert targets["(e) rows 0.25 every step, whole step ≥ 0.90× single"]["value"] == pytest.approx(1 / 1.1)
    # gradient steps: rows (1.1 − 0.11)/2 = 0.495 s, affine 0.57 s
    rows_vs_affine = targets["(e) rows 0.25 gradient step ≤ 0.6× affine's (1 + 2·0.25 passes)"]
    assert rows_vs_affine["value"] == pytest.approx(0.495 / 0.57) and not rows_vs_affine["met"]
    exact_vs_affine = targets["(d) exact update ≥ 2× slower than (c)"]
    assert exact_vs_affine["value"] == pytest.approx(1.89 / 1.14) and not exact_vs_affine["met"]


def test_a_subset_of_the_variants_checks_the_targets_it_can():
    """--variants single,marble-affine,marble-rows: the rows-vs-affine target (per round, with its
    interval) and the two whole-step ones of these variants; none that needs periodic or exact."""
    seconds = {"single": 1.0, "marble-affine": 1.25, "marble-rows": 1.1}
    samples = _samples(seconds)
    targets = {t["target"]: t for t in check_targets(summarize(samples), samples)}
    assert sorted(targets) == ["(c) affine whole step ≥ 0.80× single",
                               "(e) rows 0.25 every step, whole step ≥ 0.90× single",
                               "(e) rows 0.25 gradient step ≤ 0.6× affine's (1 + 2·0.25 passes)"]
    rows_vs_affine = targets["(e) rows 0.25 gradient step ≤ 0.6× affine's (1 + 2·0.25 passes)"]
    assert rows_vs_affine["value"] == pytest.approx(0.495 / 0.57) and rows_vs_affine["interval"] is not None
    assert check_targets(summarize(_samples({"single": 1.0, "weighted-sum": 1.0}))) == []


def test_round_orders_are_seeded_shuffles():
    names = [v.name for v in VARIANTS]
    orders = [round_order(names, i) for i in range(20)]
    assert all(sorted(order) == sorted(names) for order in orders)
    assert orders == [round_order(names, i) for i in range(20)]
    # every variant gets to run first and directly after marble-exact at some point
    assert {order[0] for order in orders} == set(names)
    followers = {order[i + 1] for order in orders for i in range(len(names) - 1) if order[i] == "marble-exact"}
    assert followers == set(names) - {"marble-exact"}


def test_speed_ratios_are_medians_of_within_round_ratios():
    """Each round's variant step is compared with the single-reward step of the same round."""
    seconds = dict.fromkeys([v.name for v in VARIANTS], 1.0)
    samples = _samples(seconds)
    for runs, times in ((samples["single"], (1.0, 2.0, 4.0)), (samples["marble-exact"], (4.0, 8.0, 2.0))):
        for run, step in zip(runs, times):
            run["step"] = step
    rows = {row["variant"]: row for row in summarize(samples)}
    # rounds: 1/4, 2/8, 4/2 → median 0.25 (the ratio of the medians would say 2/4 = 0.5)
    assert rows["marble-exact"]["speed_step"] == pytest.approx(0.25)
    assert rows["single"]["speed_step"] == 1.0


def test_settings_errors():
    with pytest.raises(MarbleError, match="single reward"):
        SpeedSettings(single_reward="hps")
    with pytest.raises(MarbleError, match="rounds"):
        SpeedSettings(rounds=0)


@pytest.mark.slow
def test_cli_speed_smoke_writes_json_and_plot(tmp_path):
    result = runner.invoke(app, ["bench", "speed", *SMALL, "--kl", "0", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [row["variant"] for row in summary["rows"]] == DEFAULT_VARIANTS
    assert summary["stopping"]["rounds"] == 1 and summary["clock"].startswith("wall clock")
    for row in summary["rows"]:
        assert row["steps"] == 1 and row["median_step_s"] > 0
        assert row["median_update_s"] >= row["median_gradient_step_s"] > 0
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert len(saved["samples"]["marble-exact"]) == 1 and saved["machine"]["cpu_cores"]
    assert saved["settings"]["kl"] == 0.0
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_cli_speed_errors():
    result = runner.invoke(app, ["bench", "speed", "--rounds", "0"])
    assert result.exit_code == 2 and "--rounds" in result.output
    result = runner.invoke(app, ["bench", "speed", "--kl", "-1"])
    assert result.exit_code == 2 and "--kl" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", "speed", "--policy", "sd3.5-arch"])
        assert result.exit_code == 2 and "GPU" in result.output


def test_cli_speed_sd35_arch_on_cpu_reaches_the_policy_factory(monkeypatch):
    """--device cpu goes through to the factory, which refuses 2 B CPU weights unless told."""
    monkeypatch.delenv("MARBLE_ALLOW_CPU_ARCH", raising=False)
    result = runner.invoke(app, ["bench", "speed", "--policy", "sd3.5-arch", "--device", "cpu"])
    assert result.exit_code == 2 and "MARBLE_ALLOW_CPU_ARCH" in result.output


@pytest.mark.slow
def test_sd35_architecture_bench_is_constructible_on_cpu():
    """The GPU path with a one-layer SD3.5 Medium transformer: five trainers share one policy.
    (The 384² positional table alone takes ~25 s to build on 2 cores; 32 px images need 16².)"""
    from marble_plugins.policies import sd3

    parameters = inspect.signature(sd3.sd35_arch_pipeline).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        pytest.skip("sd35_arch_pipeline takes no transformer overrides in this version")
    pipeline = sd3.sd35_arch_pipeline("cpu", num_layers=1, pos_embed_max_size=16)
    policy = sd3.SD3Policy(pipeline, name="sd3.5-arch", rank=2, device="cpu", resolution=32,
                           max_sequence_length=4, steps=1)
    settings = SpeedSettings(policy="sd3.5-arch", rounds=1, warmup=0, prompts_per_step=1,
                             images_per_prompt=2, timesteps_per_image=1, sample_steps=1)
    trainers = build_trainers(settings, policy=policy)
    assert list(trainers) == DEFAULT_VARIANTS
    assert all(trainer.policy is policy for trainer in trainers.values())
    sample = time_one_step(trainers["marble-affine"])
    assert sample["gram_mode"] == "affine" and sample["gradient_step"] > 0


@pytest.mark.parametrize("bench", ["speed", "memory", "fidelity"])
def test_cli_benches_accept_flux_arch_and_reach_its_factory(bench, monkeypatch):
    """`marble bench speed|memory|fidelity --policy flux-arch`: the GPU defaults, a one-line
    refusal without a GPU, and with --device cpu the factory's own refusal of 12 B CPU weights."""
    monkeypatch.delenv("MARBLE_ALLOW_CPU_ARCH", raising=False)
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", bench, "--policy", "flux-arch"])
        assert result.exit_code == 2 and f"marble bench {bench}: --policy flux-arch needs a CUDA GPU" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    if bench != "memory":  # memory builds each variant in a fresh process: the same factory, 2 s more
        result = runner.invoke(app, ["bench", bench, "--policy", "flux-arch", "--device", "cpu"])
        assert result.exit_code == 2 and "'flux-arch'" in result.output and "MARBLE_ALLOW_CPU_ARCH" in result.output


@pytest.mark.slow
def test_flux_architecture_bench_is_constructible_on_cpu():
    """The GPU path with FLUX.1-dev's transformer shrunk to one block of each stream type and two
    heads (the widths of its text inputs, rotary axes and VAE as they are): six trainers share it."""
    from marble_plugins.policies import flux

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline = flux.flux_arch_pipeline("cpu", num_layers=1, num_single_layers=1, num_attention_heads=2)
    policy = flux.FluxPolicy(pipeline, name="flux-arch", rank=2, device="cpu", resolution=32,
                             max_sequence_length=4, steps=1)
    assert policy.guidance_embeds and policy.latent_shape(1) == (1, 16, 4, 4)
    settings = SpeedSettings(policy="flux-arch", rounds=1, warmup=0, prompts_per_step=1,
                             images_per_prompt=2, timesteps_per_image=1, sample_steps=1)
    trainers = build_trainers(settings, policy=policy)
    assert all(trainer.policy is policy for trainer in trainers.values())
    sample = time_one_step(trainers["marble-affine"])
    assert sample["gram_mode"] == "affine" and sample["gradient_step"] > 0


def test_weights_fingerprint_ignores_lora_and_sees_base_weights():
    from marble_kit.bench.common import weights_fingerprint

    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"base": torch.nn.Linear(3, 3), "lora_A": torch.nn.Linear(3, 1)})
    before = weights_fingerprint(module)
    with torch.no_grad():
        module["lora_A"].weight.add_(1.0)
    assert weights_fingerprint(module) == before
    with torch.no_grad():
        module["base"].weight.add_(1.0)
    assert weights_fingerprint(module) != before
    assert weights_fingerprint(module, max_parameters=5) is None


def test_policy_fingerprint_sees_a_change_of_the_decoder_alone():
    from marble_kit.bench.common import policy_fingerprint
    from marble_kit.registry import build

    policy = build("policy", "tiny-sd3", {"seed": 0})
    before, bias = policy_fingerprint(policy), policy.pipeline.vae.decoder.conv_out.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1e-3)  # the transformer is untouched
    assert policy_fingerprint(policy) != before
    with torch.no_grad():
        bias.copy_(saved)
    assert policy_fingerprint(policy) == before


def test_bootstrap_interval_covers_the_median_and_narrows_with_rounds():
    import random

    rng = random.Random(3)
    few = [1.0 + rng.gauss(0, 0.05) for _ in range(10)]
    many = [1.0 + rng.gauss(0, 0.05) for _ in range(400)]
    low, high = bootstrap_interval(few)
    assert low <= sorted(few)[5] <= high and low < high
    low_many, high_many = bootstrap_interval(many)
    assert high_many - low_many < (high - low) / 2  # ~1/sqrt(n)
    assert bootstrap_interval(few) == (low, high)  # seeded
    assert all(math.isnan(v) for v in bootstrap_interval([1.0]))
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_every_ratio_has_an_interval_and_the_rollout_can_be_left_out():
    seconds = dict.fromkeys(DEFAULT_VARIANTS, 1.0)
    samples = _samples(seconds)
    for i, run in enumerate(samples["marble-periodic"]):  # a slow rollout only: same work otherwise
        run["rollout"] += 0.5 * (i + 1)
        run["step"] += 0.5 * (i + 1)
    rows = {row["variant"]: row for row in summarize(samples)}
    periodic = rows["marble-periodic"]
    assert periodic["speed_step"] == pytest.approx(1 / 2.0)
    assert periodic["speed_step_without_rollout"] == pytest.approx(1.0)
    for key in ("step", "step_without_rewards", "step_without_rollout", "update", "gradient_step", "mean_step"):
        lower, upper = periodic[f"ci_speed_{key}"]
        assert lower <= periodic[f"speed_{key}"] <= upper
    targets = {t["target"]: t for t in check_targets(list(rows.values()), samples)}
    whole, without = (targets[f"(c') periodic {what} ≥ 0.99× single"] for what in ("whole step", "step − rollout"))
    assert not whole["met"] and whole["decided"] and whole["interval"][1] < 0.99
    assert without["met"] and without["interval"] == pytest.approx([1.0, 1.0])


def test_measurement_stops_once_periodics_interval_is_narrow_enough():
    class Clockwork:
        def __init__(self, seconds):
            self.seconds = seconds

    steps = []

    def fake_step(trainer):
        steps.append(trainer)
        return {"step": trainer.seconds, "rollout": 0.1, "rewards": 0.0, "update": 0.5, "gradient_step": 0.3,
                "peak_memory_mb": 1.0, "gram_mode": "affine", "backward_passes": 1.0}

    import marble_kit.bench.speed as speed

    original = speed.time_one_step
    speed.time_one_step = fake_step
    try:
        trainers = {"single": Clockwork(1.0), "marble-periodic": Clockwork(1.0)}
        stop = lambda samples: len(samples["single"]) >= 3 and periodic_halfwidth(samples) <= 0.01  # noqa: E731
        samples, reason = measure(trainers, rounds=50, warmup=1, stop=stop)
    finally:
        speed.time_one_step = original
    assert reason == "stop"  # a warm-up round, then 3 (identical ratios)
    assert len(samples["single"]) == 3 and len(steps) == 2 * 4
    assert periodic_halfwidth(samples) == 0.0


# ------------------------------------------------------------------ stopping: no periodic, Ctrl-C

@pytest.fixture(scope="module")
def tiny_policy():
    from marble_kit.registry import build

    return build("policy", "tiny-sd3", {"seed": 0})


def _clockwork_steps(monkeypatch, interrupt_at: int | None = None) -> list:
    """time_one_step replaced by fixed timings (one call per variant and round); the call
    numbered ``interrupt_at`` (from 1) raises KeyboardInterrupt, as a Ctrl-C inside a step does."""
    import marble_kit.bench.speed as speed

    calls = []

    def fake_step(trainer):
        calls.append(trainer)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return {"step": 1.0 + 0.01 * (len(calls) % 3), "rollout": 0.1, "rewards": 0.0, "update": 0.5,
                "gradient_step": 0.3, "peak_memory_mb": 1.0, "gram_mode": "none", "backward_passes": 1.0}

    monkeypatch.setattr(speed, "time_one_step", fake_step)
    return calls


def test_without_the_periodic_variant_the_bench_stops_at_min_rounds_and_says_so(tiny_policy, monkeypatch):
    """The adaptive rule tracks periodic's interval; without periodic there is none to track."""
    from marble_kit.bench.speed import run_speed_benchmark

    _clockwork_steps(monkeypatch)
    settings = SpeedSettings(rounds=6, min_rounds=3, warmup=0, variants=["single", "weighted-sum"])
    stopping = run_speed_benchmark(settings, policy=tiny_policy)["stopping"]
    assert stopping["rounds"] == 3 and stopping["reason"] == "min rounds (no marble-periodic variant)"
    assert stopping["periodic_halfwidth"] is None
    # with the interval rule off it runs every round; with periodic it reports its interval
    settings = SpeedSettings(rounds=4, min_rounds=2, warmup=0, target_halfwidth=0.0,
                             variants=["single", "weighted-sum"])
    stopping = run_speed_benchmark(settings, policy=tiny_policy)["stopping"]
    assert stopping["rounds"] == 4 and stopping["reason"] == "max rounds" and stopping["periodic_halfwidth"] is None
    settings = SpeedSettings(rounds=6, min_rounds=3, warmup=0, target_halfwidth=0.5,
                             variants=["single", "marble-periodic"])
    stopping = run_speed_benchmark(settings, policy=tiny_policy)["stopping"]
    assert stopping["rounds"] == 3 and stopping["reason"] == "interval" and 0 <= stopping["periodic_halfwidth"] <= 0.5


def test_measure_keeps_the_rounds_finished_before_a_ctrl_c(monkeypatch):
    # two variants: 2 warm-up rounds and 2 measured ones, then a Ctrl-C in the second step of the third
    calls = _clockwork_steps(monkeypatch, interrupt_at=2 * 2 + 2 * 2 + 2)
    trainers = {"single": object(), "weighted-sum": object()}
    samples, reason = measure(trainers, rounds=10, warmup=2)
    assert reason == "interrupted" and len(calls) == 10
    # the round the Ctrl-C cut is dropped: every variant has the same complete rounds
    assert [len(runs) for runs in samples.values()] == [2, 2]
    calls = _clockwork_steps(monkeypatch, interrupt_at=3)  # still warming up: nothing to keep
    with pytest.raises(KeyboardInterrupt):
        measure(trainers, rounds=10, warmup=2)


def test_cli_speed_interrupted_writes_and_prints_the_finished_rounds(tiny_policy, monkeypatch, tmp_path):
    import marble_kit.bench.speed as speed

    monkeypatch.setattr(speed, "build_policy", lambda config: tiny_policy)
    _clockwork_steps(monkeypatch, interrupt_at=2 * 3 + 1)  # three rounds of single + weighted-sum, then Ctrl-C
    result = runner.invoke(app, ["bench", "speed", "--variants", "single,weighted-sum", "--rounds", "10",
                                 "--warmup", "0", "--scoring-rounds", "5", "--out", str(tmp_path)])
    assert result.exit_code == 130, result.output
    assert "interrupted (Ctrl-C) after 3 rounds" in result.output and "Traceback" not in result.output
    assert "scoring section" not in result.output  # it stops there
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["stopping"]["reason"] == "interrupted" and saved["stopping"]["rounds"] == 3
    assert [row["steps"] for row in saved["rows"]] == [3, 3] and (tmp_path / "speed.png").stat().st_size > 0
    assert not (tmp_path / "scoring.json").exists()
    # a Ctrl-C before the first measured round: nothing to keep, one line
    _clockwork_steps(monkeypatch, interrupt_at=1)
    result = runner.invoke(app, ["bench", "speed", "--variants", "single,weighted-sum", "--out", str(tmp_path / "b")])
    assert result.exit_code == 130 and "before the first measured round" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b" / "speed.json").exists()
