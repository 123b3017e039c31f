"""`marble train --report-to tensorboard,wandb`: every metrics line and sample grid reaches the
trackers, read back with the trackers' own readers (TensorBoard's EventAccumulator, `wandb leet
inspect` on the offline log); resume continues at the right step; a tracker failure is a
warning, a missing tracker package a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cli_runs import marble, metric_lines
from PIL import Image

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.run import RESUMABLE_KEYS, run_fingerprint
from marble_kit.tracking import (
    TENSORBOARD_DIR,
    TRACKING_FILE,
    Tracker,
    TrackerWarning,
    check_trackers,
    open_tracker,
    scalars,
)

REWARDS = ["color", "shape", "centering"]  # the embedded default
TINY = ["--set", "prompts_per_step=3", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=4", "--set", "threads=1", "--no-progress"]


def same_value(logged: float, written) -> bool:
    """A tracker's float32 (TensorBoard) or float64 (wandb) against metrics.jsonl (null = NaN)."""
    if written is None:
        return math.isnan(logged)
    return logged == pytest.approx(written, rel=1e-6, abs=1e-7)


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def check_tensorboard_matches_metrics(run: Path, steps: list[int]) -> None:
    events = tensorboard_events(run / TENSORBOARD_DIR)
    rows = {row["step"]: row for row in metric_lines(run)}
    assert sorted(rows) == steps
    keys = [f"{prefix}/{name}" for prefix in ("reward", "lambda", "cos") for name in REWARDS] + ["cos/worst"]
    for key in keys:
        logged = events.Scalars(key)
        assert [e.step for e in logged] == steps, key  # once per step: a resume's recomputed steps replace
        for event in logged:
            assert same_value(event.value, rows[event.step][key]), (key, event.step)
    assert "gram_mode" not in events.Tags()["scalars"]  # labels are not scalars


def test_tensorboard_gets_every_metrics_line_and_sample_grid_and_resumes_at_the_right_step(tmp_path):
    warnings.simplefilter("error", TrackerWarning)
    run = tmp_path / "run"
    result = marble("train", "--out", run, "--steps", 3, *TINY, "--set", "sample_every=2",
                    "--set", "checkpoint_every=2", "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    assert f"tensorboard --logdir {run / TENSORBOARD_DIR}" in result.output
    assert TrainConfig.from_toml(run / "config.toml").report_to == ["tensorboard"]
    check_tensorboard_matches_metrics(run, [1, 2, 3])

    images = tensorboard_events(run / TENSORBOARD_DIR).Images("samples")
    assert [image.step for image in images] == [0, 2]
    with Image.open(run / "samples" / "step-000002.png") as grid:
        assert (images[1].width, images[1].height) == grid.size

    # A crash after step 3's metrics but before its checkpoint: the resume recomputes step 3,
    # and TensorBoard's reader shows the recomputed step once (the writer purges from step 3).
    shutil.rmtree(run / "checkpoints" / "step-000003")
    result = marble("train", "--resume", run, "--steps", 3, "--no-progress", "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    check_tensorboard_matches_metrics(run, [1, 2, 3])


def wandb_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, MARBLE_LOAD_PLUGINS="", WANDB_MODE="offline", WANDB_SILENT="true")
    for variable, name in (("WANDB_DIR", "wandb-dir"), ("WANDB_CACHE_DIR", "wandb-cache"),
                           ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CONFIG_DIR", "wandb-config"),
                           ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
        env[variable] = str(root / name)
    return env


def wandb_records(run_folder: Path) -> list[dict]:
    """The offline run's transaction log, read by wandb's own inspector."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> dict[int, dict]:
    return {int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"}


def test_wandb_offline_gets_every_metrics_line_and_the_sample_grids(tmp_path):
    run, env = tmp_path / "run", wandb_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "marble_cli.app", "train", "--out", str(run), "--steps", "2", *TINY,
                           "--set", "sample_every=2", "--report-to", "wandb"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "TrackerWarning" not in done.stderr, done.stderr
    run_id = json.loads((run / TRACKING_FILE).read_text())["wandb_run_id"]
    [folder] = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    assert folder.name.endswith(run_id)

    records = wandb_records(folder)
    [started] = [r["run"] for r in records if r["type"] == "run"]
    assert started["run_id"] == run_id and started["display_name"] == "run"
    rows = {row["step"]: row for row in metric_lines(run)}
    logged = history(records)
    assert sorted(logged) == [0, 1, 2]
    for step in (1, 2):
        for key in [f"reward/{name}" for name in REWARDS] + [f"lambda/{name}" for name in REWARDS] + ["cos/worst"]:
            assert same_value(logged[step][key], rows[step][key]), (key, step)
    for step in (0, 2):  # the sample grids, as wandb image files
        assert logged[step]["samples._type"] == "image-file"
        with Image.open(folder / "files" / logged[step]["samples.path"]) as image, \
                Image.open(run / "samples" / f"step-{step:06d}.png") as grid:
            assert image.size == grid.size
    configs = [r["config"] for r in records if r["type"] == "config"] + [started["config"]]
    assert '"rewards"' in json.dumps(configs)  # the run's config went along


def test_wandb_resume_continues_the_same_run_at_its_own_steps(tmp_path, monkeypatch):
    for variable, value in wandb_env(tmp_path).items():
        if variable.startswith("WANDB_"):
            monkeypatch.setenv(variable, value)
    warnings.simplefilter("error", TrackerWarning)
    (tmp_path / "run").mkdir()  # train() has written config.toml there before the trackers start
    config = TrainConfig(out=str(tmp_path / "run"), report_to=["wandb"])
    with open_tracker(config, start_step=0) as tracker:
        for step in (1, 2):
            tracker.log_metrics({"step": step, "reward/a": step / 10})
    with open_tracker(config, start_step=2) as tracker:  # a resume from the step-2 checkpoint
        tracker.log_metrics({"step": 3, "reward/a": 0.3})
    run_id = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())["wandb_run_id"]
    folders = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    # one W&B run; wandb appends "-1" to the second folder when both start within the same second
    assert len(folders) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", f.name) for f in folders)
    logged = [history(wandb_records(folder)) for folder in folders]
    assert {step: row["reward/a"] for part in logged for step, row in part.items()} == {1: 0.1, 2: 0.2, 3: 0.3}
    assert sorted(logged[1]) == [3]


class Recorder:
    name = "recorder"

    def __init__(self):
        self.calls, self.closed = [], None

    def log_metrics(self, values, step):
        self.calls.append((step, values))

    def log_image(self, tag, image, step, caption):
        self.calls.append((step, tag, image.size, caption))

    def close(self, failed):
        self.closed = failed


class Broken(Recorder):
    name = "broken"

    def log_metrics(self, values, step):
        raise ConnectionError("tracker server unreachable\nlong trace")


def test_a_failing_tracker_is_one_warning_and_the_others_go_on(tmp_path):
    good, broken = Recorder(), Broken()
    tracker = Tracker([broken, good])
    with pytest.warns(TrackerWarning, match=r"tracker broken: log_metrics failed \(ConnectionError: tracker "
                                            r"server unreachable\); training goes on without it"):
        tracker.log_metrics({"step": 1, "reward/a": 0.5, "gram_mode": "affine", "flag": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropped: no second warning
        tracker.log_metrics({"step": 2, "reward/a": float("nan")})
        Image.new("RGB", (6, 4)).save(tmp_path / "grid.png")
        tracker.log_image("samples", tmp_path / "grid.png", 2)
    with tracker:
        pass
    assert tracker.names == [] and good.closed is False
    assert good.calls[0] == (1, {"reward/a": 0.5})
    assert good.calls[1][0] == 2 and math.isnan(good.calls[1][1]["reward/a"])
    assert good.calls[2] == (2, "samples", (6, 4), "step 2")


def test_a_tracker_that_cannot_start_is_a_warning(tmp_path, monkeypatch):
    import wandb

    run = tmp_path / "run"
    run.mkdir()
    (run / TENSORBOARD_DIR).write_text("a file where the event directory should be")

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    config = TrainConfig(out=str(run), report_to=["tensorboard", "wandb"])
    with pytest.warns(TrackerWarning) as caught:
        tracker = open_tracker(config)
    assert [str(w.message).split(":")[0] for w in caught] == ["tracker tensorboard", "tracker wandb"]
    assert "api_key not configured" in str(caught[1].message)
    assert tracker.names == []
    tracker.log_metrics({"step": 1, "reward/a": 1.0})  # nothing left to log to: a no-op
    tracker.close()


def test_scalars_are_the_numeric_entries_of_a_metrics_line():
    line = {"step": 4, "reward/a": 0.25, "n": 3, "gram_mode": "reuse", "flag": False, "missing": None}
    assert scalars(line) == {"reward/a": 0.25, "n": 3.0}


def test_report_to_config_values():
    assert TrainConfig(report_to="none").report_to == []
    assert TrainConfig(report_to=" tensorboard, wandb ,tensorboard").report_to == ["tensorboard", "wandb"]
    assert TrainConfig.from_dict({"report_to": ["wandb"]}).report_to == ["wandb"]
    assert TrainConfig().report_to == []
    with pytest.raises(MarbleError, match=r"report_to names an unknown tracker 'tensorbord'; choose from "
                                          r"tensorboard, wandb"):
        TrainConfig(report_to="tensorbord")
    # trackers may change on resume: they are no part of what makes a run the same run
    assert "report_to" in RESUMABLE_KEYS and "report_to" not in run_fingerprint(TrainConfig())


@pytest.mark.parametrize(("tracker", "modules"), [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
                                                  ("wandb", ["wandb"])])
def test_a_missing_tracker_package_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, tracker, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(MarbleError, match=rf"pip install 'marble-kit\[{tracker}\]'"):
        check_trackers([tracker])
    run = tmp_path / "run"
    result = marble("train", "--out", run, "--steps", 1, *TINY, "--report-to", f"{tracker}")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: --report-to") and "\n" not in message, message
    assert f"pip install 'marble-kit[{tracker}]'" in message
    assert not run.exists()  # refused before anything was written


def test_an_unknown_tracker_is_a_one_line_error(tmp_path):
    result = marble("train", "--out", tmp_path / "run", "--report-to", "tensorbord", "--no-progress")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: config: report_to names an unknown tracker 'tensorbord'; choose from "
                                     "tensorboard, wandb (comma-separated) or none")
