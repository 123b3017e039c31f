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
    policies = {row["name"]: row for row in rows if row["kind"] == "policy"}
    assert {"tiny-sd3", "sd3.5", "sd3.5-arch", "flux", "flux-arch"} <= set(policies)
    assert policies["flux"]["provider"] == "marble-kit" and "MARBLE_FLUX_PATH" in policies["flux"]["description"]


def test_train_flux_without_weights_is_one_line_naming_the_file_option_and_variable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("MARBLE_FLUX_PATH", str(tmp_path / "nowhere"))
    result = runner.invoke(app, ["train", "--policy", "flux", "--steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert all(part in result.stderr for part in ("model_index.json", "--policy-opt path=DIR", "MARBLE_FLUX_PATH"))
    monkeypatch.delenv("MARBLE_FLUX_PATH")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(app, ["train", "--policy", "flux", "--steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not available locally" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_plugins_table():
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0
    assert "brightness" in result.output
