import json

import pytest
from typer.testing import CliRunner

from marble_cli.app import app

runner = CliRunner()


def _command_paths():
    """Every command and sub-command of the Typer app."""
    import typer.main

    group = typer.main.get_command(app)
    paths = []

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            paths.append(prefix + [name])
            walk(sub, prefix + [name])

    walk(group, [])
    return paths


def test_root_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "plugins" in result.output


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path):
    result = runner.invoke(app, path + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_plugins_json_lists_builtins():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    kinds = {row["kind"] for row in rows}
    assert "reward" in kinds
    assert all({"kind", "name", "provider", "description"} <= set(row) for row in rows)
    assert any(row["name"] == "brightness" and row["provider"] == "marble-kit" for row in rows)


def test_plugins_table():
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0
    assert "brightness" in result.output
