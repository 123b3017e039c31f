"""`marble train` → checkpoints → `--resume` (bit-exact) → `marble eval` / `marble plot` on tiny-sd3.

Every run here is tiny (3 prompts × 2 images, 1 timestep per image, 4 sampler steps, 1 thread).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import marble, metric_lines
from PIL import Image
from safetensors.torch import load_file

from marble_kit.checkpoint import list_checkpoints, load_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.images import make_grid
from marble_kit.progress import summarize
from marble_kit.prompts import load_prompt_sets
from marble_kit.registry import build
from marble_kit.run import sample_images, sample_prompts

REWARDS = ["color", "shape", "centering"]  # the embedded default
TINY = ["--set", "prompts_per_step=3", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=4", "--set", "threads=1", "--no-progress"]
# Wall-clock times are not part of the trajectory; everything else (OSQP's iteration counts
# included: the QP warm start is checkpointed) must match bit for bit.
NOT_COMPARED = ("time/",)
MATPLOTLIB_CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]


def train(out: Path, steps: int, *extra: str):
    result = marble("train", "--out", out, "--steps", steps, *TINY, *extra)
    assert result.exit_code == 0, result.output
    return result


def trajectory(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)} for row in rows]


def png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 4-step run and the same run stopped at step 2 and resumed to 4."""
    root = tmp_path_factory.mktemp("runs")
    full, resumed = root / "full", root / "resumed"
    cadence = ["--set", "checkpoint_every=1", "--set", "keep_checkpoints=2", "--set", "sample_every=2"]
    train(full, 4, *cadence)
    train(resumed, 2, *cadence)
    result = marble("train", "--resume", resumed, "--steps", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    return {"full": full, "resumed": resumed, "root": root}


def test_run_directory_holds_config_metrics_checkpoints_samples_and_plots(runs):
    run = runs["full"]
    config = TrainConfig.from_toml(run / "config.toml")
    assert (config.steps, config.prompts_per_step, config.images_per_prompt, config.sample_steps,
            config.checkpoint_every, config.keep_checkpoints) == (4, 3, 2, 4, 1, 2)
    assert config.rewards == REWARDS and config.out == str(run)

    rows = metric_lines(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        lam = [row[f"lambda/{name}"] for name in REWARDS]
        assert min(lam) >= 0 and sum(lam) == pytest.approx(1.0)
        assert row["cos/worst"] == pytest.approx(min(row[f"cos/{name}"] for name in REWARDS))
        assert all(f"reward/{name}" in row for name in REWARDS)

    # keep_checkpoints=2: only the last two of the four checkpoints remain
    assert [p.name for p in list_checkpoints(run)] == ["step-000003", "step-000004"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    meta, state = load_checkpoint(run / "checkpoints" / "step-000004")
    assert meta["step"] == state["step"] == 4 and meta["rewards"] == REWARDS
    assert {"optimizer", "balancer", "generator", "sampler", "global_rng"} <= set(state)
    assert any(k.startswith("old.") for k in state["policy"]) and any(k.startswith("lora.") for k in state["policy"])
    assert state["balancer"]["ema_initialized"] == 1  # MARBLE's EMA state travels with the checkpoint

    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-000000.png", "step-000002.png", "step-000004.png"]
    plots = {p.name for p in (run / "plots").iterdir()}
    assert plots == {"rewards.png", "weights.png", "cosines.png", "update_cosines.png"}


def test_sample_grid_shows_the_checkpoint_weights_on_the_fixed_prompts(runs):
    run = runs["full"]
    config = TrainConfig.from_toml(run / "config.toml")
    _, state = load_checkpoint(run / "checkpoints" / "step-000004")
    policy = build("policy", config.policy, {"seed": config.seed, **config.policy_options})
    prompts = sample_prompts(load_prompt_sets(config.prompts))
    base = np.asarray(make_grid(sample_images(policy, config, prompts), captions=prompts))
    policy.load_state_dict(state["policy"])
    expected = np.asarray(make_grid(sample_images(policy, config, prompts), captions=prompts))
    assert np.array_equal(png(run / "samples" / "step-000004.png"), expected)
    assert np.array_equal(png(run / "samples" / "step-000000.png"), base)
    assert not np.array_equal(expected, base)  # four steps moved the weights


def test_plots_draw_one_line_per_reward_and_marble_plot_redraws_them(runs):
    run = runs["full"]
    for name in ("rewards.png", "weights.png"):
        pixels = png(run / "plots" / name).reshape(-1, 3).astype(int)
        for color in MATPLOTLIB_CYCLE[:len(REWARDS)]:  # one line colour per reward
            assert (np.abs(pixels - hex_rgb(color)).sum(axis=1) < 12).sum() > 50, (name, color)
    before = png(run / "plots" / "weights.png")
    (run / "plots" / "weights.png").unlink()
    result = marble("plot", run)
    assert result.exit_code == 0, result.output
    assert np.array_equal(png(run / "plots" / "weights.png"), before)


def test_resume_is_bit_exact(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert trajectory(metric_lines(resumed)) == trajectory(metric_lines(full))
    a, b = full / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004"
    for name in ("policy.safetensors", "adapter/pytorch_lora_weights.safetensors"):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    state_a, state_b = load_checkpoint(a)[1], load_checkpoint(b)[1]
    for index, moments in state_a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, state_b["optimizer"]["state"][index][key])
    assert all(torch.equal(state_a["balancer"][k], state_b["balancer"][k]) for k in state_a["balancer"])
    assert torch.equal(state_a["generator"], state_b["generator"])
    # the resumed run kept its step-2 metrics and config, and updated steps
    assert TrainConfig.from_toml(resumed / "config.toml").steps == 4


DIFFUSERS_RECIPE = """
import sys
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1])
noise = torch.load(sys.argv[3])
settings = dict(num_inference_steps=4, guidance_scale=1.0, max_sequence_length=1, output_type="pt")
prompts = ["a red circle on a white background", "a blue square on a black background"]
base = pipe(prompts, latents=noise, **settings).images
pipe.load_lora_weights(sys.argv[2])
tuned = pipe(prompts, latents=noise, **settings).images
torch.save({"base": base, "tuned": tuned}, sys.argv[4])
"""
# Library chatter that is not about marble-kit's files: transformers' notes that the CPU install
# has no torchvision, diffusers' note for every LoRA without text-encoder weights.
FOREIGN_NOTES = ("requires torchvision (not installed)",
                 "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder")


def test_the_shipped_tiny_pipeline_and_a_checkpoint_adapter_work_in_plain_diffusers(runs, tmp_path):
    """The user-guide recipe, run as a user runs it (a fresh interpreter, diffusers only):
    ``StableDiffusion3Pipeline.from_pretrained(<tiny_sd3>)`` + ``load_lora_weights(<ckpt>/adapter)``
    samples exactly what marble's policy samples with the checkpoint's weights."""
    from marble_plugins.policies import sd3

    adapter = runs["full"] / "checkpoints" / "step-000004" / "adapter"
    policy = build("policy", "tiny-sd3", {"seed": 0})
    noise = torch.randn(policy.latent_shape(2), generator=torch.Generator().manual_seed(3))
    torch.save(noise, tmp_path / "noise.pt")
    done = subprocess.run([sys.executable, "-c", DIFFUSERS_RECIPE, str(sd3.TINY_PRIOR_DIR), str(adapter),
                           str(tmp_path / "noise.pt"), str(tmp_path / "images.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if line.strip() and "it/s]" not in line and "%|" not in line
             and not any(note in line for note in FOREIGN_NOTES)]
    assert notes == []  # nothing about text_encoder_3 / tokenizer_3, truncation or our configs
    images = torch.load(tmp_path / "images.pt")
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    policy.load_adapter(adapter)
    ours = policy.sample(prompts, generator=torch.Generator(), noise=noise, use_old=False, steps=4).images
    torch.testing.assert_close(images["tuned"], ours, atol=2e-5, rtol=0)  # other thread count: not bitwise
    assert (images["tuned"] - images["base"]).abs().mean() > 1e-3  # the LoRA changes the images


def test_eval_scores_an_intermediate_checkpoint_against_the_base(runs, tmp_path):
    prompts = tmp_path / "mine.txt"
    prompts.write_text("# my prompts\na red circle on a white background\n"
                       "a blue square on a black background\n\na green triangle on a gray background\n")
    out = tmp_path / "eval"
    result = marble("eval", runs["full"] / "checkpoints" / "step-000003", "--prompts", prompts,
                    "--rewards", "color,sharpness", "--images-per-prompt", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert "color" in result.output and "sharpness" in result.output

    report = json.loads((out / "eval.json").read_text())
    assert report["step"] == 3 and report["images_per_prompt"] == 2
    assert report["prompts"] == ["a red circle on a white background", "a blue square on a black background",
                                 "a green triangle on a gray background"]
    assert [row["reward"] for row in report["rewards"]] == ["color", "sharpness"]
    for row in report["rewards"]:
        assert row["n"] == 6
        for key in ("base_mean", "base_std", "tuned_mean", "tuned_std"):
            assert isinstance(row[key], float) and np.isfinite(row[key])
        assert row["delta"] == pytest.approx(row["tuned_mean"] - row["base_mean"])
        assert isinstance(row["delta_se"], float) and row["delta_se"] > 0

    grid = png(out / "eval_grid.png")
    cell = 64 * 3  # 64-px images upscaled ×3
    assert grid.shape[1] == 3 * (cell + 2) + 2 and grid.shape[0] == 2 * (cell + 12 + 2) + 2
    top = grid[14:14 + cell, 2:2 + cell].astype(int)
    bottom = grid[cell + 30:cell + 30 + cell, 2:2 + cell].astype(int)
    assert 0 < np.abs(top - bottom).mean() < 40  # same noise, slightly different weights


def test_progress_summary_shows_rewards_lambda_and_worst_cosine():
    metrics = {"reward/color": 0.25, "lambda/color": 0.7, "reward/word": float("nan"), "lambda/word": 0.3,
               "cos/worst": -0.125}
    text = summarize(metrics, ["color", "word"])
    assert text == "color 0.250 (λ 0.70) · word – (λ 0.30) · worst cos -0.12"


@pytest.mark.parametrize("width", [60, 80, 120])
def test_progress_line_keeps_step_count_and_eta_on_a_narrow_terminal(width):
    import io

    from rich.console import Console

    from marble_kit.progress import TrainProgress

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None)
    config = TrainConfig(steps=150)
    metrics = {"step": 12, "cos/worst": 0.1}
    for name in REWARDS:
        metrics.update({f"reward/{name}": 0.25, f"lambda/{name}": 0.25})
    with TrainProgress(config, console=console) as bar:
        bar.update(metrics)
    lines = out.getvalue().replace("\r", "\n").splitlines()
    assert lines[0].startswith("marble train → runs/marble  policy=tiny-sd3")  # the header comes first
    line = [text for text in lines if "12/150" in text][-1].replace("\x1b[2K", "")
    assert len(line) <= width
    assert line.startswith("train ") and "12/150" in line
    assert re.search(r"12/150 \d:\d\d:\d\d (-:--:--|\d:\d\d:\d\d) color 0\.250", line), line  # elapsed, ETA
    assert line.rstrip().endswith("…") or "worst cos" in line  # only the summary is cut


@pytest.mark.slow
def test_ctrl_c_leaves_a_loadable_checkpoint_that_eval_accepts(tmp_path):
    run = tmp_path / "interrupted"
    env = dict(os.environ, MARBLE_LOAD_PLUGINS="", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "marble_cli.app", "train", "--out", str(run), "--steps", "500", *TINY,
         "--set", "checkpoint_every=1000", "--set", "sample_every=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no metrics line within 120 s"
            time.sleep(0.05)
        # A second writer (same command, or a resume) is refused while the run trains.
        second = marble("train", "--out", run, "--steps", "500", *TINY, "--set", "checkpoint_every=1000",
                        "--set", "sample_every=0")
        assert second.exit_code == 2 and f"in use by another marble process (pid {process.pid})" in second.stderr
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stdout
    checkpoints = list_checkpoints(run)
    assert len(checkpoints) == 1
    meta, state = load_checkpoint(checkpoints[0])
    steps_done = len(metric_lines(run))
    assert meta["step"] == state["step"] == steps_done < 500

    out = tmp_path / "eval"
    result = marble("eval", run, "--rewards", "sharpness", "--max-prompts", 2, "--images-per-prompt", 1,
                    "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["step"] == steps_done and np.isfinite(report["rewards"][0]["tuned_mean"])


LIBRARY_RUN = {"prompts_per_step": 3, "images_per_prompt": 2, "timesteps_per_image": 1, "sample_steps": 4,
               "threads": 1, "sample_every": 0, "checkpoint_every": 0}


def assert_resume_is_bit_exact(tmp_path: Path, steps: int, stop: int, **settings) -> list[dict]:
    """Train ``steps`` steps in one go, and ``stop`` steps then a resume to ``steps``, through the
    library; both runs must agree bit for bit (metrics and final weights). Returns the metrics."""
    from marble_kit.run import train as run_train

    full = TrainConfig.from_dict({**LIBRARY_RUN, **settings, "out": str(tmp_path / "full"), "steps": steps})
    run_train(full, progress=False)
    run_train(full.replace(out=str(tmp_path / "resumed"), steps=stop), progress=False)
    run_train(full.replace(out=str(tmp_path / "resumed")), resume=True, progress=False)
    rows = metric_lines(tmp_path / "full")
    assert trajectory(metric_lines(tmp_path / "resumed")) == trajectory(rows)
    final = f"step-{steps:06d}"
    left = load_file(tmp_path / "full" / "checkpoints" / final / "policy.safetensors")
    right = load_file(tmp_path / "resumed" / "checkpoints" / final / "policy.safetensors")
    assert all(torch.equal(left[k], right[k]) for k in left)
    return rows


# (A resume between periodic solves — mgda-qp every 3 steps, stopped at step 2 — is checked in
# fresh processes by tests/test_resume_process.py, which also covers what this process keeps.)


def test_resume_is_bit_exact_with_upgrad(tmp_path):
    """UPGrad chains K warm-started QPs per step: its solver state must survive a resume too."""
    assert_resume_is_bit_exact(tmp_path, 4, 2, balancer="upgrad")


def test_eval_delta_standard_error_is_paired_over_images_both_judged():
    from marble_kit.evaluate import paired_standard_error, reward_rows

    base = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    tuned = torch.tensor([2.0, 2.0, 5.0, 1.0])
    assert paired_standard_error(base, tuned) == pytest.approx(1.0 / np.sqrt(3.0))  # d = 1, 0, 2
    assert np.isnan(paired_standard_error(base[:1], tuned[:1]))
    # a constant shift is certain however spread the scores are
    row = reward_rows(["r"], torch.tensor([[0.0, 5.0, 10.0]]), torch.tensor([[1.0, 6.0, 11.0]]))[0]
    assert row["delta"] == pytest.approx(1.0) and row["delta_se"] == 0.0 and row["base_std"] > 4
