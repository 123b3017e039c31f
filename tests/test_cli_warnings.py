"""Warnings reach the user as one line each: `warning: <message>` on stderr."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_a_reward_that_judges_nothing_is_named_in_a_one_line_warning(tmp_path):
    """`color` is tagged on no prompt set: it judges nothing, takes no part in balancing, and
    after 3 steps a single warning line names it (no Python file:line, no source line)."""
    command = [sys.executable, "-m", "marble_cli.app", "train", "--rewards", "color,sharpness",
               "--prompts", "colors:sharpness", "--steps", "3", "--out", str(tmp_path / "run"), "--no-progress",
               "--set", "prompts_per_step=1", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
               "--set", "sample_steps=2", "--set", "checkpoint_every=0", "--set", "sample_every=0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MARBLE_LOAD_PLUGINS": "", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    named = [line for line in lines if "reward 'color' judged no sample in the last 3 steps" in line]
    assert len(named) == 1 and named[0].startswith("warning: "), done.stderr
    assert "warnings.warn" not in done.stderr and ".py:" not in done.stderr, done.stderr
