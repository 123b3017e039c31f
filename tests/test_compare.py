"""`marble compare RUN RUN…` on two short runs with different reward sets, one evaluated:
the table, compare.json (against the runs' own eval.json and metrics.jsonl) and compare.png;
bad input is a one-line error with exit code 2 and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runs import marble, metric_lines
from PIL import Image

from marble_kit.compare import STEP_CLOCKS, run_labels
from marble_kit.config import TrainConfig

TINY = ["--set", "prompts_per_step=3", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=4", "--set", "threads=1", "--set", "sample_every=0", "--no-progress"]
MATPLOTLIB_CYCLE = ["#1f77b4", "#ff7f0e"]  # C0, C1: one colour per run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run `a`: color + sharpness, marble, evaluated. Run `b`: color + shape, weighted-sum, a
    metrics line every 2nd step only, no eval."""
    root = tmp_path_factory.mktemp("compare")
    a, b = root / "a", root / "b"
    result = marble("train", "--out", a, "--steps", 2, *TINY, "--rewards", "color,sharpness")
    assert result.exit_code == 0, result.output
    result = marble("eval", a, "--max-prompts", 2, "--images-per-prompt", 2)
    assert result.exit_code == 0, result.output
    result = marble("train", "--out", b, "--steps", 2, *TINY, "--rewards", "color,shape", "--balancer",
                    "weighted-sum", "--gram", "none", "--set", "log_every=2")
    assert result.exit_code == 0, result.output
    return {"a": a, "b": b, "root": root}


def test_compare_writes_the_table_json_and_png(runs, tmp_path):
    a, b, out = runs["a"], runs["b"], tmp_path / "cmp"
    result = marble("compare", a, b, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare.json").read_text())
    assert report["shared_rewards"] == ["color"]
    assert report["not_shared"] == {"a": ["sharpness"], "b": ["shape"]}

    run_a, run_b = report["runs"]
    assert (run_a["label"], run_a["balancer"], run_a["gram"], run_a["steps"]) == ("a", "marble", "affine", 2)
    assert (run_b["label"], run_b["balancer"], run_b["gram"], run_b["steps"]) == ("b", "weighted-sum", "none", 2)
    lines_a, lines_b = metric_lines(a), metric_lines(b)
    assert run_a["train_seconds"] == pytest.approx(sum(row[k] for row in lines_a for k in STEP_CLOCKS))
    assert not run_a["train_seconds_estimated"]
    [line_b] = lines_b  # log_every=2: one line for two steps, so the time is scaled up
    assert run_b["train_seconds"] == pytest.approx(2 * sum(line_b[k] for k in STEP_CLOCKS))
    assert run_b["train_seconds_estimated"]

    evaluation = json.loads((a / "eval" / "step-000002" / "eval.json").read_text())
    [color_eval] = [row for row in evaluation["rewards"] if row["reward"] == "color"]
    cell_a, cell_b = report["rewards"]["color"]["a"], report["rewards"]["color"]["b"]
    assert cell_a["source"] == "eval" and cell_a["step"] == 2 and run_a["eval_step"] == 2
    assert (cell_a["delta"], cell_a["delta_se"]) == (color_eval["delta"], color_eval["delta_se"])
    assert cell_b == {"source": "train", "step": 2, "reward": line_b["reward/color"]}

    # the table: one column per run, one row per shared reward, labelled sources and notes
    text = result.output
    assert "marble compare" in text and "weighted-sum" in text and "eval @ step 2" in text
    assert "training (no eval.json)" in text
    assert f"{cell_a['delta']:+.4f} ± {cell_a['delta_se']:.4f}" in text
    assert f"{line_b['reward/color']:.4f} (train, step 2)" in text
    assert "not compared (not in every run): sharpness (a); shape (b)" in text
    assert "≈ " in text  # b's training time is an estimate

    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "compare.png") as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    for color in MATPLOTLIB_CYCLE:  # both runs are drawn
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=1) < 12).sum() > 100, color


def test_compare_json_output_is_the_report(runs, tmp_path):
    result = marble("compare", runs["b"], runs["a"], "--out", tmp_path / "cmp", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [run["label"] for run in report["runs"]] == ["b", "a"]
    assert report == json.loads((tmp_path / "cmp" / "compare.json").read_text())


def test_labels_stay_unique_when_run_names_collide():
    assert run_labels([Path("/x/runs/a"), Path("/y/runs/a"), Path("/y/runs/b")]) == ["x/runs/a", "y/runs/a",
                                                                                     "y/runs/b"]
    assert run_labels([Path("/x/a"), Path("/x/b")]) == ["a", "b"]


def copy_run(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    if changes:
        config = TrainConfig.from_toml(target / "config.toml").replace(**changes)
        (target / "config.toml").write_text(config.to_toml())
    return target


def bad_inputs(runs, root: Path):
    a, b = runs["a"], runs["b"]
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("not a run")
    empty = copy_run(b, root / "empty")
    (empty / "metrics.jsonl").write_text("")
    broken = copy_run(a, root / "broken")
    (broken / "eval" / "step-000002" / "eval.json").write_text("{not json")
    (root / "file").write_text("x")
    return [
        ((a,), "marble compare needs at least two runs, got 1"),
        ((a, root / "plain"), "is not a marble run directory (no config.toml)"),
        ((a, root / "missing"), "missing does not exist"),
        ((a, b / "plots" / "rewards.png"), "rewards.png is not a directory"),
        ((a, a), "is given twice"),
        ((a, copy_run(b, root / "other", rewards=["shape"])), "the runs share no reward (a: color,sharpness; "
                                                              "other: shape)"),
        ((a, empty), "metrics.jsonl has no step yet"),
        ((broken, b), "eval.json is not a readable eval report"),
        ((a, b, "--out", root / "file"), "--out"),
    ]


def test_bad_input_is_a_one_line_error_and_writes_nothing(runs, tmp_path):
    for args, expected in bad_inputs(runs, tmp_path):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        out = [] if "--out" in args else ["--out", tmp_path / "cmp"]
        result = marble("compare", *args, *out)
        assert result.exit_code == 2, (args, result.output)
        message = result.stderr.strip()
        assert message.startswith("error:") and "\n" not in message, message
        assert expected in message, (expected, message)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, args
