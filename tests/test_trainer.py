"""The training step on the tiny SD3 policy: determinism, Gram modes, errors, learning."""


import pytest
import torch

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.registry import PluginInfo, get_registry
from marble_kit.trainer import Trainer, build_components

TINY = dict(prompts_per_step=3, images_per_prompt=2, timesteps_per_image=1, sample_steps=3,
            out="unused", steps=3)


def _trainer(**overrides) -> Trainer:
    config = TrainConfig(**{**TINY, **overrides})
    return Trainer(config, build_components(config))


def _without_timing(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


@pytest.mark.slow
def test_same_seed_same_metrics_and_weights():
    runs = []
    for _ in range(2):
        trainer = _trainer(seed=3)
        history = [_without_timing(trainer.step()) for _ in range(2)]
        runs.append((history, [p.detach().clone() for p in trainer.params]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    other = _trainer(seed=4)
    assert _without_timing(other.step()) != runs[0][0][0]


@pytest.mark.slow
@pytest.mark.parametrize("kl", [1e-2, 0.0])
def test_affine_and_exact_give_the_same_gram_weights_and_step(kl, monkeypatch):
    """The two-pass `affine` Gram equals K separate backward passes inside the real step (with
    the anchor's own pass when kl > 0, and none without an anchor)."""
    from marble_kit import gram as gram_ops

    passes = []
    exact = gram_ops.per_reward_gradients_exact
    monkeypatch.setattr(gram_ops, "per_reward_gradients_exact",
                        lambda losses, params: passes.append(len(losses)) or exact(losses, params))
    results = {}
    for mode in ("affine", "exact"):
        trainer = _trainer(gram=mode, balancer="mgda-qp", kl=kl)
        metrics = trainer.step()
        # the gradient handed to the optimizer (fused + anchor), before Adam rescales it
        results[mode] = (metrics, torch.cat([p.grad.reshape(-1) for p in trainer.params]))
    (m_a, g_a), (m_e, g_e) = results["affine"], results["exact"]
    for key in m_a:
        if key.startswith(("lambda/", "cos/", "grad_norm/")):
            assert m_a[key] == pytest.approx(m_e[key], rel=2e-3, abs=1e-6), key
    assert torch.allclose(g_a, g_e, rtol=1e-3, atol=1e-3 * float(g_e.abs().max()))
    assert passes == [len(trainer.reward_names) + (kl > 0)]


@pytest.mark.slow
@pytest.mark.parametrize("gram", ["affine", "exact"])
def test_micro_batches_sum_to_the_whole_batch_gradients(gram):
    """micro_batch bounds memory only: per-reward and anchor gradients summed over micro-batches
    give the whole-batch step (measured: relative difference ~4e-5 in float32)."""
    grads = {}
    for micro_batch in (0, 2):
        trainer = _trainer(gram=gram, balancer="mgda-qp", kl=1e-2, micro_batch=micro_batch)
        metrics = trainer.step()
        grads[micro_batch] = (metrics, torch.cat([p.grad.reshape(-1) for p in trainer.params]))
    (whole, g_whole), (parts, g_parts) = grads[0], grads[2]
    assert (g_parts - g_whole).norm() <= 1e-3 * g_whole.norm()
    for key in whole:
        if key.startswith(("lambda/", "cos/", "grad_norm/")):
            assert parts[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_periodic_mode_solves_every_n_steps_and_reuses_weights_between():
    trainer = _trainer(gram="periodic", gram_period=2)
    modes = [trainer.step()["gram_mode"] for _ in range(3)]
    assert modes == ["affine", "reuse", "affine"]
    trainer = _trainer(gram="periodic", gram_period=3)
    first, second = trainer.step(), trainer.step()
    assert second["gram_mode"] == "reuse"
    assert all(first[f"weight/{k}"] == second[f"weight/{k}"] for k in trainer.reward_names)


@pytest.mark.slow
def test_summed_reward_baseline_runs_one_advantage():
    trainer = _trainer(balancer="weighted-sum", balancer_options={"mode": "summed-reward"})
    metrics = trainer.step()
    assert metrics["gram_mode"] == "none"
    assert metrics["weight/summed"] == 1.0


@pytest.mark.slow
def test_a_reward_that_raises_is_an_error_naming_it():
    class Boom:
        name = "boom"

        def __call__(self, images, prompts):
            raise RuntimeError("model exploded")

        def to(self, device):
            return self

    registry = get_registry()
    registry.entries["reward"].pop("boom", None)
    registry.add(PluginInfo("reward", "boom", Boom, "raises", "tests", __name__))
    try:
        trainer = _trainer(rewards=["boom"], prompts=["colors"])
        with pytest.raises(MarbleError, match="reward 'boom' raised RuntimeError: model exploded"):
            trainer.step()
    finally:
        registry.entries["reward"].pop("boom", None)


def test_prompt_tags_must_name_configured_rewards():
    config = TrainConfig(**{**TINY, "rewards": ["color"], "prompts": ["colors:color+sharpness"]})
    with pytest.raises(MarbleError, match="prompt set 'colors' is tagged with reward 'sharpness'"):
        build_components(config)


def test_config_validation_is_one_line():
    with pytest.raises(MarbleError, match="gram must be one of"):
        TrainConfig(gram="sometimes")
    with pytest.raises(MarbleError, match="unknown key 'stepz'.*did you mean 'steps'"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(MarbleError, match="key 'steps' must be int"):
        TrainConfig.from_dict({"steps": "many"})
    with pytest.raises(MarbleError, match="optimizer_sharding must be none or zero"):
        TrainConfig(optimizer_sharding="fsdp")


def test_zero_sharding_refuses_a_balancer_that_reads_all_of_adams_moments():
    config = TrainConfig(**{**TINY, "optimizer_sharding": "zero", "balancer_options": {"metric": "adam"}})
    with pytest.raises(MarbleError, match="optimizer_sharding=\"zero\".*metric 'adam'"):
        Trainer(config, build_components(config))
    # one process: nothing to shard, plain AdamW (its state is what ZeRO checkpoints, gathered)
    single = _trainer(optimizer_sharding="zero")
    assert type(single.optimizer) is torch.optim.AdamW


@pytest.mark.slow
def test_short_run_raises_a_single_offline_reward():
    """15 seeded steps on brightness move held-out brightness up by a clear margin."""
    from marble_kit.evaluate import score_policy
    from marble_kit.prompts import load_prompt_sets

    trainer = _trainer(rewards=["brightness"], prompts=["colors"], prompts_per_step=4,
                       images_per_prompt=4, timesteps_per_image=2, sample_steps=6, lr=1e-2, beta=1.0,
                       kl=1e-4)
    prompts = [p for p in load_prompt_sets(["world_eval"])[0].prompts[:12] for _ in range(2)]
    mask = torch.ones(1, len(prompts), dtype=torch.bool)
    base, _ = score_policy(trainer.policy, trainer.rewards, prompts, mask, seed=5, steps=6)
    for _ in range(15):
        trainer.step()
    after, _ = score_policy(trainer.policy, trainer.rewards, prompts, mask, seed=5, steps=6)
    gain_in_base_std = float((after.mean() - base.mean()) / base.std())
    assert gain_in_base_std > 0.2, gain_in_base_std  # measured ≈ 0.5 at 20 steps


@pytest.mark.slow
def test_offloaded_rewards_visit_the_policy_device_only_while_scoring():
    """reward_device='offload': rewards live on the CPU and are moved for scoring, then back."""
    moves = []

    class Tracking:
        name = "tracking"

        def __call__(self, images, prompts):
            moves.append(("score", str(self.device)))
            return images.mean(dim=(1, 2, 3))

        def to(self, device):
            self.device = torch.device(device)
            moves.append(("to", str(self.device)))
            return self

    registry = get_registry()
    registry.entries["reward"].pop("tracking", None)
    registry.add(PluginInfo("reward", "tracking", Tracking, "tracks devices", "tests", __name__))
    try:
        trainer = _trainer(rewards=["tracking"], prompts=["colors"], reward_device="offload")
        moves.clear()
        trainer.step()
        assert moves == [("to", "cpu"), ("score", "cpu"), ("to", "cpu")]  # policy on the CPU here
        assert trainer.rewards[0].device == torch.device("cpu")
    finally:
        registry.entries["reward"].pop("tracking", None)
