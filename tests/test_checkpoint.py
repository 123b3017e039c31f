"""Checkpoints are written atomically: a save that fails midway leaves the previous one usable."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from marble_kit.checkpoint import (
    FORMAT_VERSION,
    _first_line,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from marble_kit.errors import MarbleError


class FakePolicy:
    """Just enough of a policy for save_checkpoint: an adapter file."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_adapter(self, directory: str) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        if self.fail:
            raise OSError("disk full (injected)")
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"transformer.w.lora_A.weight": torch.ones(2, 2)},
                  str(Path(directory) / "pytorch_lora_weights.safetensors"))


def _state(step: int) -> dict:
    return {"step": step, "policy": {"w": torch.full((3,), float(step))}, "optimizer": {"lr": 0.1}}


META = {"policy": "tiny-sd3", "rewards": ["a"], "balancer": "marble"}


def test_a_save_that_fails_midway_leaves_no_partial_checkpoint_and_the_previous_one_loads(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), FakePolicy(), META)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, _state(2), FakePolicy(fail=True), META)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002.tmp"]
    meta, state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert meta["step"] == 1 and torch.equal(state["policy"]["w"], torch.full((3,), 1.0))
    # the next save of the same step succeeds and replaces the leftover .tmp
    save_checkpoint(tmp_path, 2, _state(2), FakePolicy(), META)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert not (tmp_path / "checkpoints" / "step-000002.tmp").exists()


def test_resaving_a_step_that_fails_keeps_the_complete_copy(tmp_path):
    save_checkpoint(tmp_path, 3, _state(3), FakePolicy(), META)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, _state(30), FakePolicy(fail=True), META)
    _meta, state = load_checkpoint(tmp_path / "checkpoints" / "step-000003")
    assert torch.equal(state["policy"]["w"], torch.full((3,), 3.0))


# ------------------------------------------------------------------ names, listing, layout
def test_names_and_the_steps_they_encode():
    assert checkpoint_name(3) == "step-000003" and checkpoint_name(1_234_567) == "step-1234567"
    assert checkpoint_step("runs/a/checkpoints/step-000012") == 12
    assert checkpoint_step(Path("step-1234567")) == 1_234_567
    for other in ("step-000012.tmp", "step-000012.old", "step-12", "xstep-000012", "step-00001a", "adapter"):
        assert checkpoint_step(other) is None, other


def test_listing_keeps_complete_checkpoints_in_step_order(tmp_path):
    assert list_checkpoints(tmp_path) == []
    for step in (10, 1_000_000, 2, 999_999):  # by step, not by name: step-1000000 < step-999999
        save_checkpoint(tmp_path, step, _state(step), FakePolicy(), META)
    root = tmp_path / "checkpoints"
    (root / "step-000003.tmp").mkdir()
    (root / "step-000003.tmp" / "meta.json").write_text("{}")  # half-written: ignored
    (root / "step-000004").mkdir()                              # no meta.json: ignored
    (root / "step-000005").write_text("a file")                 # not a directory: ignored
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 10, 999_999, 1_000_000]
    assert all(p.parent == root for p in list_checkpoints(tmp_path))


def test_a_checkpoint_lists_every_file_with_its_size_and_sha256(tmp_path):
    weights = torch.arange(6.0).reshape(2, 3).t()  # not contiguous, and a leaf that wants grad
    state = {"step": 7, "policy": {"w": weights.requires_grad_(True)}, "optimizer": {"lr": 0.5}}
    path = save_checkpoint(tmp_path, 7, state, FakePolicy(), META)
    assert path == tmp_path / "checkpoints" / "step-000007" and "policy" in state  # input left whole
    meta = json.loads((path / "meta.json").read_text())
    assert {k: meta[k] for k in META} == META and meta["step"] == 7 and meta["format"] == FORMAT_VERSION
    assert set(meta["files"]) == {"policy.safetensors", "state.pt", "adapter/pytorch_lora_weights.safetensors"}
    for name, record in meta["files"].items():
        data = (path / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000007"]  # no .tmp
    loaded_meta, loaded = load_checkpoint(path)
    assert loaded_meta == meta and loaded["step"] == 7 and loaded["optimizer"] == {"lr": 0.5}
    assert torch.equal(loaded["policy"]["w"], weights.detach()) and not loaded["policy"]["w"].requires_grad


def test_keep_prunes_all_but_the_newest(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, _state(step), FakePolicy(), META, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    save_checkpoint(tmp_path, 5, _state(5), FakePolicy(), META, keep=0)  # 0 keeps every one
    save_checkpoint(tmp_path, 6, _state(6), FakePolicy(), META)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [3, 4, 5, 6]
    save_checkpoint(tmp_path, 7, _state(7), FakePolicy(), META, keep=1)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [7]


def test_resaving_a_step_replaces_it_and_clears_a_stale_old_copy(tmp_path):
    save_checkpoint(tmp_path, 3, _state(3), FakePolicy(), META)
    (tmp_path / "checkpoints" / "step-000003.old").mkdir()  # left by a crash mid-swap
    save_checkpoint(tmp_path, 3, {**_state(3), "policy": {"w": torch.full((3,), 30.0)}}, FakePolicy(), META)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]
    _meta, state = load_checkpoint(tmp_path / "checkpoints" / "step-000003")
    assert torch.equal(state["policy"]["w"], torch.full((3,), 30.0))


# -------------------------------------------------------------- damaged checkpoints: one line
def _saved(tmp_path, step=4):
    return save_checkpoint(tmp_path, step, _state(step), FakePolicy(), META)


def _rewrite(checkpoint, name, data: bytes, *, record: bool = True):
    """Replace a file; with ``record`` also update meta.json's size/sha256 so only the content is wrong."""
    (checkpoint / name).write_bytes(data)
    if record:
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (checkpoint / "meta.json").write_text(json.dumps(meta))


def _edit_meta(checkpoint, edit):
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps(edit(meta)))


def _error(checkpoint) -> str:
    with pytest.raises(MarbleError) as info:
        load_checkpoint(checkpoint)
    message = str(info.value)
    assert "\n" not in message
    return message


def _unusable(checkpoint) -> str:
    """The reason of a "checkpoint … is unusable" error (checked to name the checkpoint and the way out)."""
    message = _error(checkpoint)
    head = f"checkpoint {checkpoint} is unusable: "
    tail = "; resume or evaluate an earlier checkpoint (delete this one to make `--resume` use the previous one)"
    assert message.startswith(head) and message.endswith(tail), message
    return message[len(head):-len(tail)]


def test_meta_json_problems_are_one_line_errors(tmp_path):
    assert _error(tmp_path) == (f"{tmp_path} is not a marble checkpoint (no meta.json); pass a "
                                "checkpoints/step-NNNNNN directory or a run directory")
    path = _saved(tmp_path)
    (path / "meta.json").write_text('{"step": 4, "pol')
    assert _unusable(path) == "meta.json is not valid JSON (truncated or overwritten)"
    (path / "meta.json").write_bytes(b"\xff\xfe\x00")
    assert _unusable(path) == "meta.json is not valid JSON (truncated or overwritten)"
    for broken in ([1, 2], {"policy": "p"}, {"step": "4", "policy": "p"}, {"step": 4}):
        (path / "meta.json").write_text(json.dumps(broken))
        assert _unusable(path) == "meta.json lacks the step and policy entries", broken
    (path / "meta.json").write_text(json.dumps({"step": 4, "policy": "p", "format": 1}))
    assert _error(path) == (f"checkpoint {path} has format 1, this marble-kit reads format {FORMAT_VERSION}; "
                            "use the marble-kit version that wrote it")
    (path / "meta.json").write_text(json.dumps({"step": 4, "policy": "p"}))
    assert "has format None" in _error(path)


def test_missing_truncated_and_corrupted_files_are_named(tmp_path):
    path = _saved(tmp_path)
    _edit_meta(path, lambda m: {**m, "files": "none"})
    assert _unusable(path) == "meta.json lists no file checksums"
    _edit_meta(path, lambda m: {**m, "files": {"state.pt": {}}})
    assert _unusable(path) == "meta.json lists no file checksums"
    path = _saved(tmp_path, 5)
    (path / "state.pt").unlink()
    assert _unusable(path) == "state.pt is missing"
    path = _saved(tmp_path, 6)
    data = (path / "policy.safetensors").read_bytes()
    (path / "policy.safetensors").write_bytes(data[:-3])
    assert _unusable(path) == (f"policy.safetensors has {len(data) - 3} bytes, {len(data)} were written "
                               "(truncated or overwritten)")
    (path / "policy.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert _unusable(path) == "policy.safetensors does not match its sha256 (corrupted on disk)"


def test_the_two_state_files_are_all_a_manifest_needs(tmp_path):
    path = _saved(tmp_path)
    _edit_meta(path, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if "/" not in k}})
    assert load_checkpoint(path)[1]["step"] == 4


class Unlisted:
    """Not a tensor or a plain container: a weights-only load must refuse it."""


def _state_file(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_files_that_match_their_checksums_but_do_not_load(tmp_path):
    from safetensors.torch import save as safetensors_bytes

    path = _saved(tmp_path)
    _rewrite(path, "adapter/pytorch_lora_weights.safetensors", safetensors_bytes({}))
    assert _unusable(path) == "adapter/pytorch_lora_weights.safetensors holds no tensors"
    path = _saved(tmp_path, 5)
    _rewrite(path, "policy.safetensors", b"not a safetensors file")
    assert _unusable(path) == "a safetensors file does not load (Error while deserializing header: header too large)"
    path = _saved(tmp_path, 6)
    _rewrite(path, "state.pt", b"garbage")
    assert _unusable(path).startswith("state.pt does not load (Weights only load failed.")
    _rewrite(path, "state.pt", _state_file({"step": 6, "thing": Unlisted()}))  # no unpickling of code
    assert _unusable(path).startswith("state.pt does not load (Weights only load failed.")
    path = _saved(tmp_path, 7)
    for wrong in ({"step": 8}, [7], {"optimizer": {}}):
        _rewrite(path, "state.pt", _state_file(wrong))
        assert _unusable(path) == "state.pt does not hold the state of step 7", wrong
    path = _saved(tmp_path, 1)
    _rewrite(path, "state.pt", _state_file({"optimizer": {}}))
    assert _unusable(path) == "state.pt does not hold the state of step 1"


def test_state_tensors_load_onto_the_cpu(tmp_path):
    state = {**_state(2), "generator": torch.Generator().manual_seed(3).get_state(), "lam": torch.tensor([0.25, 0.75])}
    path = save_checkpoint(tmp_path, 2, state, FakePolicy(), META)
    loaded = load_checkpoint(path)[1]
    assert torch.equal(loaded["generator"], state["generator"]) and loaded["lam"].device.type == "cpu"


def test_every_file_and_the_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = _saved(tmp_path / "new" / "run")  # the run directory does not exist yet
    tmp = path.with_name(path.name + ".tmp")
    names = {"meta.json", "policy.safetensors", "state.pt", "adapter/pytorch_lora_weights.safetensors"}
    assert {p.relative_to(tmp).as_posix() for p in synced if p.is_relative_to(tmp)} == names
    assert synced[-1] == path.parent  # the rename itself, made durable


def test_error_messages_keep_the_first_line_of_a_long_cause():
    assert _first_line(ValueError("short\nsecond line")) == "short"
    assert _first_line(ValueError("")) == "ValueError"
    long = _first_line(OSError("x" * 200))
    assert len(long) == 120 and long == "x" * 119 + "…"
    assert _first_line(OSError("y" * 120)) == "y" * 120


def test_resolve_takes_a_checkpoint_or_the_latest_of_a_run(tmp_path):
    with pytest.raises(MarbleError) as info:
        resolve_checkpoint(tmp_path / "nowhere")
    assert str(info.value) == f"{tmp_path / 'nowhere'} does not exist; pass a run directory or a checkpoint directory"
    with pytest.raises(MarbleError) as info:
        resolve_checkpoint(tmp_path)
    assert str(info.value) == (f"{tmp_path} holds no checkpoint (expected checkpoints/step-NNNNNN/); "
                               "pass a run directory of `marble train` or a checkpoint directory")
    first, _, last = _saved(tmp_path, 2), _saved(tmp_path, 5), _saved(tmp_path, 11)
    assert resolve_checkpoint(tmp_path) == last
    assert resolve_checkpoint(first) == first
    assert resolve_checkpoint(str(first)) == first


def test_an_old_checkpoint_that_cannot_be_pruned_does_not_fail_the_save(tmp_path, monkeypatch):
    """Pruning is best effort: a file of an old checkpoint that cannot be removed (another
    process holds it, a read-only mount) leaves that checkpoint behind; the new one is saved."""
    save_checkpoint(tmp_path, 1, _state(1), FakePolicy(), META)
    unlink = os.unlink

    def refuse_in_step_1(path, *args, **kwargs):
        if "step-000001" in str(path) or "dir_fd" in kwargs:
            raise PermissionError(13, "Permission denied (injected)", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_in_step_1)
    final = save_checkpoint(tmp_path, 2, _state(2), FakePolicy(), META, keep=1)
    monkeypatch.undo()
    assert final.name == "step-000002" and load_checkpoint(final)[1]["step"] == 2
    assert (tmp_path / "checkpoints" / "step-000001").exists()
