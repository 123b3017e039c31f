"""SD3 policies: one loader for `sd3.5` and `tiny-sd3`, LoRA semantics, checkpoints, memory paths."""

from __future__ import annotations

import json

import pytest
import torch
from policy_checks import assert_checkpointing_keeps_gradients, perturb

from marble_kit.errors import MarbleError
from marble_kit.policy import Policy, offloaded
from marble_kit.registry import build
from marble_plugins.policies import flow_matching, sd3
from marble_plugins.policies.sd3 import build_sd35, build_tiny_sd3

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           'a sign that says "cat" on a gray background', "a green triangle on a white background"]


@pytest.fixture(scope="module")
def policy():
    return build_tiny_sd3(seed=0, steps=3)


@pytest.fixture(scope="module")
def batch(policy):
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(policy.latent_shape(len(PROMPTS)), generator=generator)
    t = torch.rand(len(PROMPTS), generator=generator)
    return x_t, t, policy.encode_prompts(PROMPTS)


def test_tiny_policy_satisfies_the_contract(policy):
    assert isinstance(policy, Policy)
    assert policy.device == torch.device("cpu")
    names = policy._trainable_names
    assert names == sorted(names) and all("lora_" in n for n in names)
    targets = {"attn." + n.split(".lora_")[0].split("attn.")[-1] for n in names}
    assert targets == set(sd3.DEFAULT_TARGET_MODULES)
    assert policy.lora_config.r == 8 and policy.lora_config.lora_alpha == 16


def test_tiny_loads_through_the_sd35_loader(monkeypatch):
    calls = []
    real_loader = sd3.load_sd3_pipeline

    def spy(directory, **kwargs):
        calls.append(str(directory))
        return real_loader(directory, **kwargs)

    monkeypatch.setattr(sd3, "load_sd3_pipeline", spy)
    monkeypatch.setenv(sd3.SD35_PATH_ENV, str(sd3.TINY_PRIOR_DIR))
    big = build_sd35(device="cpu", mixed_precision="no", gradient_checkpointing=False,
                     resolution=64, max_sequence_length=1, steps=3, rank=8)
    tiny = build_tiny_sd3(steps=3)
    assert calls == [str(sd3.TINY_PRIOR_DIR)] * 2
    # sd3.5 loads the prior's no-T5 placeholder, tiny-sd3 skips it: the same zeros either way
    assert big.name == "sd3.5" and big.pipeline.text_encoder_3 is not None and tiny.pipeline.text_encoder_3 is None
    a = big.sample(PROMPTS[:2], torch.Generator().manual_seed(3))
    b = tiny.sample(PROMPTS[:2], torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.x0, b.x0)
    assert a.images.shape == (2, 3, 64, 64)


def test_missing_sd35_directory_names_model_option_and_env(monkeypatch, tmp_path):
    with pytest.raises(MarbleError) as error:
        build_sd35(path=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert sd3.SD35_MODEL_ID in message and "path" in message and sd3.SD35_PATH_ENV in message
    assert "\n" not in message

    import huggingface_hub.constants

    monkeypatch.delenv(sd3.SD35_PATH_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MarbleError, match="not available locally"):
        build_sd35()


def test_a_download_without_t5_loads_without_it_and_a_missing_component_is_one_line(tmp_path):
    """A StableDiffusion3Pipeline directory downloaded without T5's 10 GB (model_index.json still
    names it) loads with T5 skipped; any other missing component folder is refused by name."""
    import shutil

    no_t5 = shutil.copytree(sd3.TINY_PRIOR_DIR, tmp_path / "no-t5")
    shutil.rmtree(no_t5 / "text_encoder_3")
    assert sd3.load_sd3_pipeline(no_t5).text_encoder_3 is None
    shutil.rmtree(no_t5 / "vae")
    with pytest.raises(MarbleError, match=r"names `vae` but .*no-t5/vae/ is missing") as error:
        sd3.load_sd3_pipeline(no_t5)
    assert "\n" not in str(error.value)


def test_missing_tiny_prior_and_bad_options_are_marble_errors(tmp_path):
    with pytest.raises(MarbleError, match="tiny_prior"):
        build_tiny_sd3(path=str(tmp_path))
    with pytest.raises(MarbleError, match="mixed_precision"):
        build_tiny_sd3(mixed_precision="fp8")


def test_sampling_is_seeded_and_independent_of_chunking(policy):
    a = policy.sample(PROMPTS, torch.Generator().manual_seed(7))
    b = policy.sample(PROMPTS, torch.Generator().manual_seed(7))
    c = policy.sample(PROMPTS, torch.Generator().manual_seed(8))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.images, b.images)
    assert not torch.allclose(a.x0, c.x0)
    policy.sample_batch_size = 1
    try:
        chunked = policy.sample(PROMPTS, torch.Generator().manual_seed(7))
    finally:
        policy.sample_batch_size = 0
    torch.testing.assert_close(chunked.x0, a.x0, atol=1e-5, rtol=1e-5)
    assert a.x0.shape == policy.latent_shape(4) and a.images.device.type == "cpu"
    assert 0 <= a.images.min() and a.images.max() <= 1
    assert len(a.cond) == 4 and a.prompts == PROMPTS


def test_sample_decodes_what_it_returns(policy):
    rollout = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.decode(rollout.x0), rollout.images)


def test_conditioning_index_and_repeat(policy):
    cond = policy.encode_prompts(PROMPTS)
    single = policy.encode_prompts([PROMPTS[2]])
    torch.testing.assert_close(cond.index([2]).prompt_embeds, single.prompt_embeds)
    rows = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert torch.equal(cond.index(rows).pooled_prompt_embeds[4:], cond.pooled_prompt_embeds)
    repeated = cond.repeat(3)
    assert len(repeated) == 12
    assert torch.equal(repeated.prompt_embeds[3:6], cond.prompt_embeds[1:2].expand(3, -1, -1))


def test_velocity_old_and_reference_semantics():
    policy = build_tiny_sd3(seed=0, steps=2)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(policy.latent_shape(3), generator=generator)
    t = torch.rand(3, generator=generator)
    cond = policy.encode_prompts(PROMPTS[:3])
    # LoRA B starts at zero: all three views agree
    torch.testing.assert_close(policy.velocity(x_t, t, cond).detach(), policy.ref_velocity(x_t, t, cond))
    perturb(policy, seed=1)
    v = policy.velocity(x_t, t, cond)
    v_old = policy.old_velocity(x_t, t, cond)
    v_ref = policy.ref_velocity(x_t, t, cond)
    assert v.requires_grad and not v_old.requires_grad and not v_ref.requires_grad
    assert (v - v_old).abs().max() > 1e-3
    torch.testing.assert_close(v_old, v_ref)  # old is still the initial LoRA (B = 0)
    assert all(p.requires_grad for p in policy.trainable_parameters())  # ref kept them trainable
    v.square().mean().backward()  # the graph built before old/ref calls is still valid
    assert all(p.grad is not None for p in policy.trainable_parameters())
    # update_old is an exact EMA of the LoRA tensors
    before = policy.state_dict()
    policy.update_old(0.25)
    after = policy.state_dict()
    for key, old in before.items():
        if key.startswith("old."):
            lora = before["lora." + key[4:]]
            torch.testing.assert_close(after[key], 0.25 * old + 0.75 * lora)
    policy.update_old(0.0)
    torch.testing.assert_close(policy.old_velocity(x_t, t, cond), v.detach(), atol=1e-5, rtol=1e-5)


def test_lora_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_sd3(seed=5)
    assert torch.equal(torch.rand(1), expected)
    b = build_tiny_sd3(seed=5)
    c = build_tiny_sd3(seed=6)
    for pa, pb in zip(a.trainable_parameters(), b.trainable_parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.trainable_parameters(), c.trainable_parameters()))


def test_state_dict_round_trip(batch):
    x_t, t, cond = batch
    source = build_tiny_sd3(seed=0)
    perturb(source, seed=2)
    source.update_old(0.5)
    perturb(source, seed=3)
    target = build_tiny_sd3(seed=1)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.velocity(x_t, t, cond), source.velocity(x_t, t, cond))
    torch.testing.assert_close(target.old_velocity(x_t, t, cond), source.old_velocity(x_t, t, cond))
    broken = source.state_dict()
    broken.pop(next(iter(broken)))
    with pytest.raises(MarbleError, match="does not match"):
        target.load_state_dict(broken)
    with pytest.raises(MarbleError, match="shape"):
        build_tiny_sd3(rank=4).load_state_dict(source.state_dict())


def test_adapter_round_trips_through_diffusers_load_lora_weights(tmp_path, batch):
    x_t, t, cond = batch
    policy = build_tiny_sd3(seed=0, rank=4, alpha=12)  # alpha ≠ rank: the scaling must survive
    perturb(policy, seed=4)
    file = policy.save_adapter(tmp_path)
    assert file.is_file() and file.suffix == ".safetensors"
    expected = policy.velocity(x_t, t, cond).detach()
    from safetensors import safe_open

    with safe_open(str(file), "pt") as saved:  # a sorted list: the same bytes in every process
        modules = json.loads(saved.metadata()["lora_adapter_metadata"])["transformer.target_modules"]
    assert modules == sorted(modules) and len(modules) == 8

    pipeline = sd3.load_sd3_pipeline(sd3.TINY_PRIOR_DIR)
    pipeline.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = pipeline.transformer(hidden_states=x_t, timestep=t * 1000,
                                      encoder_hidden_states=cond.prompt_embeds,
                                      pooled_projections=cond.pooled_prompt_embeds,
                                      return_dict=False)[0]
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)

    fresh = build_tiny_sd3(seed=9, rank=4, alpha=12)
    fresh.load_adapter(file)
    torch.testing.assert_close(fresh.velocity(x_t, t, cond).detach(), expected)
    torch.testing.assert_close(fresh.old_velocity(x_t, t, cond), expected)
    with pytest.raises(MarbleError, match="does not match"):
        build_tiny_sd3(rank=8).load_adapter(file)
    with pytest.raises(MarbleError, match="does not exist"):
        fresh.load_adapter(tmp_path / "missing.safetensors")


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    x_t, t, cond = batch
    plain, checkpointed = build_tiny_sd3(seed=0), build_tiny_sd3(seed=0, gradient_checkpointing=True)
    assert_checkpointing_keeps_gradients(plain, checkpointed, x_t, t, cond)


def test_bf16_autocast_runs_close_to_fp32(batch):
    x_t, t, cond = batch
    fp32, bf16 = build_tiny_sd3(seed=0), build_tiny_sd3(seed=0, mixed_precision="bf16")
    perturb(fp32, seed=6)
    bf16.load_state_dict(fp32.state_dict())
    v32, v16 = fp32.velocity(x_t, t, cond), bf16.velocity(x_t, t, cond)
    assert v16.dtype == torch.float32  # the loss is computed in fp32
    assert all(p.dtype == torch.float32 for p in bf16.trainable_parameters())
    relative = (v16 - v32).norm() / v32.norm()
    assert 0 < relative < 0.05
    v16.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in bf16.trainable_parameters())
    rollout = bf16.sample(PROMPTS[:2], torch.Generator().manual_seed(0))
    assert torch.isfinite(rollout.x0).all() and rollout.images.dtype == torch.float32


def test_offload_paths_give_identical_samples(policy):
    offloading = build_tiny_sd3(seed=0, steps=3, offload_vae=True, offload_text_encoders=True)
    a = offloading.sample(PROMPTS, torch.Generator().manual_seed(2))
    b = policy.sample(PROMPTS, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.images, b.images)


class _Recorder:
    def __init__(self, log):
        self.log = log

    def to(self, device):
        self.log.append(str(device))
        return self


def test_offloaded_moves_in_and_back_out_even_on_error():
    log: list[str] = []
    with offloaded([_Recorder(log)], "meta"):
        assert log == ["meta"]
    assert log == ["meta", "cpu"]
    with pytest.raises(RuntimeError), offloaded([_Recorder(log)], "meta"):
        raise RuntimeError("boom")
    assert log[-1] == "cpu"
    with offloaded([_Recorder(log)], "meta", enabled=False):
        pass
    assert len(log) == 4


def test_classifier_free_guidance_changes_samples(policy):
    guided = build_tiny_sd3(seed=0, steps=3, guidance_scale=3.0)
    a = guided.sample(PROMPTS, torch.Generator().manual_seed(4))
    b = policy.sample(PROMPTS, torch.Generator().manual_seed(4))
    assert (a.x0 - b.x0).abs().mean() > 1e-3


def test_use_old_false_samples_with_the_trainable_weights():
    policy = build_tiny_sd3(seed=0, steps=2)
    base = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(0))
    perturb(policy, seed=7, scale=0.3)
    old = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(0))
    new = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(0), use_old=False)
    torch.testing.assert_close(old.x0, base.x0)
    assert (new.x0 - base.x0).abs().mean() > 1e-3


def test_sd35_medium_architecture_config_builds_on_meta():
    from diffusers import SD3Transformer2DModel

    config = sd3.SD35_MEDIUM_TRANSFORMER_CONFIG
    assert config["pos_embed_max_size"] == 384 and config["qk_norm"] == "rms_norm"
    # the sin-cos position table is a buffer computed eagerly (~15 s at 384²): shrink it only
    with torch.device("meta"):
        model = SD3Transformer2DModel(**{**config, "pos_embed_max_size": 16})
    count = sum(p.numel() for p in model.parameters())
    assert 2.2e9 < count < 2.6e9  # SD3.5 Medium: ~2.5 B parameters in the MMDiT-X transformer
    assert model.config.num_layers == 24 and model.config.caption_projection_dim == 1536
    assert sum(block.attn2 is not None for block in model.transformer_blocks) == 13
    with pytest.raises(MarbleError, match="GPU"):
        sd3.build_sd35_arch(device="cpu")


@pytest.mark.slow
def test_sd35_arch_pipeline_trains_through_the_policy():
    # one layer and a small positional table (the full 384² sin-cos table alone takes ~15 s)
    pipeline = sd3.sd35_arch_pipeline("cpu", num_layers=1, pos_embed_max_size=16)
    policy = sd3.SD3Policy(pipeline, name="sd3.5-arch", rank=2, device="cpu", resolution=64,
                           max_sequence_length=4, steps=1)
    x_t = torch.randn(policy.latent_shape(1))
    cond = policy.encode_prompts(["a red circle"])
    assert cond.prompt_embeds.shape == (1, 77 + 4, 4096) and cond.pooled_prompt_embeds.shape == (1, 2048)
    policy.velocity(x_t, torch.tensor([0.5]), cond).square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())


def test_policies_are_registered():
    from marble_kit.registry import registry_from_plugins

    registry = registry_from_plugins(sd3)
    assert {"tiny-sd3", "sd3.5", "sd3.5-arch"} <= set(registry.names("policy"))


def test_an_embedding_does_not_depend_on_which_prompts_were_encoded_with_it():
    """What a resume needs: the conditioning of a prompt is a function of the prompt alone, not of
    the batch of new prompts it was first encoded in (sample grids, a fresh cache after restart)."""
    from marble_kit.prompts import load_prompt_sets

    prompts = load_prompt_sets(["default"])[0].prompts[:8]
    together = build_tiny_sd3(seed=0, steps=1).encode_prompts(prompts)  # 8 new prompts at once
    alone = build_tiny_sd3(seed=0, steps=1)
    for index, prompt in enumerate(prompts):
        cond = alone.encode_prompts(prompts[:index % 3] + [prompt])  # other batches, other mixes
        assert torch.equal(cond.prompt_embeds[-1], together.prompt_embeds[index])
        assert torch.equal(cond.pooled_prompt_embeds[-1], together.pooled_prompt_embeds[index])


def test_long_prompts_give_one_note_instead_of_library_warnings_per_batch(capfd):
    import warnings

    from marble_kit.prompts import load_prompt_sets

    policy = build_tiny_sd3(seed=0, steps=1)
    prompts = load_prompt_sets(["general"])[0].prompts[:12]
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for start in range(0, len(prompts), 4):
            policy.encode_prompts(prompts[start:start + 4])
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and "read 16 tokens of a prompt; longer prompts are cut" in notes[0], notes
    printed = capfd.readouterr()
    assert "truncated" not in printed.err + printed.out and "Token indices" not in printed.err + printed.out


def _copies(run) -> int:
    """dtype copies (aten::_to_copy) made while ``run()`` runs forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.name == "aten::_to_copy" for e in prof.events())


def test_lora_inputs_stay_in_the_autocast_dtype_with_the_same_values(batch, monkeypatch):
    """Under autocast peft's float32 cast of each LoRA input is undone by autocast at once: the
    policy skips it — bitwise the same velocity and gradients, fewer copies."""
    from contextlib import nullcontext

    x_t, t, cond = batch
    policy = build_tiny_sd3(seed=0, mixed_precision="bf16")
    perturb(policy, seed=8)
    results = []

    def run():
        for p in policy.trainable_parameters():
            p.grad = None
        v = policy.velocity(x_t, t, cond)
        v.square().mean().backward()
        results.append((v.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))

    uncast = _copies(run)
    monkeypatch.setattr(flow_matching, "lora_inputs_uncast", lambda module, enabled=True: nullcontext())
    peft_casts = _copies(run)
    (v_ours, g_ours), (v_peft, g_peft) = results
    assert torch.equal(v_ours, v_peft) and all(torch.equal(a, b) for a, b in zip(g_ours, g_peft))
    lora_layers = len(policy.trainable_parameters()) // 2
    assert peft_casts - uncast >= 2 * lora_layers  # an input and its gradient per layer, at least


def test_auto_checkpointing_keeps_activations_that_fit(batch, monkeypatch):
    from marble_kit.policy import AutoCheckpointing

    x_t, t, cond = batch
    policy = build_tiny_sd3(seed=0, gradient_checkpointing="auto")
    seen = []
    hook = policy.transformer.register_forward_pre_hook(lambda m, a: seen.append(m.gradient_checkpointing))
    policy.velocity(x_t, t, cond).sum().backward()
    hook.remove()
    auto = policy._auto_checkpointing
    assert seen == [False] and auto.decisions == {"kept": 1, "checkpointed": 0}  # the CPU keeps them
    assert policy.transformer.gradient_checkpointing  # restored after the call

    class Blocks(torch.nn.Module):  # on a GPU: measure one row once, then rows × row ≤ 0.8 × free
        gradient_checkpointing = True

        def enable_gradient_checkpointing(self):
            pass

    allocated = iter([1000, 1000 + 50])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: next(allocated, 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1500, 10_000))
    probes = []
    gpu = AutoCheckpointing(Blocks(), torch.device("cuda"))
    assert gpu.keep(16, lambda: probes.append(1)) and gpu.row_bytes == 50  # 16·50·1.5 = 1200 ≤ 1200
    assert not gpu.keep(17, lambda: probes.append(1)) and probes == [1]
    with pytest.raises(MarbleError, match="gradient_checkpointing"):
        build_tiny_sd3(gradient_checkpointing="sometimes")


def test_compile_runs_the_no_grad_forwards_through_torch_compile(batch, monkeypatch):
    x_t, t, cond = batch
    compiled_calls, options = [], []

    def fake_compile(module, **kwargs):
        options.append(kwargs)

        def run(*args, **kw):
            compiled_calls.append(torch.is_grad_enabled())
            return module(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    policy = build_tiny_sd3(seed=0, steps=2, compile="reduce-overhead")
    policy.sample(PROMPTS[:1], torch.Generator().manual_seed(0))
    policy.old_velocity(x_t, t, cond)
    policy.ref_velocity(x_t, t, cond)
    policy.velocity(x_t, t, cond)  # with gradients: eager
    assert compiled_calls == [False] * 4 and options == [{"dynamic": False, "mode": "reduce-overhead"}]
    with pytest.raises(MarbleError, match="compile"):
        build_tiny_sd3(compile=3)


@pytest.mark.parametrize("factory", ["sd3.5", "tiny-sd3", "sd3.5-arch"])
@pytest.mark.parametrize("bad", [{"mixed_precision": "fp8"}, {"rank": 0}, {"gradient_checkpointing": "maybe"},
                                 {"compile": 1.5}])
def test_bad_options_are_refused_before_any_weights_load(factory, bad, monkeypatch):
    """A mistyped option is a one-line error before the (multi-GB) weights are read or built."""
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(sd3, "load_sd3_pipeline", no_weights)
    monkeypatch.setattr(sd3, "sd35_arch_pipeline", no_weights)
    monkeypatch.setenv("MARBLE_ALLOW_CPU_ARCH", "1")
    options = {"path": str(sd3.TINY_PRIOR_DIR)} if factory != "sd3.5-arch" else {}
    with pytest.raises(MarbleError, match=next(iter(bad))) as error:
        build("policy", factory, {**options, "device": "cpu", **bad})
    assert "\n" not in str(error.value)
