"""Bad input to `marble train` / `marble eval` / `marble plot`: a one-line error on stderr, exit
code 2, and every file already on disk unchanged (bytes and mtimes compared before/after)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from cli_runs import marble

from marble_kit.checkpoint import list_checkpoints
from marble_kit.config import TrainConfig, read_toml

TINY = ["--set", "prompts_per_step=3", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=4", "--set", "threads=1", "--set", "sample_every=0", "--no-progress"]


def snapshot(root: Path) -> dict[str, tuple[str, int | None]]:
    """sha256 and mtime of every file under ``root``, plus every directory (its name only: a
    refused `marble train` takes the run directory's lock, which adds and removes a lock file)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                      path.stat().st_mtime_ns)
        else:
            out[path.relative_to(root).as_posix()] = ("dir", None)
    return out


def assert_refused(root: Path, *args, match: str) -> str:
    """Run the command; it must fail with exit 2, one stderr line matching ``match``, no disk change,
    and print nothing else (no `marble train → …` header before the error)."""
    before = snapshot(root)
    result = marble(*args)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    assert match in message, message
    assert result.stdout == "", result.stdout
    assert snapshot(root) == before, "files on disk changed"
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = marble("train", "--out", run, "--steps", 2, *TINY, "--set", "checkpoint_every=1")
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_checkpoints(run)] == ["step-000001", "step-000002"]
    return run


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("toml_text, match", [
    ("stepz = 3\n", "unknown key 'stepz' (did you mean 'steps'?)"),
    ("steps = 'ten'\n", "key 'steps' must be int"),
    ("steps = \n", "is not valid TOML"),
    ("gram = 'sideways'\n", "gram must be one of"),
])
def test_bad_config_file(tmp_path, toml_text, match):
    config = tmp_path / "run.toml"
    config.write_text(toml_text)
    assert_refused(tmp_path, "train", "--config", config, "--out", tmp_path / "out", *TINY, match=match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, match", [
    ("prompts_per_stp=3", "unknown key 'prompts_per_stp'"),
    ("beta", "--set 'beta' is malformed"),
    ("lr=fast", "key 'lr' must be float"),
])
def test_bad_set_option(tmp_path, setting, match):
    assert_refused(tmp_path, "train", "--out", tmp_path / "out", *TINY, "--set", setting, match=match)
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path):
    assert_refused(tmp_path, "train", "--config", tmp_path / "nope.toml", "--out", tmp_path / "out",
                   match="does not exist")


# ------------------------------------------------------------------ prompts

@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", "# only a comment\n\n", "has no prompts"),
    ("missing.txt", None, "is neither a file nor a built-in set"),
    ("broken.jsonl", '{"prompt": "a red circle"}\n{"prompt": \n', "broken.jsonl line 2"),
])
def test_bad_prompts_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert_refused(tmp_path, "train", "--out", tmp_path / "out", "--steps", 1, "--prompts", path, *TINY,
                   match=match)
    assert not (tmp_path / "out").exists()


def test_eval_with_an_empty_prompts_file(run_copy, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert_refused(tmp_path, "eval", run_copy, "--prompts", empty, match="has no prompts")


# ------------------------------------------------------------------ run directories

def test_out_directory_holding_a_different_run(run_copy, tmp_path):
    message = assert_refused(tmp_path, "train", "--out", run_copy, "--steps", 2, *TINY, "--lr", "0.01",
                             match="already holds a different run")
    assert "lr" in message


def test_out_directory_holding_this_runs_results(run_copy, tmp_path):
    assert_refused(tmp_path, "train", "--out", run_copy, "--steps", 2, *TINY, "--set", "checkpoint_every=1",
                   match="pass --resume")


def test_out_directory_with_unrelated_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_refused(tmp_path, "train", "--out", tmp_path / "out", *TINY, match="holds no marble run")


@pytest.mark.parametrize("names", ["", ",", " , "])
def test_rewards_naming_nothing(tmp_path, names):
    assert_refused(tmp_path, "train", "--rewards", names, "--out", tmp_path / "out", *TINY,
                   match=f"--rewards {names!r} names nothing")
    assert not (tmp_path / "out").exists()


def test_a_failed_start_leaves_no_directory_and_the_fixed_command_runs(tmp_path):
    out = tmp_path / "runs" / "new" / "out"
    assert_refused(tmp_path, "train", "--out", out, "--steps", 1, "--prompts", tmp_path / "typo.txt", *TINY,
                   match="typo.txt")
    assert not (tmp_path / "runs").exists()  # no directory (nor parent, nor lock file) stays behind
    result = marble("train", "--out", out, "--steps", 1, *TINY)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("marble train → ")  # the header, once the checks passed
    assert not (out / ".marble.lock").exists()


def test_a_stale_lock_file_does_not_count_as_content(tmp_path):
    """kill -9 before the first write leaves the run directory with only its (unlocked) lock file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".marble.lock").write_text("4242 somehost\n")
    result = marble("train", "--out", out, "--steps", 1, *TINY)
    assert result.exit_code == 0, result.output
    assert (out / "config.toml").is_file()


HOLD_LOCK = ("import sys, time\n"
             "from marble_kit.run import RunDirectoryLock\n"
             "RunDirectoryLock.acquire(sys.argv[1])\n"
             "print('held', flush=True)\n"
             "time.sleep(600)\n")


def test_a_second_writer_is_refused_naming_the_holder_until_the_holder_dies(run_copy, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["train", "--resume", run_copy, "--steps", 3],
                     ["train", "--out", run_copy, "--steps", 2, *TINY, "--set", "checkpoint_every=1"]):
            message = assert_refused(tmp_path, *args, match=f"in use by another marble process (pid {holder.pid})")
            assert "choose another --out" in message
    finally:
        holder.kill()  # like kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    assert (run_copy / ".marble.lock").exists()
    result = marble("train", "--resume", run_copy, "--steps", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and not (run_copy / ".marble.lock").exists()


def test_resume_of_a_directory_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, "train", "--resume", tmp_path / "empty", match="no config.toml")


def test_resume_with_changed_options(run_copy, tmp_path):
    assert_refused(tmp_path, "train", "--resume", run_copy, "--steps", 4, "--rewards", "color",
                   match="only --steps and --report-to may be given (got rewards)")


def test_resume_of_a_finished_run(run_copy, tmp_path):
    assert_refused(tmp_path, "train", "--resume", run_copy, "--steps", 2, match="already at step 2")


# ------------------------------------------------------------------ foreign checkpoints

def _edit_run_config(run: Path, **changes) -> None:
    data = read_toml(run / "config.toml")
    data.update(changes)
    TrainConfig.from_dict(data)  # still a valid config: only the checkpoint is foreign
    (run / "config.toml").write_text(tomli_w.dumps(data))


@pytest.mark.parametrize("changes, match", [
    ({"policy": "sd3.5"}, "trained with policy 'tiny-sd3', not 'sd3.5'"),
    ({"policy_options": {"rank": 4}}, "trained with policy options {}"),
    ({"rewards": ["color", "sharpness"]}, "trained with rewards color,shape,centering"),
])
def test_resume_with_a_checkpoint_from_another_policy_or_reward_set(run_copy, tmp_path, changes, match):
    _edit_run_config(run_copy, **changes)
    assert_refused(tmp_path, "train", "--resume", run_copy, "--steps", 4, match=match)


def test_eval_of_a_checkpoint_dropped_into_another_policys_run(run_copy, tmp_path):
    _edit_run_config(run_copy, policy="sd3.5")
    assert_refused(tmp_path, "eval", run_copy, match="trained with policy 'tiny-sd3', not 'sd3.5'")


# ------------------------------------------------------------------ corrupt checkpoints

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: loaders would not notice, the checksum does
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated state.pt": ("state.pt", _truncate, "state.pt has"),
    "flipped byte in policy.safetensors": ("policy.safetensors", _flip_byte, "does not match its sha256"),
    "missing adapter": ("adapter/pytorch_lora_weights.safetensors", Path.unlink, "is missing"),
    "garbled meta.json": ("meta.json", lambda p: p.write_text('{"step": 2, "pol'), "meta.json is not valid JSON"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("command", ["resume", "eval"])
def test_corrupt_or_truncated_latest_checkpoint(run_copy, tmp_path, corruption, command):
    name, damage, match = CORRUPTIONS[corruption]
    damage(run_copy / "checkpoints" / "step-000002" / name)
    args = (["train", "--resume", run_copy, "--steps", 4] if command == "resume"
            else ["eval", run_copy, "--out", tmp_path / "eval"])
    message = assert_refused(tmp_path, *args, match=match)
    assert "step-000002" in message and "earlier checkpoint" in message
    assert not (tmp_path / "eval").exists()


def test_after_deleting_the_corrupt_checkpoint_resume_uses_the_previous_one(run_copy):
    _truncate(run_copy / "checkpoints" / "step-000002" / "state.pt")
    shutil.rmtree(run_copy / "checkpoints" / "step-000002")
    result = marble("train", "--resume", run_copy, "--steps", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 2 was recomputed from the step-1 checkpoint
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000002", "step-000003"]


# ------------------------------------------------------------------ eval / plot targets

def test_eval_of_a_path_that_does_not_exist(tmp_path):
    assert_refused(tmp_path, "eval", tmp_path / "nowhere", match="does not exist")


def test_eval_of_a_directory_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    assert_refused(tmp_path, "eval", tmp_path / "run", match="holds no checkpoint")


def test_eval_with_an_unknown_reward(run_copy, tmp_path):
    assert_refused(tmp_path, "eval", run_copy, "--rewards", "colour", match="colour")


def test_plot_of_a_directory_without_metrics(tmp_path):
    assert_refused(tmp_path, "plot", tmp_path, match="has no metrics.jsonl")
