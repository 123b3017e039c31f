"""NaN-aware per-reward group advantages (SPEC §1.3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.advantages import Advantages, group_advantages, reward_statistics, summed_rewards


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


def test_default_eps_and_clip_by_hand():
    """One group {0, 1}: centred ±0.5, global std 0.5, A = ±0.5/(0.5 + 1e-4), r = 0.5 + A/10."""
    adv = group_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([0, 0]))
    a = 0.5 / (0.5 + 1e-4)
    assert adv.advantages[0].tolist() == pytest.approx([-a, a], rel=1e-6)
    assert adv.probabilities[0].tolist() == pytest.approx([0.5 - a / 10, 0.5 + a / 10], rel=1e-6)
    # one image far from 99 equal ones: A ≈ 9.95 before the default clip at 5
    outlier = torch.zeros(1, 100)
    outlier[0, 7] = 1.0
    adv = group_advantages(outlier, torch.zeros(100, dtype=torch.long))
    assert adv.advantages[0, 7] == 5.0 and adv.probabilities[0, 7] == 1.0


def test_each_reward_is_scaled_by_its_own_std():
    rewards = torch.tensor([[0.0, 2.0, 0.0, 2.0], [0.0, 20.0, 0.0, 20.0], [1.0, 1.0, 5.0, 3.0]])
    adv = group_advantages(rewards, torch.tensor([0, 0, 1, 1]), eps=0.0)
    std_last = torch.tensor([1.0, 1.0, 5.0, 3.0]).std(unbiased=False)
    expected = torch.tensor([[-1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, 1.0],
                             [0.0, 0.0, 1 / std_last, -1 / std_last]])
    assert torch.allclose(adv.advantages, expected, atol=1e-6)


def test_a_group_of_equal_scores_prefers_nothing_exactly():
    """0.1 + 0.1 + 0.1 over 3 is not 0.1 in floating point: the group is still exactly indifferent,
    also with an unjudged image in it, while the other group keeps its preference."""
    nan = float("nan")
    rewards = torch.tensor([[0.1, 0.1, nan, 0.1, 0.2, 0.9, 0.2, 0.2],
                            [nan, nan, nan, nan, nan, nan, nan, nan]], dtype=torch.float64)
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert (adv.advantages[0, :4] == 0).all() and (adv.advantages[0, 4:] != 0).all()
    assert (adv.probabilities[0, :4] == 0.5).all()
    assert adv.judged().tolist() == [7, 0]
    assert adv.expresses_preference().tolist() == [True, False]
    indifferent = group_advantages(rewards[:, :4], torch.tensor([0, 0, 0, 0]))
    assert indifferent.expresses_preference().tolist() == [False, False]
    # a judged reward whose only nonzero advantages sit on unjudged images would be a bug
    assert not Advantages(torch.ones(1, 2), torch.full((1, 2), 0.5), torch.zeros(1, 2, dtype=torch.bool)
                          ).expresses_preference().item()


def test_inputs_of_any_float_dtype_and_one_reward_as_a_vector():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(2, 12, generator=g)
    groups = torch.arange(12) // 4
    reference = group_advantages(rewards.double(), groups)
    for dtype in (torch.float32, torch.bfloat16):
        low = rewards.to(dtype)
        adv = group_advantages(low, groups)   # computed in float64 whatever comes in
        exact = group_advantages(low.double(), groups)
        assert torch.equal(adv.advantages, exact.advantages) and torch.equal(adv.probabilities, exact.probabilities)
    assert torch.allclose(group_advantages(rewards, groups).advantages, reference.advantages, atol=1e-5)
    vector = group_advantages(rewards[0], groups)
    assert vector.advantages.shape == (1, 12) and torch.equal(vector.advantages, reference.advantages[:1])
    assert group_advantages(torch.zeros(2, 0), torch.zeros(0, dtype=torch.long)).advantages.shape == (2, 0)
    with pytest.raises(ValueError, match=r"std_scope must be one of \('global', 'group'\), got 'batch'"):
        group_advantages(rewards, groups, std_scope="batch")


def test_summed_rewards_keep_the_rewards_dtype():
    rewards = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    total = summed_rewards(rewards, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert total.dtype == torch.float32 and total.tolist() == [[6.5, 1.0]]


def test_reward_statistics_by_hand():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 3.0, nan, nan], [nan, nan, nan, nan], [2.0, 2.0, 2.0, 6.0]])
    stats = reward_statistics(rewards, ["a", "none", "c"])
    assert (stats["reward/a"], stats["reward_std/a"], stats["reward_coverage/a"]) == (2.0, 1.0, 0.5)
    assert math.isnan(stats["reward/none"]) and math.isnan(stats["reward_std/none"])
    assert stats["reward_coverage/none"] == 0.0
    assert stats["reward/c"] == 3.0 and stats["reward_std/c"] == pytest.approx(3 ** 0.5)  # population std
    assert stats["reward_coverage/c"] == 1.0
    empty = reward_statistics(torch.zeros(1, 0), ["x"])
    assert empty["reward_coverage/x"] == 0.0 and math.isnan(empty["reward/x"])
    assert set(stats) == {f"{kind}/{name}" for kind in ("reward", "reward_std", "reward_coverage")
                          for name in ("a", "none", "c")}
