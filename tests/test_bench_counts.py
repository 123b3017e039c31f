"""`marble bench counts`: per-phase and per-pass operator counts of one profiled step."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from marble_cli.app import app
from marble_kit.bench.counts import PhaseLabels, attribute, per_pass

runner = CliRunner()
SMALL = ["--prompts-per-step", "2", "--images-per-prompt", "2", "--timesteps-per-image", "2", "--sample-steps", "1"]


def test_cli_counts_attributes_every_pass_and_the_sampled_rows(tmp_path):
    """Single reward: one forward and one ordinary backward; sampled rows (gram_rows 0.25, one
    row per group of G·T = 4): the Gram's forward sees the 2 sampled rows and three capture
    passes run (U, W, the anchor), then the fused forward sees the 6 other rows only and one
    ordinary backward runs."""
    result = runner.invoke(app, ["bench", "counts", *SMALL, "--variants", "single,marble-rows", "--json",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "counts.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    single, sampled = rows["single"], rows["marble-rows"]
    assert single["phases"]["forward"]["calls"] == 1 and single["phases"]["backward"]["calls"] == 1
    assert single["phases"]["forward"]["rows"] == 8 and "capture backward" not in single["phases"]
    assert sampled["phases"]["forward"]["calls"] == 2 and sampled["phases"]["forward"]["rows"] == 2 + 6
    assert sampled["per_pass"]["capture backward"]["passes"] == 3
    assert sampled["phases"]["rollout"]["rows"] == 4 and sampled["phases"]["fold"]["rows"] == 2 * 8  # old + ref
    for phase in ("rollout", "fold", "forward", "backward", "capture backward", "optimizer", "gradient step"):
        assert sampled["phases"][phase]["launches"] > 0, phase
    # the capture's hooks: each LoRA factor once in the forward, once per backward pass
    calls = sampled["capture_calls"]
    assert calls["forward"] > 0 and calls["backward"] == 3 * calls["forward"]
    assert single["capture_calls"] == {"forward": 0, "backward": 0}
    assert report["targets"] == [] and single["device_kernels"] is None  # the GPU target needs a GPU
    assert sum(v.get("launches", 0) for v in single["phases"].values()) == single["totals"]["launches"]


class _Event:
    def __init__(self, name, start, end, parent=None, children=()):
        self.name, self.cpu_parent, self.cpu_children = name, parent, list(children)
        self.time_range = type("Range", (), {"start": start, "end": end})()


def test_operators_go_to_their_innermost_phase_and_nested_ones_are_not_counted_twice():
    cast = _Event("aten::_to_copy", 3, 4)
    linear = _Event("aten::linear", 2, 5, children=[cast])
    cast.cpu_parent = linear
    events = [_Event("marble::gradient_step", 0, 100), _Event("marble::forward", 1, 10), linear, cast,
              _Event("aten::view", 6, 7), _Event("aten::item", 20, 21), _Event("marble::rows=3", 8, 8),
              _Event("aten::add", 200, 201)]
    phases = attribute(events, on_gpu=False)
    assert phases["forward"] == {"calls": 1, "ops": 2, "launches": 2, "casts": 1, "rows": 3}  # linear + its cast
    assert phases["gradient step"] == {"calls": 1, "ops": 1, "syncs": 1}
    assert phases["other"] == {"ops": 1, "launches": 1}
    assert per_pass(phases) == {"forward": {"ops": 2, "launches": 2, "casts": 1, "rows": 3, "passes": 1}}


def test_phase_labels_leave_the_trainer_as_they_found_it():
    from marble_kit.bench.speed import SpeedSettings, build_trainers

    trainer = build_trainers(SpeedSettings(rounds=1, warmup=0, min_rounds=1), names=["single"])["single"]
    before = (dict(vars(trainer)), dict(vars(trainer.policy)), dict(vars(trainer.optimizer)))
    with PhaseLabels(trainer):
        assert "sample" in vars(trainer.policy) and trainer.phase_hook is not None
    assert (dict(vars(trainer)), dict(vars(trainer.policy)), dict(vars(trainer.optimizer))) == before
