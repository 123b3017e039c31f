"""Resume in a new process is bit-exact: `marble train --resume` in fresh interpreters.

The in-process tests (test_run_e2e.py) cannot see state that lives in a process rather than in a
checkpoint — caches, torch's global RNG, what the sample grids touched. Here the resumed runs
and the short run are `marble train` subprocesses, as a user runs them; the uninterrupted
reference run trains in this process meanwhile (CLI, same settings). Metrics (all but
wall-clock times), weights, optimizer, balancer and RNG states must match bit for bit. Every
run is tiny (2 prompts × 2 images, 1 timestep, 3 sampler steps, 1 thread).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.checkpoint import list_checkpoints, load_checkpoint

TINY = ["--set", "prompts_per_step=2", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=3", "--set", "threads=1", "--no-progress"]
NOT_COMPARED = ("time/",)  # wall-clock times


def train_here(*args: object) -> None:
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    assert result.exit_code == 0, result.output


def start_marble_train(*runs: list[object]) -> list[subprocess.Popen]:
    """`marble train ARGS` for each ARGS, in parallel subprocesses (two cores: two at a time)."""
    env = dict(os.environ, MARBLE_LOAD_PLUGINS="")
    return [subprocess.Popen([sys.executable, "-m", "marble_cli.app", "train", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for args in runs]


def wait_for(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]


def trajectory(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)} for row in rows]


def assert_same_step(a: Path, b: Path) -> None:
    """Two checkpoints of one step hold the same weights (trained, old, weight EMA), optimizer,
    balancer, RNG and held-out evaluation states."""
    for name in ("policy.safetensors", "adapter/pytorch_lora_weights.safetensors",
                 "ema_adapter/pytorch_lora_weights.safetensors"):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name
    state_a, state_b = load_checkpoint(a)[1], load_checkpoint(b)[1]
    for index, moments in state_a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, state_b["optimizer"]["state"][index][key])
    assert state_a["balancer"].keys() == state_b["balancer"].keys()
    for key, value in state_a["balancer"].items():
        assert torch.equal(value, state_b["balancer"][key]) if isinstance(value, torch.Tensor) \
            else value == state_b["balancer"][key], key
    assert torch.equal(state_a["generator"], state_b["generator"])
    assert torch.equal(state_a["global_rng"]["torch"], state_b["global_rng"]["torch"])
    assert all(torch.equal(x, y) for x, y in zip(state_a["ema"]["shadow"], state_b["ema"]["shadow"], strict=True))
    assert all(torch.equal(state_a["evaluation"][k], state_b["evaluation"][k]) for k in state_a["evaluation"])


def crash_copy(run: Path, copy: Path, step: int) -> None:
    """What a crash after checkpoint ``step`` leaves: later checkpoints and metric lines gone."""
    shutil.copytree(run, copy)
    for checkpoint in list_checkpoints(copy):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines
                                                if json.loads(line)["step"] <= step))


# Eight prompts: the sample grid shows all of them, training draws from them. The step-0 grid
# encodes the eight in one batch before training starts, and a resumed process never draws
# it — so the embeddings training uses came from different text-encoder batches.
PROMPTS = ["a red circle on a white background", "a green square on a gray background",
           'a sign that says "cat" on a white background', "a blue triangle on a black background",
           "a yellow circle on a black background", 'a sign that says "sun" on a gray background',
           "a purple square on a white background", "a orange triangle on a gray background"]


@pytest.mark.slow
def test_resumed_processes_continue_bit_for_bit(tmp_path):
    """Periodic Gram (mgda-qp solved with the `affine` Gram every 3 steps, the loss weights reused
    between solves), sample grids every 2 steps, and the recipe's additions: the weight EMA
    (sample grids, evaluation and ema_adapter use it), the held-out evaluation every 2 steps
    with its best checkpoint, the sampler-grid timesteps, the decay offset, the scaled clip.
    Two ways to resume:

    * `--steps 2`, then `--resume --steps 4`: the short run's end-of-run checkpoint holds what
      step 2 of the long run holds, and the extended run continues it exactly;
    * a copy of the long run with the step-4 checkpoint and metrics lines 3-4 deleted (what a
      crash or kill -9 leaves), resumed.
    """
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    settings = [*TINY, "--prompts", prompts, "--balancer", "mgda-qp", "--gram", "periodic",
                "--set", "gram_period=3", "--set", "checkpoint_every=2", "--set", "sample_every=2",
                "--set", "ema_decay=0.9", "--set", "eval_every=2", "--set", "eval_max_prompts=2",
                "--set", "eval_images_per_prompt=1", "--set", "timestep_schedule=grid",
                "--set", "old_decay_offset=1", "--set", "grad_clip_scale=5"]
    full, short, crashed = tmp_path / "full", tmp_path / "short", tmp_path / "crashed"
    short_run = start_marble_train(["--out", short, "--steps", 2, "--seed", 7, *settings])
    train_here("--out", full, "--steps", 4, "--seed", 7, *settings)  # meanwhile, the reference here
    wait_for(short_run)
    rows = trajectory(full)
    assert [row.get("gram_mode") for row in rows] == [None, "affine", "reuse", "reuse", "affine"]  # 0: eval
    assert [row["step"] for row in rows if "eval/composite" in row] == [0, 2, 4]
    assert_same_step(full / "checkpoints" / "step-000002", short / "checkpoints" / "step-000002")

    crash_copy(full, crashed, 2)
    wait_for(start_marble_train(["--resume", short, "--steps", 4, "--no-progress"],
                                ["--resume", crashed, "--steps", 4, "--no-progress"]))
    for resumed in (short, crashed):
        assert trajectory(resumed) == rows
        assert_same_step(full / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
        assert_same_step(full / "checkpoints" / "best", resumed / "checkpoints" / "best")
