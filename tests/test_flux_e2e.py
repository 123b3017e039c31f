"""FLUX.1 end to end, as a user runs it, on the tiny random FLUX.1 (tests/tiny_flux.py):

* `marble train --policy flux --policy-opt path=DIR …` for 2 steps (the CLI, in this process), then
  what a crash after checkpoint 1 leaves of it resumed by `marble train --resume` in a fresh
  process: metrics, weights (trained, old, weight EMA), optimizer, balancer, RNG and held-out
  evaluation states bit for bit, the best checkpoint too (the recipe's EMA, evaluation during
  training and sampler-grid timesteps on);
* `marble eval` of the step-2 checkpoint in a fresh process (the policy rebuilt from the run's
  config: path and options);
* plain diffusers in a fresh interpreter: ``FluxPipeline.from_pretrained(DIR)`` +
  ``load_lora_weights(<checkpoint>/adapter)`` samples what marble's policy samples with those
  weights, and not what the base model samples.

One wave of three subprocesses (their start-up, ~6 s of imports each, dominates).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_resume_process import assert_same_step, crash_copy, train_here, trajectory
from tiny_flux import PROMPTS, TINY_FLUX_OPTIONS, policy_opts

from marble_kit.checkpoint import load_checkpoint
from marble_kit.registry import build

SETTINGS = ["--set", "prompts_per_step=2", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
            "--set", "sample_steps=2", "--set", "threads=1", "--set", "checkpoint_every=1",
            "--set", "sample_every=2", "--lr", "0.02", "--seed", "5", "--no-progress",
            # the recipe's additions: the weight EMA, a held-out evaluation (and best checkpoint)
            # every 2 steps, FLUX's own shifted sampler grid as the training timesteps
            "--set", "ema_decay=0.9", "--set", "eval_every=2", "--set", "eval_max_prompts=2",
            "--set", "eval_images_per_prompt=1", "--set", "eval_sample_steps=2", "--set", "timestep_schedule=grid"]
DIFFUSERS_RECIPE = """
import sys
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained(sys.argv[1])
settings = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32, max_sequence_length=12,
                output_type="pt")
prompts = ["a red circle on a white background", "a blue square on a black background"]
base = pipe(prompts, generator=torch.Generator().manual_seed(3), **settings).images
pipe.load_lora_weights(sys.argv[2])
tuned = pipe(prompts, generator=torch.Generator().manual_seed(3), **settings).images
torch.save({"base": base, "tuned": tuned}, sys.argv[3])
"""
# Library chatter that is not about marble-kit's files: transformers' notes that the CPU install
# has no torchvision, diffusers' note for a LoRA without text-encoder weights.
FOREIGN_NOTES = ("requires torchvision (not installed)", "No LoRA keys associated to CLIPTextModel")


def start(*argv: object) -> subprocess.Popen:
    env = dict(os.environ, MARBLE_LOAD_PLUGINS="")
    return subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def chain(tiny_flux_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-runs")
    full = root / "full"
    train_here("--out", full, "--steps", 2, "--policy", "flux", *policy_opts(tiny_flux_dir, steps=2), *SETTINGS)
    crash_copy(full, root / "crashed", 1)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    checkpoint = full / "checkpoints" / "step-000002"
    later = [start("-m", "marble_cli.app", "train", "--resume", root / "crashed", "--steps", 2, "--no-progress"),
             start("-m", "marble_cli.app", "eval", checkpoint, "--prompts", prompts, "--rewards", "color,sharpness",
                   "--images-per-prompt", 2, "--out", root / "eval"),
             start("-c", DIFFUSERS_RECIPE, tiny_flux_dir, checkpoint / "adapter", root / "diffusers.pt")]
    stderr = [finish(process) for process in later]
    return {"root": root, "checkpoint": checkpoint, "diffusers_stderr": stderr[2]}


def test_flux_resumes_bit_for_bit_in_a_fresh_process(chain, tiny_flux_dir):
    full, resumed = chain["root"] / "full", chain["root"] / "crashed"
    rows = trajectory(full)
    assert [row.get("gram_mode") for row in rows] == [None, "affine", "affine"]  # step 0: evaluation only
    assert [row["step"] for row in rows if "eval/composite" in row] == [0, 2]
    assert trajectory(resumed) == rows
    # step 1 was not trained again: its line (wall-clock times included) is the crashed run's
    step_1 = [[line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] == 1]
              for run in (full, resumed)]
    assert len(step_1[0]) == 1 and step_1[0] == step_1[1]
    for name in ("step-000002", "best"):
        assert_same_step(full / "checkpoints" / name, resumed / "checkpoints" / name)
    meta, state = load_checkpoint(chain["checkpoint"])
    assert meta["policy"] == "flux" and meta["policy_options"]["path"] == str(tiny_flux_dir)
    assert any("single_transformer_blocks" in key for key in state["policy"])


def test_eval_rebuilds_flux_from_the_run_and_scores_base_and_checkpoint(chain):
    report = json.loads((chain["root"] / "eval" / "eval.json").read_text())
    assert report["step"] == 2 and report["prompts"] == PROMPTS[:2]
    for row in report["rewards"]:
        assert row["n"] == 4 and all(np.isfinite(row[k]) for k in ("base_mean", "tuned_mean"))
    assert any(row["tuned_mean"] != row["base_mean"] for row in report["rewards"])
    assert (chain["root"] / "eval" / "eval_grid.png").stat().st_size > 0


def test_the_flux_checkpoint_adapter_works_in_plain_diffusers(chain, tiny_flux_dir):
    notes = [line for line in chain["diffusers_stderr"].replace("\r", "\n").splitlines()
             if line.strip() and "it/s]" not in line and "%|" not in line
             and not any(note in line for note in FOREIGN_NOTES)]
    assert notes == []  # nothing about our configs, tokenizers or LoRA keys
    images = torch.load(chain["root"] / "diffusers.pt")
    policy = build("policy", "flux", {"path": str(tiny_flux_dir), **TINY_FLUX_OPTIONS})
    policy.load_adapter(chain["checkpoint"] / "adapter")
    ours = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3), use_old=False, steps=2).images
    torch.testing.assert_close(images["tuned"], ours, atol=2e-5, rtol=0)  # other process: not bitwise
    assert (images["tuned"] - images["base"]).abs().mean() > 1e-3  # the LoRA changes the images
