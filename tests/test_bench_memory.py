"""`marble bench memory`: every variant in a fresh process, one peak per variant, the target."""

from __future__ import annotations

import subprocess
import sys

from marble_kit.bench import memory
from marble_kit.bench.memory import MEMORY_VARIANTS, MemorySettings, run_memory_benchmark, run_variant

SMALL = dict(steps=1, prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2)


def test_a_variant_trains_in_its_own_process_and_reports_its_peak():
    """The real path: fresh interpreters build the trainer, train and print their peaks — on the
    CPU the tensors' bytes (the same in a second run: the targets' figure is deterministic) and
    the RSS figures beside them."""
    variant = next(v for v in MEMORY_VARIANTS if v.name == "marble-affine")
    settings = MemorySettings(**SMALL)
    measured = run_variant(settings, variant)
    assert measured["device"] == "cpu" and measured["kind"] == "peak tensor memory growth"
    assert measured["rss_kind"] == "peak RSS growth" and measured["rss_peak_mb"] > 0
    assert measured["peak_mb"] > 0 and measured["fingerprint"]
    assert 0 < measured["gradient_peak_mb"] <= measured["peak_mb"]
    again = memory._run_probe(settings, variant, "tensors")
    assert (again["peak_mb"], again["gradient_peak_mb"]) == (measured["peak_mb"], measured["gradient_peak_mb"])


def test_tensor_peaks_are_the_highest_totals_over_the_start_and_over_each_phase():
    """Allocation events (time, ±bytes), shuffled: the totals held after each are 10, 30, 20,
    70, 40, 90, 50, 60 (at t = 10, 20, 30, 40, 50, 55, 60, 70)."""
    events = [(10, 10), (20, 20), (30, -10), (40, 50), (50, -30), (55, 50), (60, -40), (70, 10)]
    shuffled = events[3:] + events[:3]
    whole, gradient = memory.tensor_peaks(shuffled, start=25, phases=[(45, 58), (65, 80)])
    assert whole == 90 - 30  # highest total after t = 25 (90 at t = 55) minus the total at 25 (30)
    assert gradient == 90 - 70  # phase 1: 90 at 55 over 70 held when it began; phase 2: 60 − 50
    assert memory.tensor_peaks(events, start=100, phases=[]) == (0.0, 0.0)


def test_the_cpu_probe_finds_known_allocations_inside_and_outside_the_gradient_phase():
    """A stand-in trainer whose build keeps 32 MiB and frees 64 MiB (neither is growth), then
    holds 4 MiB across a phase that allocates 8 MiB, and allocates 16 MiB after it: the whole
    peak is 4 + 16 MiB, the phase's 8 MiB."""
    import torch

    class Built:
        phase_hook = None

    def build():
        built = Built()
        built.kept = torch.ones(8 * 2**20)  # 32 MiB of float32
        scratch = torch.ones(16 * 2**20)
        del scratch
        return built

    def run(built):
        held = torch.ones(2**20)
        built.phase_hook("gradient_step:start")
        inside = torch.ones(2 * 2**20)
        del inside
        built.phase_hook("gradient_step:end")
        after = torch.ones(4 * 2**20)
        del after, held

    whole, gradient, built = memory.profiled_tensor_peaks(build, run)
    assert isinstance(built, Built)
    assert abs(whole - 20.0) < 0.1 and abs(gradient - 8.0) < 0.1, (whole, gradient)


def test_phase_peaks_split_the_gradient_phase_from_the_rest(monkeypatch):
    """The CPU probe: the gradient phase's peak is its own HWM minus the RSS at its start; the
    whole step's peak is the highest HWM read before, at the end of and after the phase."""
    import torch

    readings = iter([("VmHWM", 500.0), ("VmRSS", 300.0), ("VmHWM", 420.0), ("VmHWM", 350.0)])

    def rss(key):
        expected, value = next(readings)
        assert key == expected
        return value

    monkeypatch.setattr(memory, "_rss_mb", rss)
    monkeypatch.setattr(memory, "reset_peak_memory", lambda device: None)
    peaks = memory.PhasePeaks(torch.device("cpu"))
    peaks("gradient_step:start")
    peaks("gradient_step:end")
    peaks("rollout")  # other boundaries are ignored
    assert peaks.gradient == 120.0 and peaks.whole() == 500.0


def test_the_report_divides_by_the_single_reward_peak_and_checks_the_target(monkeypatch):
    peaks = {"single": 200.0, "marble-affine": 260.0, "marble-rows": 210.0, "marble-exact": 300.0}
    gradient = {"single": 40.0, "marble-affine": 44.0, "marble-rows": 40.0, "marble-exact": 80.0}
    monkeypatch.setattr(memory, "run_variant", lambda settings, variant: {
        "device": "cpu", "kind": "peak tensor memory growth", "peak_mb": peaks[variant.name], "fingerprint": "abc",
        "gradient_kind": "peak tensor memory growth within the gradient phase",
        "gradient_peak_mb": gradient[variant.name], "rss_kind": "peak RSS growth",
        "rss_peak_mb": 2 * gradient[variant.name], "rss_gradient_peak_mb": peaks[variant.name]})
    seen = []
    report = run_memory_benchmark(MemorySettings(**SMALL), on_variant=seen.append)
    assert seen == [v.name for v in MEMORY_VARIANTS]
    assert {row["variant"]: row["vs_single"] for row in report["rows"]} == {
        "single": 1.0, "marble-affine": 1.3, "marble-rows": 1.05, "marble-exact": 1.5}
    assert {row["variant"]: row["gradient_vs_single"] for row in report["rows"]} == {
        "single": 1.0, "marble-affine": 1.1, "marble-rows": 1.0, "marble-exact": 2.0}
    # the RSS figures get their own ratios and never decide a target
    assert {row["variant"]: row["rss_vs_single"] for row in report["rows"]} == {
        "single": 1.0, "marble-affine": 1.1, "marble-rows": 1.0, "marble-exact": 2.0}
    assert {row["variant"]: row["rss_gradient_vs_single"] for row in report["rows"]}["marble-affine"] == 1.3
    whole, phase = report["targets"]
    assert whole["threshold"] == 1.25 and whole["value"] == 1.3 and whole["met"] is False
    assert "gradient-phase" in phase["target"] and phase["value"] == 1.1 and phase["met"] is True
    assert report["policy_fingerprint"] == "abc" and report["machine"]["torch_threads"] == 1


def test_cli_bench_memory_a_failing_variant_is_one_line_naming_it(tmp_path):
    """A variant whose process fails (here: a policy option the policy does not take) ends the
    command with one line naming the variant and the child's own last line, not a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "marble_cli.app", "bench", "memory", "--steps", "1", "--policy-opt",
         "no_such_option=1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "error: memory bench: variant single failed in its process" in output and "no_such_option" in output
    assert "Traceback" not in output
