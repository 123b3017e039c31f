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
