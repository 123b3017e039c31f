"""NaN-aware per-reward group advantages (SPEC §1.3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.advantages import group_advantages, reward_statistics, summed_rewards


def test_constant_reward_gives_zero_advantage_and_half_probability():
    rewards = torch.full((2, 8), 3.0)
    adv = group_advantages(rewards, torch.arange(8) // 4)
    assert torch.all(adv.advantages == 0)
    assert torch.all(adv.probabilities == 0.5)


def test_nan_samples_are_ignored_and_get_zero_advantage():
    rewards = torch.tensor([[1.0, float("nan"), 3.0, 5.0, float("nan"), float("nan")]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, eps=0.0)
    # group 0 mean over valid = 2; global std over the valid values {1, 3, 5}
    std = torch.tensor([1.0, 3.0, 5.0]).std(unbiased=False)
    expected = torch.tensor([-1 / std, 0.0, 1 / std, 0.0, 0.0, 0.0])
    assert torch.allclose(adv.advantages[0], expected.float(), atol=1e-6)
    assert adv.valid.tolist() == [[True, False, True, True, False, False]]
    assert adv.probabilities[0, 1] == 0.5


def test_all_nan_reward_is_harmless():
    rewards = torch.full((1, 4), float("nan"))
    adv = group_advantages(rewards, torch.zeros(4, dtype=torch.long))
    assert torch.all(adv.probabilities == 0.5)
    assert math.isnan(reward_statistics(rewards, ["x"])["reward/x"])


def test_group_std_scope():
    rewards = torch.tensor([[0.0, 2.0, 0.0, 20.0]])
    adv = group_advantages(rewards, torch.tensor([0, 0, 1, 1]), std_scope="group", eps=0.0)
    assert torch.allclose(adv.advantages, torch.tensor([[-1.0, 1.0, -1.0, 1.0]]))
    with pytest.raises(ValueError):
        group_advantages(rewards, torch.tensor([0, 0, 1, 1]), std_scope="batch")


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), clip=st.sampled_from([0.5, 1.0, 5.0]), scale=st.floats(1e-3, 1e3))
def test_properties(seed, clip, scale):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(3, 12, generator=g) * scale
    rewards[torch.rand(3, 12, generator=g) < 0.2] = float("nan")
    groups = torch.arange(12) // 4
    adv = group_advantages(rewards, groups, clip=clip)
    assert adv.advantages.abs().max() <= clip + 1e-6
    assert torch.all((adv.probabilities >= 0) & (adv.probabilities <= 1))
    # both are float32 roundings of the same float64 value: equal to a few ulps
    assert torch.allclose(adv.probabilities, 0.5 + adv.advantages / (2 * clip), atol=1e-6)
    # centred within each group over the valid entries (before clipping, when nothing clips)
    if adv.advantages.abs().max() < clip - 1e-3:
        for k in range(3):
            for grp in range(3):
                sel = (groups == grp) & adv.valid[k]
                assert abs(float(adv.advantages[k][sel].sum())) < 1e-4
    # invariant to an affine change of the reward scale (group-normalised)
    adv2 = group_advantages(rewards * 7.0 + 3.0, groups, clip=clip, eps=0.0)
    adv1 = group_advantages(rewards, groups, clip=clip, eps=0.0)
    assert torch.allclose(adv1.advantages, adv2.advantages, atol=1e-4)


def test_summed_rewards_nan_aware():
    rewards = torch.tensor([[1.0, float("nan"), float("nan")], [2.0, 3.0, float("nan")]])
    total = summed_rewards(rewards, torch.tensor([1.0, 2.0]))
    assert total[0, 0] == 5.0 and total[0, 1] == 6.0 and math.isnan(total[0, 2])
