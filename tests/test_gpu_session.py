"""docs/bench/gpu-session.sh: the script parses, and its CPU check (GPU_SESSION_CPU_TEST=1) runs
the stages it claims to; here the recipe stage, whose CPU command is the one that differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "bench" / "gpu-session.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_the_recipe_stage_runs_on_the_cpu(tmp_path):
    """The recipe's options on the tiny prior through sd3.5's loader: 2 steps, evaluations, checkpoints."""
    env = {**os.environ, "GPU_SESSION_CPU_TEST": "1", "PY": sys.executable, "OUT": str(tmp_path),
           "MARBLE_LOAD_PLUGINS": ""}
    result = subprocess.run(["bash", str(SCRIPT), "recipe"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    log = (tmp_path / "session.log").read_text()
    assert result.returncode == 0 and "== recipe rc=0" in log, log[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "recipe-metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]  # the base's evaluation, then two steps
    assert all("eval/composite" in line for line in lines) and "ema_decay" in lines[-1]
    assert (tmp_path / "recipe" / "checkpoints" / "best").is_dir()
