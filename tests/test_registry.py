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


# ------------------------------------------------------------------ rewards as plain callables

def _mean_red(images, prompts):
    """A reward that is a plain function, not a Reward subclass."""
    return images[:, 0].mean(dim=(1, 2)) * 2 - 1


class _OnDevice:
    """A callable with a `to` of its own (like an nn.Module)."""

    def __init__(self):
        self.devices, self.seen = [], []

    def to(self, device):
        self.devices.append(str(device))
        return self

    def __call__(self, images, prompts):
        self.seen.append((str(images.device), list(prompts)))
        return [float(len(p)) for p in prompts]  # a list is fine too


class _CallablePlugin:
    __name__ = "callable_plugin"

    def __init__(self):
        self.on_device = _OnDevice()

    @hookimpl
    def register_rewards(self, register):
        register("mean-red", lambda: _mean_red)
        register("on-device", lambda: self.on_device)
        register("not-callable", lambda: 42)


def test_a_plain_callable_reward_is_wrapped_with_its_registered_name():
    import torch

    plugin = _CallablePlugin()
    registry = registry_from_plugins(plugin)
    reward = build("reward", "mean-red", registry=registry)
    assert reward.name == "mean-red"
    assert reward.to("cpu") is reward  # the function has no `to`: a no-op
    images = torch.zeros(3, 3, 4, 4)
    images[1, 0] = 1.0
    scores = reward(images, ["a", "b", "c"])
    assert scores.dtype == torch.float32 and scores.tolist() == [-1.0, 1.0, -1.0]
    with pytest.raises(MarbleError, match="reward 'mean-red': expected images"):
        reward(torch.zeros(2, 4, 4), ["a", "b"])

    on_device = build("reward", "on-device", registry=registry)
    on_device.to("cpu")
    assert plugin.on_device.devices == ["cpu"]  # `to` reaches a callable that has one
    assert on_device(torch.zeros(40, 3, 2, 2), ["ab"] * 40).tolist() == [2.0] * 40
    assert len(plugin.on_device.seen) == 1  # the whole batch in one call


def test_a_reward_factory_returning_a_non_callable_is_refused_naming_the_contract():
    with pytest.raises(MarbleError) as err:
        build("reward", "not-callable", registry=registry_from_plugins(_CallablePlugin()))
    message = str(err.value)
    assert "reward 'not-callable'" in message and "returned int, which is not callable" in message
    assert "a callable reward(images, prompts) -> Tensor[B]" in message


PLAIN_PLUGIN = '''
from marble_kit.hookspecs import hookimpl


def brightness_gap(images, prompts):
    return images.mean(dim=(1, 2, 3)) - 0.5


@hookimpl
def register_rewards(register):
    register("brightness-gap", lambda: brightness_gap, description="a plain function")
'''


def test_a_plain_callable_reward_from_an_entry_point_trains(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path, found through importlib.metadata like
    any pip-installed one) whose factory returns a function: `marble train` with it runs to the
    end (it used to die with AttributeError: 'function' object has no attribute 'to')."""
    import json

    from typer.testing import CliRunner

    from marble_cli.app import app

    site = tmp_path / "site"
    info = site / "plain_reward_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "plain_reward_plugin.py").write_text(PLAIN_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plain-reward-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[marble]\nplain = plain_reward_plugin\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("MARBLE_LOAD_PLUGINS", "plain-reward-plugin")
    run = tmp_path / "run"
    try:
        assert get_registry(refresh=True).get("reward", "brightness-gap").provider == "plain-reward-plugin"
        result = CliRunner().invoke(app, [
            "train", "--rewards", "brightness-gap,sharpness", "--prompts", str(prompts), "--out", str(run),
            "--steps", "1", "--set", "prompts_per_step=2", "--set", "images_per_prompt=2",
            "--set", "timesteps_per_image=1", "--set", "sample_steps=2", "--set", "sample_every=0",
            "--set", "threads=1", "--no-progress"])
    finally:
        monkeypatch.undo()
        get_registry(refresh=True)  # back to the built-ins for the other tests
    assert result.exit_code == 0, result.output
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert -0.5 <= row["reward/brightness-gap"] <= 0.5 and row["reward_coverage/brightness-gap"] == 1.0
