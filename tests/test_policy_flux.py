"""FLUX.1 on the flow-matching base, on a tiny random FLUX.1 saved like the real one
(tests/tiny_flux.py): its loader and errors, FluxPipeline's own sampling as the reference, LoRA on
both stream types, the distilled guidance input, checkpoints, and every Gram mode of the trainer."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from policy_checks import assert_checkpointing_keeps_gradients, perturb
from test_trainer import _captured_batch, assert_affine_equals_exact_with_absent_rewards
from tiny_flux import PROMPTS, TINY_FLUX_OPTIONS, tiny_flux_pipeline

from marble_kit.config import TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.policy import Policy, has_cross_sample_ops, iter_lora_pairs
from marble_kit.registry import build
from marble_kit.trainer import Trainer, build_components
from marble_plugins.policies import flux
from marble_plugins.policies.flux import FluxPolicy, build_flux


def tiny(directory, **overrides) -> FluxPolicy:
    return build_flux(path=str(directory), **{**TINY_FLUX_OPTIONS, **overrides})


@pytest.fixture(scope="module")
def policy(tiny_flux_dir):
    return tiny(tiny_flux_dir)


@pytest.fixture(scope="module")
def batch(policy):
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(policy.latent_shape(3), generator=generator)
    t = torch.rand(3, generator=generator)
    return x_t, t, policy.encode_prompts(PROMPTS[:3])


def pipeline_images(pipeline, noise, steps, **settings):
    """FluxPipeline.__call__ from the same (unpacked) noise, as a diffusers user samples."""
    batch, channels, height, width = noise.shape
    pipeline.set_progress_bar_config(disable=True)
    packed = pipeline._pack_latents(noise, batch, channels, height, width)
    return pipeline(PROMPTS[:batch], latents=packed, num_inference_steps=steps, height=32, width=32,
                    max_sequence_length=TINY_FLUX_OPTIONS["max_sequence_length"], output_type="pt", **settings).images


# ------------------------------------------------------------------ loading and options

def test_flux_loads_through_its_loader_from_the_option_or_the_environment(tiny_flux_dir, monkeypatch):
    calls = []
    real_loader = flux.load_flux_pipeline
    monkeypatch.setattr(flux, "load_flux_pipeline", lambda d, **kw: calls.append(str(d)) or real_loader(d, **kw))
    by_option = build("policy", "flux", {"path": str(tiny_flux_dir), **TINY_FLUX_OPTIONS})
    monkeypatch.setenv(flux.FLUX_PATH_ENV, str(tiny_flux_dir))
    by_env = build("policy", "flux", dict(TINY_FLUX_OPTIONS))
    assert calls == [str(tiny_flux_dir)] * 2
    assert isinstance(by_option, Policy) and by_option.name == "flux" and by_env.device == torch.device("cpu")
    assert by_option.latent_shape(2) == (2, 16, 16, 16)  # unpacked VAE latents: 32 px / 2
    # LoRA lands on both streams' attention (the single-stream blocks' too) and the dual blocks'
    # feed-forwards, as flow_grpo and Flow-Factory train FLUX.1; not on single blocks' MLP / output.
    layers = {name for name, *_ in iter_lora_pairs(by_option.trainable_module())}
    assert {"single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff_context.net.2"} <= layers
    assert not any(name.endswith(("proj_mlp", "proj_out", "x_embedder")) for name in layers)
    assert {name.split(".", 2)[2] for name in layers} == set(flux.DEFAULT_TARGET_MODULES)
    assert has_cross_sample_ops(by_option.trainable_module()) is None  # `affine` may run on it


def test_missing_or_partial_weights_and_bad_options_are_one_line_errors(tiny_flux_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    messages = []
    for options, env in (({"path": str(tmp_path / "nowhere")}, None), ({}, str(tmp_path / "elsewhere"))):
        if env:
            monkeypatch.setenv(flux.FLUX_PATH_ENV, env)
        with pytest.raises(MarbleError) as error:
            build_flux(**options)
        messages.append(str(error.value))
    for message, source in zip(messages, ("policy option `path`", f"${flux.FLUX_PATH_ENV}")):
        assert source in message and "model_index.json missing" in message and flux.FLUX_MODEL_ID in message
        assert "--policy-opt path=DIR" in message and flux.FLUX_PATH_ENV in message and "\n" not in message
    monkeypatch.delenv(flux.FLUX_PATH_ENV)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MarbleError, match="not available locally"):
        build_flux()

    partial = shutil.copytree(tiny_flux_dir, tmp_path / "partial")
    shutil.rmtree(partial / "transformer")  # an interrupted download
    with pytest.raises(MarbleError, match=r"names `transformer` but .*partial/transformer/ is missing"):
        tiny(partial)
    for bad, match in (({"resolution": 30}, "multiple of 4.*resolution=32"), ({"max_sequence_length": 600}, "512"),
                       ({"mixed_precision": "fp8"}, "mixed_precision")):
        with pytest.raises(MarbleError, match=match):
            tiny(tiny_flux_dir, **bad)
    monkeypatch.delenv("MARBLE_ALLOW_CPU_ARCH", raising=False)
    with pytest.raises(MarbleError, match="MARBLE_ALLOW_CPU_ARCH"):
        flux.build_flux_arch(device="cpu")


def test_flux_dev_architecture_is_twelve_billion_parameters_with_guidance():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux.FLUX_DEV_TRANSFORMER_CONFIG)
    count = sum(p.numel() for p in model.parameters())
    assert 11.8e9 < count < 12.0e9  # FLUX.1-dev: 11.9 B parameters
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38
    assert hasattr(model.time_text_embed, "guidance_embedder")


# ------------------------------------------------------------------ sampling = FluxPipeline

def test_samples_are_flux_pipelines_samples_from_the_same_noise(tiny_flux_dir, policy):
    """The independent reference: diffusers' FluxPipeline (packing, position ids, the distilled
    guidance input, its sigmas and dynamic shift, the VAE's scale and shift) from the same noise."""
    noise = torch.randn(policy.latent_shape(2), generator=torch.Generator().manual_seed(3))
    ours = policy.sample(PROMPTS[:2], torch.Generator(), noise=noise, steps=3)
    pipeline = flux.load_flux_pipeline(tiny_flux_dir)
    torch.testing.assert_close(ours.images, pipeline_images(pipeline, noise, 3, guidance_scale=3.5),
                               atol=1e-6, rtol=0)
    packed_x0 = pipeline(PROMPTS[:2], latents=pipeline._pack_latents(noise, 2, 16, 16, 16), num_inference_steps=3,
                         height=32, width=32, max_sequence_length=TINY_FLUX_OPTIONS["max_sequence_length"],
                         output_type="latent").images
    torch.testing.assert_close(pipeline._pack_latents(ours.x0, 2, 16, 16, 16), packed_x0, atol=1e-6, rtol=0)
    # the guidance input matters: guidance 1 is another sample
    weak = tiny(tiny_flux_dir, guidance_scale=1.0).sample(PROMPTS[:2], torch.Generator(), noise=noise, steps=3)
    assert (weak.x0 - ours.x0).abs().mean() > 1e-3


def test_the_grid_is_shifted_by_the_token_count_for_dev_and_fixed_for_schnell(policy):
    """σ_i = linspace(1, 1/N, N), then FLUX.1-dev's time shift e^μ / (e^μ + 1/σ − 1) with
    μ = 0.5 + (0.65 / 3840)·(seq_len − 256) (calculate_shift, written out); schnell: unshifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert policy.image_seq_len() == 64  # 32 px → 16 × 16 latents → 8 × 8 packed patches
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
    sigma = np.linspace(1.0, 0.25, 4)
    expected = math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)
    # what sample() steps through, and what a `timestep_schedule = "grid"` run trains on
    np.testing.assert_allclose(policy.sampling_timesteps(4).numpy(), expected, rtol=1e-6)
    scheduler = policy._scheduler(4, "cpu")
    assert float(scheduler.sigmas[-1]) == 0.0 and len(scheduler.timesteps) == 4
    schnell = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    policy._set_timesteps(schnell, 4, "cpu")
    np.testing.assert_allclose(schnell.sigmas[:-1].numpy(), sigma, rtol=1e-6)


def test_schnell_has_no_guidance_input_and_samples_like_its_pipeline():
    pipeline = tiny_flux_pipeline(seed=1, schnell=True)
    policy = FluxPolicy(pipeline, rank=2, device="cpu", resolution=32, steps=2, max_sequence_length=12,
                        guidance_scale=7.0)  # ignored: no guidance embedding
    seen = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True)
    noise = torch.randn(policy.latent_shape(2), generator=torch.Generator().manual_seed(0))
    ours = policy.sample(PROMPTS[:2], torch.Generator(), noise=noise)
    hook.remove()
    assert not policy.guidance_embeds and seen == [None, None]
    # LoRA B starts at zero, so the adapted transformer is still the pipeline's own
    torch.testing.assert_close(ours.images, pipeline_images(pipeline, noise, 2, guidance_scale=7.0),
                               atol=1e-6, rtol=0)


def test_true_cfg_changes_samples_and_long_prompts_give_one_t5_note(tiny_flux_dir, policy):
    import warnings

    guided = tiny(tiny_flux_dir, true_cfg_scale=4.0)
    a = guided.sample(PROMPTS[:2], torch.Generator().manual_seed(4))
    b = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(4))
    assert (a.x0 - b.x0).abs().mean() > 1e-3
    long = "a red circle on a white background with a blue square on a black background"  # 16 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided.encode_prompts([long, long + " and a sign"])
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and "its T5 text encoder reads 12 tokens of a prompt" in notes[0], notes


# ------------------------------------------------------------------ the three views, checkpoints

def test_velocity_views_update_old_and_state_round_trip(tiny_flux_dir, batch):
    x_t, t, cond = batch
    policy = tiny(tiny_flux_dir, seed=0)
    torch.testing.assert_close(policy.velocity(x_t, t, cond).detach(), policy.ref_velocity(x_t, t, cond))
    perturb(policy, seed=1, scale=0.2)
    v = policy.velocity(x_t, t, cond)
    v_old, v_ref = policy.old_velocity(x_t, t, cond), policy.ref_velocity(x_t, t, cond)
    assert v.shape == x_t.shape and v.dtype == torch.float32
    assert v.requires_grad and not v_old.requires_grad and (v - v_old).abs().max() > 1e-3
    torch.testing.assert_close(v_old, v_ref)  # old is still the initial LoRA (B = 0)
    v.square().mean().backward()
    grads = dict(zip(policy._trainable_names, (p.grad for p in policy.trainable_parameters())))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # both stream types learn
    assert any(n.startswith("single_transformer_blocks") for n in grads)
    before = policy.state_dict()
    policy.update_old(0.25)
    for key, value in policy.state_dict().items():
        if key.startswith("old."):
            torch.testing.assert_close(value, 0.25 * before[key] + 0.75 * before["lora." + key[4:]])
    other = tiny(tiny_flux_dir, seed=5)
    other.load_state_dict(policy.state_dict())
    torch.testing.assert_close(other.velocity(x_t, t, cond), policy.velocity(x_t, t, cond))
    torch.testing.assert_close(other.old_velocity(x_t, t, cond), policy.old_velocity(x_t, t, cond))
    with pytest.raises(MarbleError, match="shape"):
        tiny(tiny_flux_dir, rank=2).load_state_dict(policy.state_dict())


def test_adapter_round_trip_in_diffusers_format(tiny_flux_dir, batch, tmp_path):
    from safetensors.torch import load_file

    x_t, t, cond = batch
    policy = tiny(tiny_flux_dir, rank=4, alpha=12)  # alpha ≠ 2·rank: the scaling must survive
    perturb(policy, seed=4, scale=0.2)
    file = policy.save_adapter(tmp_path)
    keys = load_file(file)
    assert all(k.startswith("transformer.") for k in keys)
    assert "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight" in keys
    fresh = tiny(tiny_flux_dir, rank=4, alpha=12, seed=9)
    fresh.load_adapter(tmp_path)
    expected = policy.velocity(x_t, t, cond).detach()
    torch.testing.assert_close(fresh.velocity(x_t, t, cond).detach(), expected)
    torch.testing.assert_close(fresh.old_velocity(x_t, t, cond), expected)
    with pytest.raises(MarbleError, match="does not match"):
        tiny(tiny_flux_dir, rank=2).load_adapter(file)


def test_gradient_checkpointing_gives_the_same_gradients_and_bf16_runs(tiny_flux_dir, batch):
    x_t, t, cond = batch
    plain, checkpointed = tiny(tiny_flux_dir), tiny(tiny_flux_dir, gradient_checkpointing=True)
    assert_checkpointing_keeps_gradients(plain, checkpointed, x_t, t, cond)
    bf16 = tiny(tiny_flux_dir, mixed_precision="bf16")
    bf16.load_state_dict(plain.state_dict())
    v32, v16 = plain.velocity(x_t, t, cond), bf16.velocity(x_t, t, cond)
    # toy widths and random weights are far from bf16-friendly (FLUX also rounds t to bf16 before
    # its time embedding under autocast): measured 4–9 % here; a wrong path is off by order one
    assert v16.dtype == torch.float32 and 0 < (v16 - v32).norm() / v32.norm() < 0.15
    with bf16.full_precision():
        torch.testing.assert_close(bf16.velocity(x_t, t, cond), v32)


def test_compile_and_auto_checkpointing_reach_flux(tiny_flux_dir, batch, monkeypatch):
    """The base's execution options work through FLUX's own transformer call: `compile` runs the
    no-grad forwards (rollout, v_old, v_ref) through torch.compile, v_θ stays eager; `auto`
    checkpointing keeps the activations on the CPU."""
    x_t, t, cond = batch
    compiled_calls = []

    def fake_compile(module, **kwargs):
        def run(*args, **kw):
            compiled_calls.append(torch.is_grad_enabled())
            return module(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    policy = tiny(tiny_flux_dir, compile=True, gradient_checkpointing="auto", steps=2)
    policy.sample(PROMPTS[:1], torch.Generator().manual_seed(0))
    policy.old_velocity(x_t, t, cond)
    policy.ref_velocity(x_t, t, cond)
    policy.velocity(x_t, t, cond).sum().backward()
    assert compiled_calls == [False] * 4
    assert policy._auto_checkpointing.decisions == {"kept": 1, "checkpointed": 0}


# ------------------------------------------------------------------ every trainer mode on FLUX

def flux_trainer(directory, **overrides) -> Trainer:
    settings = dict(prompts_per_step=2, images_per_prompt=2, timesteps_per_image=1, sample_steps=2,
                    out="unused", steps=2, policy="flux", policy_options={"path": str(directory), **TINY_FLUX_OPTIONS})
    options = overrides.pop("policy_options", {})
    config = TrainConfig(**{**settings, **overrides})
    config.policy_options.update(options)
    return Trainer(config, build_components(config))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_affine_equals_exact_on_flux_with_masked_rewards(tiny_flux_dir, checkpointing):
    """The two-pass `affine` Gram (LoRA capture on FLUX's dual- and single-stream layers) equals
    one backward pass per reward in fp32 — with the rewards a prompt set does not judge masked
    out, and with the forward replayed by gradient checkpointing inside the capture. Measured:
    max |g_affine − g_exact| = 3.5e-6 · max |g_exact| (both settings; two runs of `exact` agree
    bitwise): float32 round-off of two summation orders, held here to the SD3 test's 1e-6 × 10."""
    trainer = flux_trainer(tiny_flux_dir, prompts_per_step=1, images_per_prompt=4, timesteps_per_image=2,
                           gram="exact", policy_options={"gradient_checkpointing": checkpointing})
    assert trainer.policy.transformer.is_gradient_checkpointing == checkpointing
    # one prompt set per step: the other specialists judge nothing
    exact, absent = assert_affine_equals_exact_with_absent_rewards(trainer, _captured_batch(trainer))
    names = trainer.policy._trainable_names
    single = torch.tensor([n.startswith("single_transformer_blocks") for n in names])
    sizes = torch.tensor([p.numel() for p in trainer.params])
    in_single = torch.repeat_interleave(single, sizes)
    assert exact[~absent][:, in_single].abs().sum() > 0  # the single-stream LoRA gets gradient


def test_every_gram_mode_micro_batches_sampled_rows_and_the_grid_train_flux(tiny_flux_dir):
    start = flux_trainer(tiny_flux_dir, gram="exact").policy.state_dict()
    seen = {}
    for name, overrides in {"exact": dict(gram="exact"), "affine": dict(gram="affine"),
                            "periodic": dict(gram="periodic", gram_period=2),
                            "gram_rows": dict(gram="affine", gram_rows=0.5),
                            "micro_batch": dict(gram="affine", micro_batch=1),
                            "grid_ema": dict(gram="affine", timestep_schedule="grid", ema_decay=0.9)}.items():
        trainer = flux_trainer(tiny_flux_dir, **overrides)
        history = [trainer.step() for _ in range(2 if name == "periodic" else 1)]
        seen[name] = [m["gram_mode"] for m in history]
        assert all(math.isfinite(v) for m in history for k, v in m.items()
                   if k.startswith(("lambda/", "weight/")))
        after = trainer.policy.state_dict()
        assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("lora.")), name
        if name in ("affine", "micro_batch"):
            seen[name + "/grad"] = torch.cat([p.grad.reshape(-1) for p in trainer.params])
        if name == "grid_ema":  # trains on FLUX's own shifted sampler grid, keeps a weight EMA
            grid = trainer.policy.sampling_timesteps(2)
            assert trainer.timestep_grid is not None and torch.equal(trainer.timestep_grid, grid)
            assert "ema_decay" in history[0]
    assert seen["periodic"] == ["affine", "reuse"] and seen["exact"] == ["exact"]
    assert seen["gram_rows"] == ["affine"] and seen["micro_batch"] == ["affine"]
    whole, parts = seen["affine/grad"], seen["micro_batch/grad"]
    assert (parts - whole).norm() <= 1e-4 * whole.norm()  # micro-batches sum to the whole batch


@pytest.mark.parametrize("factory", ["flux", "flux-arch"])
@pytest.mark.parametrize("bad", [{"mixed_precision": "fp8"}, {"rank": 0}, {"gradient_checkpointing": "maybe"},
                                 {"compile": 1.5}])
def test_bad_options_are_refused_before_any_weights_load(factory, bad, tiny_flux_dir, monkeypatch):
    """A mistyped option is a one-line error before FLUX.1's 12 B weights are read or built."""
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(flux, "load_flux_pipeline", no_weights)
    monkeypatch.setattr(flux, "flux_arch_pipeline", no_weights)
    monkeypatch.setenv("MARBLE_ALLOW_CPU_ARCH", "1")
    options = {"path": str(tiny_flux_dir)} if factory == "flux" else {}
    with pytest.raises(MarbleError, match=next(iter(bad))) as error:
        build("policy", factory, {**options, "device": "cpu", **bad})
    assert "\n" not in str(error.value)
