import subprocess
import sys
from pathlib import Path

import pytest

from marble_kit.errors import MarbleError
from marble_kit.hookspecs import hookimpl
from marble_kit.options import parse_plugin_options, parse_value
from marble_kit.registry import build, get_registry, registry_from_plugins

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_register_through_entry_points():
    registry = get_registry(refresh=True)
    info = registry.get("reward", "brightness")
    assert info.provider == "marble-kit"
    assert info.module.startswith("marble_plugins.")


def test_unknown_name_lists_installed_and_suggests():
    with pytest.raises(MarbleError) as err:
        get_registry().get("reward", "brightnes")
    message = str(err.value)
    assert "unknown reward 'brightnes'" in message
    assert "did you mean 'brightness'" in message
    assert "brightness" in message.split("installed rewards:")[1]
    assert "\n" not in message


class _PluginA:
    __name__ = "plugin_a"

    @hookimpl
    def register_rewards(self, register):
        register("same", lambda: None, description="from A")


class _PluginB:
    __name__ = "plugin_b"

    @hookimpl
    def register_rewards(self, register):
        register("same", lambda: None, description="from B")


def test_duplicate_names_name_both_providers():
    with pytest.raises(MarbleError) as err:
        registry_from_plugins(_PluginA(), _PluginB())
    message = str(err.value)
    assert "duplicate reward name 'same'" in message
    assert "plugin_a" in message and "plugin_b" in message


def test_bad_option_names_plugin_and_option():
    with pytest.raises(MarbleError) as err:
        build("reward", "jpeg-incompressibility", {"qualty": 90})
    assert "reward 'jpeg-incompressibility' has no option 'qualty'" in str(err.value)
    assert "quality" in str(err.value)
    reward = build("reward", "jpeg-incompressibility", {"quality": 50})
    assert reward.quality == 50


def test_option_parsing():
    assert parse_plugin_options(["hps.weights=/p/x.pt", "ocr.threads=2", "hps.scale=0.5"], "--reward-opt") == {
        "hps": {"weights": "/p/x.pt", "scale": 0.5},
        "ocr": {"threads": 2},
    }
    assert parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    for bad in ["hps", "hps=3", ".x=1", "hps.=1"]:
        with pytest.raises(MarbleError, match="malformed"):
            parse_plugin_options([bad], "--reward-opt")


@pytest.mark.slow
def test_third_party_example_is_discovered_through_its_entry_point(tmp_path):
    """pip-install the example package into this environment; it appears with no marble change."""
    example = ROOT / "examples" / "marble-reward-example"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(example)],
        check=True,
    )
    env = {**__import__("os").environ, "MARBLE_LOAD_PLUGINS": "marble-reward-example"}
    code = (
        "import json, torch\n"
        "from marble_kit.registry import get_registry, build\n"
        "info = get_registry().get('reward', 'redness')\n"
        "r = build('reward', 'redness', {'strength': 2.0})\n"
        "img = torch.zeros(2, 3, 8, 8); img[0, 0] = 1\n"
        "print(json.dumps([info.provider, r(img, ['a', 'b']).tolist()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    provider, scores = __import__("json").loads(out.stdout)
    assert provider == "marble-reward-example"
    assert scores == pytest.approx([2.0, 0.0])
    listing = subprocess.run([sys.executable, "-m", "marble_cli.app", "plugins", "--json"], env=env,
                             capture_output=True, text=True, check=True)
    names = {(row["name"], row["provider"]) for row in __import__("json").loads(listing.stdout)}
    assert ("redness", "marble-reward-example") in names
    # With outside plugins switched off, it is gone again (test isolation works).
    env["MARBLE_LOAD_PLUGINS"] = ""
    listing = subprocess.run([sys.executable, "-m", "marble_cli.app", "plugins", "--json"], env=env,
                             capture_output=True, text=True, check=True)
    assert "redness" not in {row["name"] for row in __import__("json").loads(listing.stdout)}
