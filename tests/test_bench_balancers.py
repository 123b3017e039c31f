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
