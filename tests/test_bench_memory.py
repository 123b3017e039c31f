"""`marble bench memory`: every variant in a fresh process, one peak per variant, the target."""

from __future__ import annotations

import subprocess
import sys

from marble_kit.bench import memory
from marble_kit.bench.memory import MEMORY_VARIANTS, MemorySettings, run_memory_benchmark, run_variant

SMALL = dict(steps=1, prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2)


def test_a_variant_trains_in_its_own_process_and_reports_its_peak():
    """The real path: a fresh interpreter builds the trainer, trains and prints its peak."""
    variant = next(v for v in MEMORY_VARIANTS if v.name == "marble-affine")
    measured = run_variant(MemorySettings(**SMALL), variant)
    assert measured["device"] == "cpu" and measured["kind"] == "peak RSS growth"
    assert measured["peak_mb"] > 0 and measured["fingerprint"]


def test_the_report_divides_by_the_single_reward_peak_and_checks_the_target(monkeypatch):
    peaks = {"single": 200.0, "marble-affine": 260.0, "marble-rows": 210.0, "marble-exact": 300.0}
    monkeypatch.setattr(memory, "run_variant", lambda settings, variant: {
        "device": "cpu", "kind": "peak RSS growth", "peak_mb": peaks[variant.name], "fingerprint": "abc"})
    seen = []
    report = run_memory_benchmark(MemorySettings(**SMALL), on_variant=seen.append)
    assert seen == [v.name for v in MEMORY_VARIANTS]
    assert {row["variant"]: row["vs_single"] for row in report["rows"]} == {
        "single": 1.0, "marble-affine": 1.3, "marble-rows": 1.05, "marble-exact": 1.5}
    (target,) = report["targets"]
    assert target["threshold"] == 1.25 and target["value"] == 1.3 and target["met"] is False
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
