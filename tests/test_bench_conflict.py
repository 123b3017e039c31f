"""`marble bench conflict`: the diagnosed trainer, held-out changes, summaries, the CLI smoke run."""

import json

import pytest
import torch
from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.bench.common import build_policy, components_for
from marble_kit.bench.conflict import (
    METHODS,
    ConflictSettings,
    DiagnosedTrainer,
    change_in_base_std,
    check_targets,
    run_conflict_benchmark,
    summarize,
)
from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.trainer import Trainer

runner = CliRunner()
TINY = {"prompts_per_step": 2, "images_per_prompt": 2, "timesteps_per_image": 1, "sample_steps": 2,
            "out": "unused", "steps": 2, "seed": 5}


def _params(trainer):
    return torch.cat([p.detach().reshape(-1) for p in trainer.params])


@pytest.mark.slow
def test_diagnosed_cosines_match_the_trainers_own_on_the_same_step():
    """Weighted sum through the one-backward path (measured by the bench) and through the Gram
    path (measured by the trainer) take the same step and report the same cosines."""
    results = {}
    for gram, cls in (("affine", Trainer), ("none", DiagnosedTrainer)):
        config = TrainConfig(**TINY, balancer="weighted-sum", gram=gram)
        policy = build_policy(config)
        trainer = cls(config, components_for(config, policy))
        results[gram] = [trainer.step() for _ in range(2)]
    rewards = TrainConfig().rewards
    for own, measured in zip(results["affine"], results["none"]):
        assert "cos_measured_by_bench" in measured and "cos_measured_by_bench" not in own
        # A reward that judged no sample of the batch, right after the old policy caught up
        # (v_θ = v_old), has a gradient of float noise whose direction means nothing: skip it.
        norms = {n: own[f"grad_norm/{n}"] for n in rewards}
        live = [n for n in rewards if norms[n] > 1e-3 * max(norms.values())]
        assert len(live) >= 2
        for name in live:
            for prefix in ("cos", "cos_update"):
                key = f"{prefix}/{name}"
                assert measured[key] == pytest.approx(own[key], abs=2e-3), key


@pytest.mark.slow
def test_diagnosis_leaves_the_summed_reward_update_unchanged():
    params = {}
    for cls in (Trainer, DiagnosedTrainer):
        config = TrainConfig(**TINY, balancer="weighted-sum", balancer_options={"mode": "summed-reward"})
        trainer = cls(config, components_for(config, build_policy(config)))
        metrics = trainer.step()
        params[cls] = _params(trainer)
    assert torch.equal(params[Trainer], params[DiagnosedTrainer])
    assert -1.0 <= metrics["cos/worst"] <= 1.0 and -1.0 <= metrics["cos_update/worst"] <= 1.0
    assert metrics["cos/worst"] == min(metrics[f"cos/{n}"] for n in config.rewards)


def test_change_in_base_std():
    base = torch.tensor([[0.0, 1.0, 2.0], [1.0, float("nan"), 1.0]])
    tuned = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    change = change_in_base_std(base, tuned)
    assert change[0] == pytest.approx(1.0 / (2.0 / 3.0) ** 0.5)
    assert change[1] != change[1]  # zero base spread: undefined, not infinite


def _run(method, cos, cos_update, changes, seed=0):
    steps = [{"cos_worst": c, "cos_update_worst": u, "gram_mode": "affine"} for c, u in zip(cos, cos_update)]
    return {"method": method, "seed": seed, "steps": steps, "change_in_base_std": changes}


def test_summary_and_targets():
    methods = [m for m in METHODS if m.name in ("weighted-sum", "marble")]
    runs = [_run("weighted-sum", [-0.1, -0.2, 0.3], [-0.1, 0.1, 0.1], [0.5, -0.2], seed=0),
            _run("weighted-sum", [-0.1, -0.2, 0.3], [0.1, 0.1, 0.1], [0.7, 0.0], seed=1),
            _run("marble", [0.1, 0.2, 0.05], [0.1, -0.1, 0.1], [0.2, 0.4], seed=0),
            _run("marble", [0.1, 0.2, float("nan")], [0.1, 0.1, 0.1], [0.4, 0.2], seed=1)]
    rows = {row["method"]: row for row in summarize(runs, ["a", "b"], methods)}
    assert rows["weighted-sum"]["negative_fused"] == pytest.approx(4 / 6)
    assert rows["weighted-sum"]["changes"]["a"]["mean"] == pytest.approx(0.6)
    assert rows["weighted-sum"]["changes"]["a"]["spread"] == pytest.approx(0.02 ** 0.5)  # sample std
    assert rows["weighted-sum"]["left_behind"] == ["b"]
    assert rows["marble"]["negative_fused"] == 0.0 and rows["marble"]["left_behind"] == []
    assert rows["marble"]["negative_update"] == pytest.approx(1 / 6)
    met = {(t["method"], t["target"]): t["met"] for t in check_targets(list(rows.values()), methods)}
    assert all(met.values())


def test_settings_errors_and_cli_errors():
    with pytest.raises(MarbleError, match="unknown method"):
        ConflictSettings(methods=["adam"])
    result = runner.invoke(app, ["bench", "conflict", "--methods", "nope"])
    assert result.exit_code == 2 and "unknown method" in result.output


@pytest.mark.slow
def test_library_run_reports_every_step_including_periodic_reuse():
    settings = ConflictSettings(steps=3, seeds=1, methods=["marble-periodic", "summed-reward"],
                                gram_period=2, eval_images_per_prompt=1, **{k: TINY[k] for k in (
                                    "prompts_per_step", "images_per_prompt", "timesteps_per_image",
                                    "sample_steps")})
    report = run_conflict_benchmark(settings)
    periodic = next(run for run in report["runs"] if run["method"] == "marble-periodic")
    assert [s["gram_mode"] for s in periodic["steps"]] == ["affine", "reuse", "affine"]
    assert all(-1 <= s["cos_worst"] <= 1 and -1 <= s["cos_update_worst"] <= 1 for s in periodic["steps"])
    assert [row["method"] for row in report["rows"]] == ["summed-reward", "marble-periodic"]
    assert set(report["rows"][0]["changes"]) == set(settings.rewards)


@pytest.mark.slow
def test_cli_conflict_smoke_writes_json_and_plot(tmp_path):
    # the previous default world (sharpness as the global reward) through --rewards / --prompts
    result = runner.invoke(app, ["bench", "conflict", "--steps", "1", "--seeds", "1", "--methods",
                                 "weighted-sum,marble", "--eval-images-per-prompt", "1", "--json",
                                 "--rewards", "color,shape,sharpness", "--prompts", "world_sharpness",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [row["method"] for row in summary["rows"]] == ["weighted-sum", "marble"]
    assert list(summary["rows"][0]["changes"]) == ["color", "shape", "sharpness"]
    report = json.loads((tmp_path / "conflict.json").read_text())
    assert report["settings"]["prompts"] == ["world_sharpness"]
    assert {t["method"] for t in summary["targets"]} == {"weighted-sum", "marble"}
    assert len(report["runs"]) == 2
    assert (tmp_path / "conflict.png").stat().st_size > 0
