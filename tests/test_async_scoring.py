"""Scoring the K rewards in threads, and `reward_staleness = 1` (the rewards of step s computed
while step s+1's rollout is drawn), on the tiny SD3 policy.

* threads change nothing: the scores are bitwise those of one reward after the other;
* with staleness the update of step s ≥ 1 trains on the samples the old policy drew *before*
  update s−1 (without it: before update s), checked through the weights each rollout saw;
* a checkpoint holds the recipe of the pending rollout, and a trainer restored from it steps
  bitwise like the one that never stopped;
* a reward that fails leaves the trainer at its last complete step (generator, sampler and
  pending rollout restored): the same step taken again equals the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import threading

import pytest
import torch

from marble_kit.checkpoint import load_checkpoint, save_checkpoint
from marble_kit.config import TrainConfig
from marble_kit.trainer import RewardFailure, Trainer, build_components

TINY = dict(prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2, out="unused",
            steps=3, rewards=["color", "shape", "centering"], checkpoint_every=0, sample_every=0)


def _trainer(**overrides) -> Trainer:
    config = TrainConfig(**{**TINY, **overrides})
    return Trainer(config, build_components(config))


def _clean(metrics: dict) -> dict:
    """Metrics without clocks, NaN as a string (so that equal runs compare equal)."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v
            for k, v in metrics.items() if not k.startswith("time/")}


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].numpy().tobytes())
    return digest.hexdigest()


def test_rewards_scored_in_threads_are_bitwise_the_sequential_scores():
    trainer = _trainer(rewards=["color", "shape", "centering", "sharpness", "colorfulness"])
    drawn = trainer._rollout()
    seen: list[str] = []
    for reward in trainer.rewards:  # record which thread scores each reward
        original = reward.score
        reward.score = lambda images, prompts, _f=original: seen.append(threading.current_thread().name) or _f(
            images, prompts)
    args = (drawn.rollout.images, drawn.prompts, drawn.set_ids)
    concurrent = trainer._score(*args)
    assert len(seen) == 5 and all(name.startswith("marble-reward") for name in seen)
    trainer.config.reward_threads = 1
    seen.clear()
    sequential = trainer._score(*args)
    assert seen == ["MainThread"] * 5
    assert torch.equal(concurrent.isnan(), sequential.isnan())
    assert torch.equal(concurrent.nan_to_num(), sequential.nan_to_num())


def _record_rollouts(trainer: Trainer) -> list[tuple[str, torch.Tensor]]:
    """Every rollout the trainer draws: (digest of the policy weights it was drawn with, images)."""
    drawn = []
    sample = trainer.policy.sample

    def recorded(*args, **kwargs):
        rollout = sample(*args, **kwargs)
        drawn.append((_digest(trainer.policy.state_dict()), rollout.images))
        return rollout

    trainer.policy.sample = recorded
    return drawn


@pytest.mark.parametrize("staleness", [0, 1])
def test_staleness_trains_on_the_samples_drawn_before_the_last_update(staleness):
    trainer = _trainer(reward_staleness=staleness)
    drawn = _record_rollouts(trainer)
    scored = []
    score = trainer._score
    trainer._score = lambda images, prompts, set_ids: scored.append(images) or score(images, prompts, set_ids)
    weights = []  # the policy's weights at the start of step s
    for _ in range(3):
        weights.append(_digest(trainer.policy.state_dict()))
        trainer.step()
    # the images step s trained on, and the weights they were drawn with
    assert len(scored) == 3 and len(drawn) == 3 + staleness  # staleness: one rollout ahead
    for step, images in enumerate(scored):
        index = next(i for i, (_, d) in enumerate(drawn) if torch.equal(d, images))
        assert index == step
        expected = weights[max(step - staleness, 0)]  # step 0 has nothing older than the start
        assert drawn[index][0] == expected, f"step {step}"
    if staleness:  # the pending rollout, drawn during the last step: that step's weights
        assert drawn[-1][0] == weights[-1]


def test_a_checkpoint_holds_the_pending_rollout_and_resumes_bitwise(tmp_path):
    straight = _trainer(reward_staleness=1)
    expected = [_clean(straight.step()) for _ in range(3)]

    stopped = _trainer(reward_staleness=1)
    assert [_clean(stopped.step()) for _ in range(2)] == expected[:2]
    state = stopped.state_dict()
    assert set(state["pending_rollout"]) == {"policy", "generator", "sampler"}
    path = save_checkpoint(tmp_path, 2, state, stopped.policy, {"policy": "tiny-sd3"})
    _, loaded = load_checkpoint(path)  # safetensors + torch.load(weights_only=True), as a resume does

    resumed = _trainer(reward_staleness=1)
    resumed.load_state_dict(loaded)
    assert torch.equal(resumed._pending.rollout.images, stopped._pending.rollout.images)
    assert torch.equal(resumed.generator.get_state(), stopped.generator.get_state())
    assert _clean(resumed.step()) == expected[2]
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, straight.params))


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_failed_reward_leaves_the_trainer_at_its_last_complete_step(staleness):
    reference = _trainer(reward_staleness=staleness)
    expected = [_clean(reference.step()) for _ in range(2)]

    trainer = _trainer(reward_staleness=staleness)
    assert _clean(trainer.step()) == expected[0]
    flaky = trainer.rewards[1]
    original = flaky.score

    def fail_once(images, prompts):
        flaky.score = original
        raise RuntimeError("the reward's GPU fell off the bus")

    flaky.score = fail_once
    with pytest.raises(RewardFailure, match="reward 'shape' raised RuntimeError: the reward's GPU fell off"):
        trainer.step()
    assert trainer.step_count == 1
    assert _clean(trainer.step()) == expected[1]  # the same step again, as if it never failed
    assert all(torch.equal(a, b) for a, b in zip(trainer.params, reference.params))
