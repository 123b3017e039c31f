"""`marble bench balancers` / `optimizer` and the library functions behind them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.bench.balancers import (
    benchmark_balancers,
    optimizer_conflict_benchmark,
    write_json,
)

runner = CliRunner()


def test_benchmark_rows_and_json(tmp_path):
    rows = benchmark_balancers([2, 4], repeats=5, warmup=2)
    assert [(row["K"], row["balancer"]) for row in rows] == [
        (k, name) for k in (2, 4) for name in ("mgda-qp", "upgrad", "pcgrad", "cagrad")]
    for row in rows:
        assert row["median_ms"] > 0 and row["torchjd_median_ms"] > 0
        assert row["max_error"] < 1e-9  # every marble-kit balancer exact
        if row["balancer"] in ("upgrad", "cagrad"):
            assert row["torchjd_max_error"] is not None
    saved = json.loads(write_json(rows, tmp_path / "qp.json").read_text())
    assert saved["rows"] == rows and "osqp" in saved["machine"] and saved["machine"]["torchjd"] == "0.18.0"


def test_cli_bench_balancers_table_json_and_errors(tmp_path):
    result = runner.invoke(app, ["bench", "balancers", "--max-k", "3", "--repeats", "3"])
    assert result.exit_code == 0, result.output
    assert "torchjd ms" in result.output and "cagrad" in result.output
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "balancers", "--max-k", "3", "--repeats", "3", "--json",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted({row["K"] for row in json.loads(result.output)["rows"]}) == [2, 3]
    assert out.exists()
    result = runner.invoke(app, ["bench", "balancers", "--max-k", "1"])
    assert result.exit_code == 2 and "--max-k" in result.output


def test_momentum_aware_gram_removes_most_actual_step_conflicts():
    """The measured claim of notes/conflict-experiment.md on a toy: with β1 = 0.9 MGDA's
    conflict-free fused gradient still gives conflicting AdamW steps; the adam-momentum Gram
    balances the step itself."""
    rows = {row["metric"]: row for row in optimizer_conflict_benchmark(steps=60, seeds=(0,))}
    assert rows["euclidean"]["conflict_rate_fused"] == 0.0
    assert rows["euclidean"]["conflict_rate_update"] > 0.2
    assert rows["adam-momentum"]["conflict_rate_update"] < 0.5 * rows["euclidean"]["conflict_rate_update"]
    assert rows["adam-momentum"]["mean_worst_cos_update"] > rows["euclidean"]["mean_worst_cos_update"]
    no_momentum = optimizer_conflict_benchmark(("euclidean",), steps=40, seeds=(0,), betas=(0.0, 0.999))
    assert no_momentum[0]["conflict_rate_update"] == 0.0


def test_cli_bench_optimizer_runs():
    result = runner.invoke(app, ["bench", "optimizer", "--steps", "5", "--seeds", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert {row["metric"] for row in json.loads(result.output)} == {"euclidean", "adam", "adam-momentum"}


def test_the_optimizer_bench_on_real_training_steps():
    """`marble bench optimizer --policy tiny-sd3`: the trainer's own steps. Fresh MGDA never
    conflicts with its fused gradient; with a single reward d = g, so the margin of AdamW's step
    is exactly 0 whatever the metric (a check of λ's normalization and the margin's formula)."""
    from marble_kit.bench.optimizer import policy_optimizer_benchmark

    report = policy_optimizer_benchmark(steps=3, seeds=(0,))
    rows = {row["metric"]: row for row in report["rows"]}
    assert report["prior"] and report["overrides"] == {}
    assert rows["euclidean"]["steps"] == rows["adam-momentum"]["steps"] == 3
    assert rows["euclidean"]["conflict_rate_fused"] == 0.0
    for row in rows.values():  # Σ λ_k (⟨g_k,u⟩ − ⟨d,u⟩) = 0, so the worst reward's margin is ≤ 0
        assert all(row[f"worst_margin_steps_{b}"] <= 1e-12 for b in ("0-1", "2-10"))
    # min-norm d is no longer than any g_k, so plain MGDA's margin is ≥ −2
    assert all(rows["euclidean"][f"worst_margin_steps_{b}"] >= -2.0 for b in ("0-1", "2-10"))
    single = policy_optimizer_benchmark(steps=2, seeds=(0,), rewards=("centering",), kl=0.0)
    for row in single["rows"]:
        assert row["steps"] == 2 and abs(row["worst_margin_steps_0-1"]) < 1e-9, row


def test_cli_bench_optimizer_policy_refuses_a_toy_only_option():
    result = runner.invoke(app, ["bench", "optimizer", "--policy", "tiny-sd3", "--beta1", "0"])
    assert result.exit_code == 2 and "--beta1" in result.output
