"""The CLI as the tests drive it in-process: `marble(...)` runs one command through typer's
runner and re-raises a real exception (a bug) instead of reporting it as an exit code."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from marble_cli.app import app

runner = CliRunner()


def marble(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def metric_lines(run_dir: Path) -> list[dict]:
    """Every step's record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
