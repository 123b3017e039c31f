"""The training step on the tiny SD3 policy: determinism, Gram modes, errors, learning."""

import dataclasses
import math
import warnings

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


def _spy(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that still runs it and records every call as
    (args, kwargs, result); returns that record."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapper)
    return calls


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
    # each micro-batch counts its share of a pass (exact skips a reward's pass in a micro-batch
    # where it judges no row, so only affine's count is the whole batch's)
    if gram == "affine":
        assert parts["backward_passes"] == pytest.approx(whole["backward_passes"]) == pytest.approx(3.0)
    else:
        assert 1.0 < parts["backward_passes"] <= whole["backward_passes"]
    assert parts["time/gradient_step"] > 0 and whole["time/gradient_step"] > 0
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
    batch, metrics = _captured_step(trainer)
    assert batch.r.shape[0] == 1  # one advantage, of the summed rewards
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


def test_reward_options_reach_their_reward():
    config = TrainConfig(**{**TINY, "reward_options": {"color": {"bogus": 1}}})
    with pytest.raises(MarbleError, match="reward 'color' has no option 'bogus'"):
        build_components(config)
    config = TrainConfig(**{**TINY, "reward_options": {"color": {"sigma": 20.0}}})
    components = build_components(config)
    assert components.rewards[components.reward_names.index("color")].sigma == 20.0


def test_prompt_tags_must_name_configured_rewards():
    config = TrainConfig(**{**TINY, "rewards": ["color", "shape"], "prompts": ["colors:color+sharpness"]})
    with pytest.raises(MarbleError) as caught:
        build_components(config)
    assert str(caught.value) == ("prompt set 'colors' is tagged with reward 'sharpness', which is not in --rewards "
                                 "color,shape; add it or change the tags")
    config = TrainConfig(**{**TINY, "rewards": ["color", "shape"], "reward_options": {"word": {}}})
    with pytest.raises(MarbleError) as caught:
        build_components(config)
    assert str(caught.value) == ("reward options given for ['word'] which are not in --rewards color,shape; "
                                 "add the reward or drop the option")


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
    with pytest.raises(MarbleError) as caught:
        Trainer(config, build_components(config))
    assert str(caught.value) == ("optimizer_sharding=\"zero\" keeps each rank's share of AdamW's moments only, but "
                                 "balancer metric 'adam' reads all of them on every rank; use optimizer_sharding="
                                 "\"none\" or the euclidean metric")
    # one process: nothing to shard, plain AdamW (its state is what ZeRO checkpoints, gathered)
    single = _trainer(optimizer_sharding="zero")
    assert type(single.optimizer) is torch.optim.AdamW


@pytest.mark.slow
def test_short_run_raises_a_single_offline_reward():
    """15 seeded steps on brightness move held-out brightness up by a clear margin."""
    from marble_kit.evaluate import run_scoring, score_policy
    from marble_kit.prompts import load_prompt_sets

    trainer = _trainer(rewards=["brightness"], prompts=["colors"], prompts_per_step=4,
                       images_per_prompt=4, timesteps_per_image=2, sample_steps=6, lr=1e-2, beta=1.0,
                       kl=1e-4)
    prompts = [p for p in load_prompt_sets(["world_eval"])[0].prompts[:12] for _ in range(2)]
    mask = torch.ones(1, len(prompts), dtype=torch.bool)
    score = run_scoring(trainer.scoring, trainer.reward_names, trainer.rewards)
    base, _ = score_policy(trainer.policy, score, prompts, mask, seed=5, steps=6)
    for _ in range(15):
        trainer.step()
    after, _ = score_policy(trainer.policy, score, prompts, mask, seed=5, steps=6)
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


# ------------------------------------------------ per-reward losses over the rows each judges
class NanReward:
    """Judges nothing: NaN for every image (a broken or misconfigured third-party reward)."""

    name = "nan_reward"

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), float("nan"))

    def to(self, device):
        return self


class FlatReward(NanReward):
    """Judges every image and prefers none (like OCR on a prior that cannot write)."""

    name = "flat_reward"

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), 0.25)


@pytest.fixture
def idle_rewards():
    registry = get_registry()
    for cls in (NanReward, FlatReward):
        registry.entries["reward"].pop(cls.name, None)
        registry.add(PluginInfo("reward", cls.name, cls, "test reward", "tests", __name__))
    yield
    for cls in (NanReward, FlatReward):
        registry.entries["reward"].pop(cls.name, None)


@pytest.mark.slow
@pytest.mark.parametrize("gram,balancer", [("affine", "marble"), ("exact", "mgda-qp"), ("affine", "upgrad")])
def test_rewards_that_judge_or_prefer_nothing_get_weight_zero_from_the_first_step(idle_rewards, gram, balancer):
    """An all-NaN reward and a reward with equal scores everywhere take no part in balancing:
    λ = 0 and loss weight 0 from step 1, `active/…` = 0, and a one-line warning after 3 steps."""
    trainer = _trainer(rewards=["color", "nan_reward", "flat_reward"], prompts=["colors"], gram=gram,
                       balancer=balancer)
    with pytest.warns(RuntimeWarning) as caught:
        history = [trainer.step() for _ in range(3)]
    for metrics in history:
        assert metrics["weight/color"] > 0 and metrics["active/color"] == 1.0
        for name in ("nan_reward", "flat_reward"):
            assert metrics[f"weight/{name}"] == 0.0 and metrics[f"active/{name}"] == 0.0
            if balancer != "upgrad":
                assert metrics[f"lambda/{name}"] == 0.0
    assert history[0]["judged_rows/nan_reward"] == 0.0 and history[0]["judged_rows/flat_reward"] > 0
    assert history[-1]["inactive_steps/nan_reward"] == 3.0
    messages = [str(w.message) for w in caught]
    assert any("'nan_reward' judged no sample in the last 3 steps" in m for m in messages), messages
    assert any("'flat_reward' scored the images of every prompt group equally" in m for m in messages), messages


def _captured_step(trainer):
    """Run one step; return the training batch it built and its metrics."""
    captured = {}
    fold = trainer._fold_timesteps

    def keep(*args):
        captured["batch"] = fold(*args)
        return captured["batch"]

    trainer._fold_timesteps = keep
    try:
        metrics = trainer.step()
    finally:
        trainer._fold_timesteps = fold
    return captured["batch"], metrics


def _captured_batch(trainer):
    return _captured_step(trainer)[0]


@pytest.mark.slow
@pytest.mark.parametrize("gram", ["affine", "exact"])
def test_a_rewards_gradient_ignores_the_rows_it_does_not_judge(gram):
    """Changing the rows reward k does not judge — their latents, timesteps, old velocities and
    reward probabilities — leaves g_k unchanged (and changes the other rewards' gradients)."""
    trainer = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=2, gram=gram, kl=0.0)
    batch = _captured_batch(trainer)
    k = trainer.reward_names.index("color")
    unjudged = batch.coef[k] == 0
    assert unjudged.any() and (~unjudged).any(), "the world prompts judge color on some rows only"
    gradients = trainer._affine_gradients if gram == "affine" else trainer._exact_gradients
    before, _ = gradients(batch, anchor=False)
    g = torch.Generator().manual_seed(0)
    changed = dataclasses.replace(
        batch,
        x0=torch.where(unjudged.view(-1, 1, 1, 1), torch.randn(batch.x0.shape, generator=g), batch.x0),
        x_t=torch.where(unjudged.view(-1, 1, 1, 1), torch.randn(batch.x_t.shape, generator=g), batch.x_t),
        t=torch.where(unjudged, torch.rand(batch.t.shape, generator=g) * 0.9 + 0.05, batch.t),
        v_old=torch.where(unjudged.view(-1, 1, 1, 1), torch.randn(batch.v_old.shape, generator=g), batch.v_old),
        r=torch.where(unjudged, torch.rand(batch.r.shape, generator=g), batch.r))
    after, _ = gradients(changed, anchor=False)
    torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-7 * float(before[k].abs().max()))
    others = [i for i in range(len(trainer.reward_names)) if (batch.coef[i][unjudged] != 0).any()]
    assert others and all(not torch.allclose(after[i], before[i]) for i in others)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [0, 3])
def test_fused_backward_is_the_weighted_sum_of_masked_per_reward_gradients(micro_batch):
    """One backward on Σ_i c_i·ℓ(i; r_eff(i)) (+ anchor) = Σ_k w_k·∇L_k (+ ∇anchor), with the
    world's NaN patterns, any weights ≥ 0 and micro-batches."""
    trainer = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=2, gram="exact",
                       micro_batch=micro_batch, rewards=["color", "shape", "word", "sharpness"])
    batch = _captured_batch(trainer)
    assert (batch.coef == 0).any()  # some rows are not judged by some rewards
    grads, anchor = trainer._exact_gradients(batch)
    weights = torch.tensor([0.7, 0.0, 1.3, 0.4], dtype=torch.float64)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._fused_backward(batch, weights)
    fused = torch.cat([p.grad.reshape(-1) for p in trainer.params])
    expected = weights.to(grads) @ grads + anchor
    assert (fused - expected).norm() <= 1e-5 * expected.norm()


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing,micro_batch", [(False, 0), (True, 0), (True, 3)])
def test_affine_equals_exact_when_some_rewards_judge_nothing(checkpointing, micro_batch):
    """One prompt set per step: the other specialist rewards are absent, their gradients are
    exactly zero in both modes and the present ones agree to float32 round-off — with the
    policy's gradient checkpointing (its forward replayed inside the capture) and micro-batches."""
    trainer = _trainer(prompts_per_step=1, images_per_prompt=4, timesteps_per_image=2, gram="exact",
                       micro_batch=micro_batch, policy_options={"gradient_checkpointing": checkpointing})
    assert_affine_equals_exact_with_absent_rewards(trainer, _captured_batch(trainer))


def assert_affine_equals_exact_with_absent_rewards(trainer, batch):
    """Absent rewards get exactly zero gradients in both modes, the present ones agree to
    float32 round-off (also the FLUX.1 test's check); returns the exact [K, P] and the absent mask."""
    absent = batch.coef.sum(1) == 0
    assert absent.any() and (~absent).any()
    exact, _ = trainer._exact_gradients(batch, anchor=False)
    affine, _ = trainer._affine_gradients(batch, anchor=False)
    assert not exact[absent].any() and not affine[absent].any()
    assert (affine - exact).abs().max() <= 1e-6 * exact.abs().max() * 10
    gram_a, gram_e = (g.double() @ g.double().T for g in (affine, exact))
    assert (gram_a - gram_e).abs().max() <= 1e-5 * gram_e.abs().max()
    return exact, absent


def test_numerical_zero_ratio_follows_the_dtype():
    from marble_kit.trainer import numerical_zero_ratio

    assert numerical_zero_ratio(torch.float32) == pytest.approx(64 * 1.1920929e-07)
    assert numerical_zero_ratio(torch.float64) < 1e-13
    assert numerical_zero_ratio(torch.bfloat16) == 1e-3  # capped: a real 0.1% gradient stays in


@pytest.mark.slow
def test_round_off_gradients_are_not_active_but_small_real_ones_are():
    trainer = _trainer()
    grads = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    grads[1] *= 2e-7       # what a zero becomes after float32 sums: out
    grads[2] *= 1e-4       # small but real: in
    grads[3] = float("nan")
    candidates = torch.tensor([True, True, True, True])
    assert trainer._active(candidates, grads).tolist() == [True, False, True, False]
    assert trainer._active(torch.tensor([False, True, True, True]), grads).tolist() == [False, False, True, False]


@pytest.mark.slow
def test_sampled_gram_rows_keep_every_group_and_cost_one_plus_two_f_passes():
    trainer = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=4, gram="affine",
                       gram_rows=0.25, kl=1e-2)
    batch = _captured_batch(trainer)
    subset = trainer._gram_rows(batch, trainer.judgement, 4, generator=torch.Generator().manual_seed(1))
    picked = subset.images // 2  # the prompt group of each kept row (G = 2 images per prompt)
    assert torch.bincount(picked, minlength=4).tolist() == [2, 2, 2, 2]  # round(0.25 · G·T) rows per group
    assert torch.allclose(subset.coef.sum(1)[subset.coef.sum(1) > 0],
                          torch.ones(int((subset.coef.sum(1) > 0).sum()), dtype=torch.float64))
    metrics = trainer.step()
    assert metrics["backward_passes"] == pytest.approx(1 + 2 * 0.25)  # the anchor rides on the update
    full = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=4, gram="affine", kl=1e-2)
    assert full.step()["backward_passes"] == pytest.approx(3.0)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(gram="affine"), dict(gram="affine", gram_backward="stacked"),
                                       dict(gram="affine", micro_batch=3), dict(gram="exact"),
                                       dict(gram="affine", kl=0.0)])
def test_the_sampled_rows_part_of_the_fused_gradient_equals_a_backward_over_every_row(overrides):
    """gram_rows < 1: the fused gradient built from the sampled rows' per-reward gradients (and
    their anchor) plus one backward over the other rows is the gradient of one backward over
    every row (the reference, :meth:`Trainer._fused_backward`), rewards masked, a zero weight
    included, with micro-batches, stacked passes, exact gradients and without the anchor."""
    settings = dict(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=2, gram_rows=0.25, kl=1e-2)
    trainer = _trainer(**{**settings, **overrides})
    batch = _captured_batch(trainer)
    n = batch.x0.shape[0]
    sample = trainer._gram_rows(batch, trainer.judgement, 4, generator=torch.Generator().manual_seed(2))
    assert 0 < sample.x0.shape[0] < n and (batch.coef == 0).any(), "a sample of masked rows"
    gradients = trainer._affine_gradients if overrides["gram"] == "affine" else trainer._exact_gradients
    grads, anchor = gradients(sample, anchor_rows=n)
    weights = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)[:grads.shape[0]]

    def flat_grad(build):
        trainer.optimizer.zero_grad(set_to_none=True)
        build()
        return torch.cat([p.grad.reshape(-1) for p in trainer.params])

    passes = trainer._passes
    combined = flat_grad(lambda: trainer._fused_from_sample(batch, sample, weights, grads, anchor))
    assert trainer._passes - passes == pytest.approx((n - sample.x0.shape[0]) / trainer._rows)
    reference = flat_grad(lambda: trainer._fused_backward(batch, weights))
    assert reference.abs().max() > 0
    assert (combined - reference).abs().max() <= 1e-5 * reference.abs().max()
    if trainer.config.kl > 0:  # the sampled rows' anchor is far above the tolerance: it is counted
        assert anchor.abs().max() > 20 * 1e-5 * reference.abs().max()


@pytest.mark.slow
def test_sampled_gram_rows_honour_an_explicit_fraction_a_floor_of_one_row_and_their_generator():
    trainer = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=4, gram="affine",
                       gram_rows=0.25, kl=1e-2)
    batch = _captured_batch(trainer)

    def rows(fraction=None, generator=None):
        subset = trainer._gram_rows(batch, trainer.judgement, 4, fraction, generator)
        return torch.stack([subset.images.double(), subset.t.double().reshape(-1)])  # which rows

    def per_group(picked):
        return torch.bincount(picked[0].long() // 2, minlength=4).tolist()

    drawn = torch.Generator().manual_seed(3)
    assert per_group(rows(0.5, drawn)) == [4, 4, 4, 4]         # the argument, not the config's 0.25
    assert per_group(rows(0.01, drawn)) == [1, 1, 1, 1]        # at least one row per group
    # an explicit generator decides the draw (the trainer's own stream is not consumed) ...
    first = rows(generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, rows(generator=torch.Generator().manual_seed(7)))
    # ... and without one the trainer's seeded generator does, whatever torch's global stream
    torch.manual_seed(0)
    own = rows()
    again = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=4, gram="affine",
                     gram_rows=0.25, kl=1e-2)
    again_batch = _captured_batch(again)
    torch.manual_seed(12345)
    subset = again._gram_rows(again_batch, again.judgement, 4)
    assert torch.equal(own, torch.stack([subset.images.double(), subset.t.double().reshape(-1)]))


@pytest.mark.slow
def test_reward_scope_all_averages_every_reward_over_every_row():
    trainer = _trainer(prompts_per_step=4, images_per_prompt=2, reward_scope="all")
    batch = _captured_batch(trainer)
    n = batch.x0.shape[0]
    assert torch.allclose(batch.coef, torch.full_like(batch.coef, 1.0 / n))


@pytest.mark.slow
def test_periodic_reuse_steps_drop_the_rewards_that_are_inactive_now(idle_rewards):
    trainer = _trainer(rewards=["color", "shape", "flat_reward"], prompts=["colors:color+flat_reward", "shapes"],
                       gram="periodic", gram_period=5, prompts_per_step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = [trainer.step() for _ in range(4)]
    for metrics in history[1:]:
        assert metrics["gram_mode"] == "reuse"
        for name in ("color", "shape"):
            if metrics[f"judged_rows/{name}"] == 0:
                assert metrics[f"weight/{name}"] == 0.0 and metrics[f"active/{name}"] == 0.0
        assert metrics["weight/flat_reward"] == 0.0


@pytest.mark.slow
def test_velocity_space_loss_trains_and_its_affine_gradients_equal_exact():
    trainer = _trainer(loss_space="velocity", prompts_per_step=2, images_per_prompt=2, timesteps_per_image=2,
                       gram="exact")
    batch = _captured_batch(trainer)
    exact, _ = trainer._exact_gradients(batch, anchor=False)
    affine, _ = trainer._affine_gradients(batch, anchor=False)
    assert exact.abs().max() > 0
    assert (affine - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert torch.isfinite(torch.tensor(trainer.step()["grad_norm"]))


@pytest.mark.slow
@pytest.mark.parametrize("gram", ["affine", "exact", "periodic"])
def test_the_update_is_the_weighted_masked_losses_plus_the_anchor(gram):
    """The gradient handed to the optimizer (clipping off) is ∇[Σ_k w_k·L_k + kl·mean‖v_θ − v_ref‖²]
    with the step's loss weights, computed here by autograd from the batch — so the anchor
    reaches the update, on solve steps (2 passes, no third) and on reuse steps. Step 2 is
    checked: at step 1 v_θ = v_ref and the anchor has no gradient."""
    kl = 0.5
    trainer = _trainer(gram=gram, gram_period=2, kl=kl, grad_clip=0.0, balancer="mgda-qp", prompts_per_step=2,
                       images_per_prompt=2, timesteps_per_image=2)
    trainer.step()
    start = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    batch, metrics = _captured_step(trainer)
    assert metrics["gram_mode"] == ("reuse" if gram == "periodic" else gram)
    handed = torch.cat([p.grad.reshape(-1) for p in trainer.params])
    weights = torch.tensor([metrics[f"weight/{n}"] for n in trainer.reward_names], dtype=torch.float64)
    trainer.policy.load_state_dict(start)
    rows = slice(0, batch.x0.shape[0])
    v = trainer._forward(batch, rows)
    losses = torch.stack([(batch.coef[k].to(v.dtype) * trainer._loss_per_row(v, batch, rows, batch.r[k])).sum()
                          for k in range(len(trainer.reward_names))])
    anchor = kl * ((v - batch.v_ref) ** 2).mean(dim=(1, 2, 3)).mean()
    anchor_part = torch.cat([g.reshape(-1) for g in torch.autograd.grad(anchor, trainer.params, retain_graph=True)])
    total = weights.to(v.dtype) @ losses + anchor
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, trainer.params)])
    assert anchor_part.norm() > 0.05 * expected.norm()  # leaving it out would be seen
    assert (handed - expected).norm() <= 1e-4 * expected.norm()


def test_training_rows_draw_t_in_the_configured_range_and_a_row_selection_keeps_the_anchor():
    """T = 2 noisy versions of each image, t ~ U[timestep_min, timestep_max], x_t = (1−t)·x0 + t·ε;
    selecting rows (gram_rows < 1) keeps each row's pieces together, the anchor's v_ref included."""
    trainer = _trainer(timestep_min=0.3, timestep_max=0.6, timesteps_per_image=2, kl=0.1, seed=5)
    batch = _captured_batch(trainer)
    assert batch.t.shape[0] == 2 * 3 * 2 and ((batch.t >= 0.3) & (batch.t <= 0.6)).all()
    assert batch.t.max() - batch.t.min() > 0.05  # drawn, not one value
    assert torch.equal(batch.images.reshape(2, -1)[0], batch.images.reshape(2, -1)[1])  # timestep-major
    rows = torch.tensor([0, 3, 7])
    chosen = batch.select(rows, batch.coef[:, rows], batch.candidates)
    assert batch.v_ref is not None
    for name in ("x0", "x_t", "t", "v_old", "v_ref", "images"):
        assert torch.equal(getattr(chosen, name), getattr(batch, name)[rows]), name
    without_anchor = dataclasses.replace(batch, v_ref=None).select(rows, batch.coef[:, rows], batch.candidates)
    assert without_anchor.v_ref is None and torch.equal(without_anchor.x_t, batch.x_t[rows])


@pytest.mark.slow
def test_a_trainer_restored_from_a_state_dict_repeats_the_next_steps_bit_for_bit():
    """state_dict / load_state_dict in one process (the checkpoint tests cover the files):
    step, weights, Adam, balancer (EMA), reused loss weights, activity, generator and sampler."""
    import io

    config = dict(seed=5, gram="periodic", gram_period=3, balancer="marble", kl=1e-2)
    source = _trainer(**config)
    source.step()
    source.consolidate()  # what the CLI calls on every rank before saving (a no-op without ZeRO)
    source.inactive_steps = torch.tensor([2.0, 0.0, 5.0], dtype=torch.float64)  # a history to carry over
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    assert source.state_dict()["step"] == 1 and source.loss_weights is not None
    expected = [_without_timing(source.step())]  # a reuse step: the loss weights come from the state
    expected_params = [p.detach().clone() for p in source.params]

    restored = _trainer(**{**config, "seed": 6})  # another seed: everything must come from the state
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert restored.step_count == 1
    assert [_without_timing(restored.step())] == expected and expected[0]["gram_mode"] == "reuse"
    assert all(torch.equal(a, b) for a, b in zip(restored.params, expected_params))
    assert restored.inactive_steps.dtype == torch.float64 and restored.inactive_steps.tolist() == [2.0, 0.0, 5.0]


def test_gram_modes_and_the_affine_refusal_of_cross_sample_layers_are_wired(monkeypatch):
    from marble_kit import gram as gram_ops

    # --gram none with a balancer that needs a Gram: the affine Gram; without: none
    assert _trainer(gram="none", balancer="mgda-qp").gram_mode_for(0) == "affine"
    assert _trainer(gram="none", balancer="weighted-sum").gram_mode_for(0) == "none"
    checked = []
    monkeypatch.setattr(gram_ops, "refuse_cross_sample_ops", checked.append)
    affine = _trainer(gram="affine", balancer="mgda-qp")
    assert checked == [affine.policy.trainable_module()]
    _trainer(gram="exact", balancer="mgda-qp")  # per-sample losses only matter to the affine Gram
    assert len(checked) == 1


def test_adam_momentum_metric_needs_a_fresh_whole_batch_solve_and_zero_sharding_needs_euclidean():
    for overrides in ({"gram": "periodic"}, {"gram": "affine", "gram_rows": 0.5}):
        config = TrainConfig(**{**TINY, **overrides, "balancer": "mgda-qp",
                                "balancer_options": {"metric": "adam-momentum"}})
        with pytest.raises(MarbleError, match="balancer metric \"adam-momentum\" balances the step Adam takes now"):
            Trainer(config, build_components(config))
    assert _trainer(gram="affine", balancer="mgda-qp", balancer_options={"metric": "adam-momentum"}).uses_gram
    # balancers without a metric are euclidean: ZeRO takes them
    assert type(_trainer(optimizer_sharding="zero", balancer="upgrad").optimizer) is torch.optim.AdamW


@pytest.mark.slow
def test_the_balancer_solves_on_the_gram_of_its_metric(monkeypatch):
    """metric=adam: G in Adam's preconditioner; adam-momentum with clipping: the clip factor is
    found with the exact min-norm λ of the momentum Gram, and that Gram is what the balancer gets."""
    import numpy as np

    from marble_kit import gram as gram_ops
    from marble_kit import trainer as trainer_module
    from marble_kit.balancing import MinNormQP

    balanced = _spy(monkeypatch, trainer_module, "balance_weights")  # args: (balancer, gram, step, active)
    metric_grams = _spy(monkeypatch, gram_ops, "metric_gram")
    trainer = _trainer(gram="affine", balancer="mgda-qp", balancer_options={"metric": "adam"})
    trainer.step()
    assert [args[3] for args, _, _ in metric_grams] == ["adam"] and len(balanced) == 1

    solves = []
    original_scale = gram_ops.consistent_clip_scale

    def scale_spy(parts, clip, solve):
        e = parts.gram(1.0)
        solves.append((solve(e), MinNormQP().solve(e.cpu().numpy(), active=np.ones(len(e), dtype=bool)).lam))
        scale = original_scale(parts, clip, solve)
        solves.append(parts.gram(scale))
        return scale

    monkeypatch.setattr(gram_ops, "consistent_clip_scale", scale_spy)
    parts_made = _spy(monkeypatch, gram_ops, "adam_momentum_parts")
    balanced.clear()
    trainer = _trainer(gram="affine", balancer="mgda-qp", balancer_options={"metric": "adam-momentum"}, grad_clip=1e-4,
                       prompts_per_step=2, images_per_prompt=4)
    metrics = trainer.step()
    assert all(metrics[f"active/{name}"] == 1.0 for name in trainer.reward_names)
    (solved, reference), expected_gram = solves
    # the anchor gradient is passed (zero at the first step: the policy is its reference)
    assert len(parts_made) == 1 and parts_made[0][1].get("anchor") is not None
    assert np.allclose(solved.numpy(), reference, atol=1e-12)
    assert torch.equal(balanced[0][0][1], expected_gram.cpu())


@pytest.mark.slow
def test_step_metrics_the_update_cosines_and_judged_rows_with_two_timesteps(monkeypatch):
    from marble_kit import gram as gram_ops

    recorded = _spy(monkeypatch, gram_ops, "update_cosines")  # args: (grads, direction)
    import time

    trainer = _trainer(gram="affine", balancer="mgda-qp", timesteps_per_image=2)
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.params])
    start = time.perf_counter()
    batch, metrics = _captured_step(trainer)
    wall = time.perf_counter() - start
    after = torch.cat([p.detach().reshape(-1) for p in trainer.params])
    timings = {k: v for k, v in metrics.items() if k.startswith("time/")}
    assert len(timings) == 4 and all(0.0 <= v <= wall for v in timings.values()), (timings, wall)
    # x_t = (1 − t)·x0 + t·ε with ε standard normal (x0: unit-scale latents)
    t = batch.t.view(-1, 1, 1, 1)
    eps = (batch.x_t - (1 - t) * batch.x0) / t
    assert abs(float(eps.mean())) < 0.1 and 0.9 < float(eps.std()) < 1.1
    assert torch.equal(recorded[0][0][1], -(after - before))  # the step Adam took, reversed: descent
    cosines = [metrics[f"cos_update/{name}"] for name in trainer.reward_names]
    active = [metrics[f"active/{name}"] == 1.0 for name in trainer.reward_names]
    assert metrics["cos_update/worst"] == min(c for c, a in zip(cosines, active) if a)
    cosines = [metrics[f"cos/{name}"] for name in trainer.reward_names]
    assert metrics["cos/worst"] == min(c for c, a in zip(cosines, active) if a)
    assert metrics["step"] == 1 and trainer.step_count == 1
    for k, name in enumerate(trainer.reward_names):
        judged_images = int(trainer.judgement.judged[k].sum())
        assert metrics[f"judged_rows/{name}"] == 2 * judged_images
        if judged_images:  # L_k is the mean over the rows reward k judges: 2 per judged image
            assert float(batch.coef[k].sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.slow
def test_the_velocity_loss_is_the_one_trained_in_velocity_space(monkeypatch):
    from marble_kit import trainer as trainer_module

    nft = _spy(monkeypatch, trainer_module, "nft_loss_per_sample")
    velocity = _spy(monkeypatch, trainer_module, "velocity_loss_per_sample")
    _trainer(loss_space="velocity", gram="exact").step()
    assert velocity and not nft
    velocity.clear()
    _trainer(gram="exact").step()
    assert nft and not velocity


@pytest.mark.slow
def test_a_balancer_without_a_gram_gives_the_weights_of_its_own(monkeypatch):
    trainer = _trainer(gram="none", balancer="weighted-sum", balancer_options={"weights": [3.0, 1.0, 0.0]}, kl=0.0)
    metrics = trainer.step()
    assert all(torch.isfinite(p).all() for p in trainer.params)  # no anchor: its zero term keeps the graph only
    assert metrics["gram_mode"] == "none"
    assert [metrics[f"weight/{name}"] for name in trainer.reward_names] == pytest.approx([0.75, 0.25, 0.0])


def test_inactive_streaks_restart_after_an_active_step_and_warn_once():
    from marble_kit.trainer import INACTIVE_WARN_STEPS, RowJudgement, _worst

    trainer = _trainer(rewards=["color"])
    judged = RowJudgement(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool), 1)
    idle = RowJudgement(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool), 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer._activity(torch.tensor([False]), idle)
        trainer._activity(torch.tensor([True]), judged)            # the streak restarts from 0
        for _ in range(INACTIVE_WARN_STEPS - 1):
            trainer._activity(torch.tensor([False]), idle)
        assert not caught
        trainer._activity(torch.tensor([False]), idle)
        assert len(caught) == 1 and "judged no sample in the last 3 steps" in str(caught[0].message)
        out = trainer._activity(torch.tensor([False]), idle)       # warned once per reward and kind
        assert len(caught) == 1
    assert out == {"active/color": 0.0, "inactive_steps/color": float(INACTIVE_WARN_STEPS + 2)}
    # judged without a preference: the other warning, after as many steps from a fresh trainer
    trainer = _trainer(rewards=["color"])
    one_row = torch.tensor([[True, False, False, False]])  # a single judged row is still a judgement
    indifferent = RowJudgement(one_row, torch.zeros(1, 4, dtype=torch.bool), 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(INACTIVE_WARN_STEPS - 1):
            trainer._activity(torch.tensor([False]), indifferent)
        assert not caught
        trainer._activity(torch.tensor([False]), indifferent)
    assert len(caught) == 1 and "scored the images of every prompt group equally" in str(caught[0].message)
    # non-finite gradients are never active (and an all-NaN batch has no largest norm)
    assert not trainer._active(torch.tensor([True]), torch.full((1, 5), float("nan"))).any()
    grads = torch.tensor([[3.0, 4.0], [float("inf"), 0.0], [1e-9, 0.0]])
    assert trainer._active(torch.tensor([True, True, True]), grads).tolist() == [True, False, False]
    assert _worst(torch.tensor([0.3, -0.2]), torch.tensor([True, False])) == pytest.approx(0.3)
    assert math.isnan(_worst(torch.tensor([0.3, -0.2]), torch.tensor([False, False])))


class MinimalBalancer:
    """A third-party balancer with only what the Balancer protocol requires (no gram_metric)."""

    needs_gram = True

    def __init__(self, num_rewards):
        self.lam = torch.full((num_rewards,), 1.0 / num_rewards, dtype=torch.float64)
        self.metrics = {}

    def weights(self, gram, step, active=None):
        assert gram is not None and gram.shape == (len(self.lam), len(self.lam))
        self.steps = [*getattr(self, "steps", []), step]
        return self.lam.clone()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
def test_a_third_party_balancer_without_a_gram_metric_gets_the_euclidean_gram():
    registry = get_registry()
    registry.add(PluginInfo("balancer", "minimal", MinimalBalancer, "test balancer", "tests", __name__))
    try:
        trainer = _trainer(balancer="minimal", gram="affine", optimizer_sharding="zero")
        assert type(trainer.optimizer) is torch.optim.AdamW
        metrics = trainer.step()
        trainer.step()
    finally:
        registry.entries["balancer"].pop("minimal", None)
    assert metrics["gram_mode"] == "affine" and trainer.balancer.steps == [0, 1]
    assert all(metrics[f"weight/{name}"] == pytest.approx(1 / 3) for name in trainer.reward_names)


def test_row_judgement_counts_and_candidates_by_hand():
    from marble_kit.trainer import RowJudgement

    judged = torch.tensor([[True, True, False], [False, True, True]])
    prefers = torch.tensor([[False, True, False], [False, False, True]])
    judgement = RowJudgement(judged, prefers, timesteps=2)
    assert judgement.counts().tolist() == [4, 4]                           # images × T
    assert judgement.counts(torch.tensor([0, 0, 2])).tolist() == [2, 1]    # one entry per row
    assert judgement.candidates().tolist() == [True, True]
    assert judgement.candidates(torch.tensor([0, 2])).tolist() == [False, True]


@pytest.mark.slow
def test_gradient_clipping_and_the_reported_norm():
    trainer = _trainer(gram="affine", balancer="mgda-qp", grad_clip=1e-6)
    metrics = trainer.step()
    clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.params))
    assert metrics["grad_norm"] > 1e-6 and float(clipped) <= 1e-6 * (1 + 1e-5)  # clipped in place
    trainer = _trainer(gram="affine", balancer="mgda-qp", grad_clip=0.0)
    metrics = trainer.step()
    unclipped = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in trainer.params))
    assert metrics["grad_norm"] == pytest.approx(float(unclipped), rel=1e-5)


@pytest.mark.slow
def test_adam_momentum_without_clipping_solves_on_the_unscaled_momentum_gram(monkeypatch):
    from marble_kit import gram as gram_ops
    from marble_kit import trainer as trainer_module

    balanced = _spy(monkeypatch, trainer_module, "balance_weights")  # args: (balancer, gram, step, active)
    parts_made = _spy(monkeypatch, gram_ops, "adam_momentum_parts")
    _trainer(gram="affine", balancer="mgda-qp", balancer_options={"metric": "adam-momentum"}, grad_clip=0.0).step()
    assert len(balanced) == 1 and torch.equal(balanced[0][0][1], parts_made[0][2].gram(1.0).cpu())


@pytest.mark.slow
@pytest.mark.parametrize("gram", ["affine", "exact"])
def test_the_anchor_gradient_is_one_mean_over_the_batch_across_micro_batches(gram):
    """After a step the policy has left its reference, so the anchor gradient is not zero; split
    into micro-batches it must still be the mean over the whole batch."""
    trainer = _trainer(gram=gram, balancer="mgda-qp", kl=1.0, micro_batch=2)
    trainer.step()
    batch = _captured_batch(trainer)
    gradients = trainer._affine_gradients if gram == "affine" else trainer._exact_gradients
    _, split = gradients(batch)
    trainer.config = dataclasses.replace(trainer.config, micro_batch=0)
    _, whole = gradients(batch)
    assert whole.norm() > 0 and (split - whole).norm() <= 1e-4 * whole.norm()


@pytest.mark.slow
def test_exact_mode_takes_no_pass_for_a_reward_that_judges_nothing(idle_rewards):
    trainer = _trainer(gram="exact", balancer="mgda-qp", rewards=["color", "nan_reward"], kl=0.0)
    metrics = trainer.step()
    assert metrics["backward_passes"] == 1.0  # color's only; nan_reward judges no row


@pytest.mark.slow
def test_a_sampled_gram_pass_runs_on_its_rows_only():
    """gram_rows = 0.25: in the gradient step the transformer sees the sampled rows in the Gram's
    forward and in the checkpointed replays of its three backward passes (U, W, the anchor),
    the other rows only in the fused pass — counted at the transformer's first block; the
    capture's passes have the sampled rows as their batch."""
    trainer = _trainer(prompts_per_step=4, images_per_prompt=2, timesteps_per_image=2, gram="affine",
                       gram_rows=0.25, kl=1e-2, policy_options={"gradient_checkpointing": True})
    seen, inside = [], []
    trainer.phase_hook = lambda boundary: inside.append(boundary.endswith("start"))
    block = trainer.policy.transformer.transformer_blocks[0]

    def rows(module, args, kwargs):
        if inside[-1:] == [True]:  # between the gradient step's start and end marks
            seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[0])

    handle = block.register_forward_pre_hook(rows, with_kwargs=True)
    from marble_kit import gram as gram_ops

    passes = []
    original = gram_ops.LoraCapture.backward_pass

    def record(capture, output, *args, **kwargs):
        passes.append(output.shape[0])
        return original(capture, output, *args, **kwargs)

    gram_ops.LoraCapture.backward_pass = record
    try:
        metrics = trainer.step()
    finally:
        gram_ops.LoraCapture.backward_pass = original
        handle.remove()
    batch = 4 * 2 * 2
    assert seen == [4, 4, 4, 4, batch - 4, batch - 4]  # forward + 3 replays on 4 rows; the other 12 rows' pass
    assert passes == [4, 4, 4]
    assert metrics["backward_passes"] == pytest.approx(1 + 2 * 0.25)


@pytest.mark.slow
def test_stacked_affine_passes_equal_the_separate_ones():
    separate = _trainer(prompts_per_step=2, images_per_prompt=2, timesteps_per_image=2, gram="affine", kl=1e-2)
    batch = _captured_batch(separate)
    stacked = _trainer(prompts_per_step=2, images_per_prompt=2, timesteps_per_image=2, gram="affine", kl=1e-2,
                       gram_backward="stacked")
    stacked.policy = separate.policy
    stacked.params = separate.params
    grads, anchor = separate._affine_gradients(batch)
    stacked_grads, stacked_anchor = stacked._affine_gradients(batch)
    scale = grads.abs().max()
    assert (stacked_grads - grads).abs().max() <= 1e-5 * scale
    assert (stacked_anchor - anchor).abs().max() <= 1e-5 * anchor.abs().max()
    with pytest.raises(MarbleError, match="gram_backward must be one of separate, stacked"):
        TrainConfig(gram_backward="batched")
