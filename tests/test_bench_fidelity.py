"""`marble bench fidelity`: per-step comparison, periodic shadows, the CLI smoke run."""

import json

import pytest
import torch
from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.bench.fidelity import MODES, ShadowBalancers, compare_step
from marble_kit.registry import build

runner = CliRunner()


def test_compare_step_against_exact():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    lam = {"exact": torch.tensor([0.5, 0.5]), "other": torch.tensor([1.0, 0.0])}
    directions = {"exact": lam["exact"].double() @ grads, "other": torch.tensor([1.0, -0.1], dtype=torch.float64)}
    out = compare_step(grads, directions, lam)
    assert out["exact"] == {"cos_to_exact": pytest.approx(1.0), "lambda_l1": 0.0,
                            "worst_cos": pytest.approx(2 ** -0.5)}
    assert out["other"]["lambda_l1"] == pytest.approx(1.0)
    assert out["other"]["worst_cos"] < 0  # conflicts with the second reward


def test_periodic_shadow_keeps_its_weights_between_solves():
    generator = torch.Generator().manual_seed(0)
    shadows = ShadowBalancers(build("balancer", "mgda-qp", {}, 3), build("balancer", "mgda-qp", {}, 3), period=3)
    seen = []
    for step in range(7):
        g = torch.randn(3, 5, generator=generator, dtype=torch.float64)
        weights, solved = shadows.step(g @ g.T, step)
        seen.append((weights["periodic"].clone(), solved))
        assert torch.allclose(weights["affine"].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert [solved for _, solved in seen] == [True, False, False, True, False, False, True]
    assert torch.equal(seen[0][0], seen[2][0]) and not torch.equal(seen[0][0], seen[3][0])


@pytest.mark.slow
def test_cli_fidelity_smoke_writes_json_and_plot(tmp_path):
    result = runner.invoke(app, ["bench", "fidelity", "--steps", "2", "--seeds", "1", "--period", "2",
                                 "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = {row["mode"]: row for row in summary["rows"]}
    assert list(rows) == list(MODES)
    assert rows["exact"]["mean_lambda_l1"] == 0.0 and rows["exact"]["min_cos_to_exact"] == pytest.approx(1.0)
    # `affine` is the exact Gram from two passes: the same direction up to float error
    assert summary["max_gram_relative_error"] < 1e-3
    assert rows["affine"]["min_cos_to_exact"] > 0.999
    saved = json.loads((tmp_path / "fidelity.json").read_text())
    assert [s["periodic_solved"] for s in saved["runs"][0]["steps"]] == [True, False]
    assert (tmp_path / "fidelity.png").stat().st_size > 0


@pytest.mark.slow
def test_cli_fidelity_on_a_mixed_precision_policy_compares_with_float32(tmp_path):
    """--fp32-reference: bf16-autocast exact and affine gradients against exact in float32 on the
    same batch (the GPU precision study, here with CPU autocast); two prompts per step."""
    result = runner.invoke(app, ["bench", "fidelity", "--steps", "1", "--seeds", "1", "--prompts-per-step", "2",
                                 "--images-per-prompt", "2", "--timesteps-per-image", "1", "--sample-steps", "2",
                                 "--policy-opt", "mixed_precision=bf16", "--fp32-reference", "--rows", "0.5",
                                 "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    precision = summary["precision_vs_fp32"]
    assert set(precision) == {"exact_gram_error_vs_fp32", "exact_direction_cos_vs_fp32",
                              "affine_gram_error_vs_fp32", "affine_direction_cos_vs_fp32"}
    assert precision["exact_gram_error_vs_fp32"]["worst"] > 0  # bf16 really differs from fp32
    # affine (float32 contractions of bf16 cotangents) is no further from float32 than exact is
    # (measured on this batch: Gram errors 0.1129 vs 0.1131, direction cosines 0.8068 vs 0.8069)
    assert (precision["affine_gram_error_vs_fp32"]["worst"]
            <= 1.05 * precision["exact_gram_error_vs_fp32"]["worst"])
    assert (precision["affine_direction_cos_vs_fp32"]["worst"]
            >= precision["exact_direction_cos_vs_fp32"]["worst"] - 0.01)
    assert [row["mode"] for row in summary["rows"]] == ["exact", "affine", "periodic", "rows-0.5", "uniform"]


def test_fidelity_row_fractions_are_checked():
    result = runner.invoke(app, ["bench", "fidelity", "--rows", "0.5,x"])
    assert result.exit_code == 2 and "--rows" in result.output
