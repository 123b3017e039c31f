"""Checkpoints are written atomically: a save that fails midway leaves the previous one usable."""

from __future__ import annotations

import pytest
import torch

from marble_kit.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


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
    assert not (tmp_path / "checkpoints" / "step-000002").exists()  # only a .tmp, which is ignored
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
