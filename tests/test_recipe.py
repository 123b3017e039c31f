"""The paper's recipe (`--config sd35-marble`, `sd35-equal-alpha`) against the official release,
and what it brought along: the sampler-grid timesteps, the weight EMA, the evaluation during
training with its best checkpoint, eval-only rewards.

The release's values are computed here from the formulas of its code (aim-uofa/MARBLE @ 1bf9543:
train.py, flow_grpo/ema.py; diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps as its SD3
pipeline calls it, with SD3.5's shift 3), never by calling ours.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_runs import marble, metric_lines
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file

from marble_kit.checkpoint import list_checkpoints, load_checkpoint
from marble_kit.config import TrainConfig, resolve_config
from marble_kit.ema import WeightEMA
from marble_kit.errors import MarbleError
from marble_kit.evaluate import eval_prompt_sets
from marble_kit.prompts import PromptSampler, resolve_prompt_sets
from marble_kit.registry import build
from marble_kit.trainer import Trainer, build_components
from marble_plugins.policies import sd3

# The release's LoRA targets (train.py) and the bare suffixes this project used before.
RELEASE_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                   "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
BARE_TARGETS = [name.split("attn.")[-1] for name in RELEASE_TARGETS]


def recipe(name: str = "sd35-marble") -> TrainConfig:
    return TrainConfig.from_toml(resolve_config(name))


def release_sigmas(steps: int, shift: float = 3.0, train_timesteps: int = 1000) -> np.ndarray:
    """diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps) / 1000, written out:
    its σ range is [shift(1/N), 1], linearly spaced, then shifted again: s·u / (1 + (s−1)·u)."""
    def shifted(u):
        return shift * u / (1 + (shift - 1) * u)
    return shifted(np.linspace(1.0, shifted(1.0 / train_timesteps), steps))


def test_the_two_recipes_differ_only_in_the_balancer():
    marble_recipe, equal = recipe().to_dict(), recipe("sd35-equal-alpha").to_dict()
    assert {k for k in marble_recipe if marble_recipe[k] != equal[k]} == {"balancer", "balancer_options"}
    assert (equal["balancer"], equal["balancer_options"]) == ("weighted-sum", {"weights": [0.2] * 5})
    assert marble_recipe["policy_options"]["target_modules"] == RELEASE_TARGETS
    assert marble_recipe["policy_options"]["max_sequence_length"] == 128
    assert (marble_recipe["grad_clip"], marble_recipe["grad_clip_scale"]) == (1.0, 5.0)
    assert (marble_recipe["ema_decay"], marble_recipe["eval_every"]) == (0.9, 10)
    assert (marble_recipe["eval_sample_steps"], marble_recipe["timestep_schedule"]) == (40, "grid")


def test_recipe_prompt_sets_are_drawn_a_third_each_and_ocr_judges_one_of_them():
    """The release's StratifiedKRepeatSampler: 2 of every 6 prompts per source, 16 of 48 a step."""
    config = recipe()
    sets = resolve_prompt_sets(config.prompts, config.rewards)
    assert [s.name for s in sets] == ["general", "ocr", "compositional"]
    sampler = PromptSampler(sets, seed=config.seed)
    for _ in range(5):
        counts = Counter(index for _, index in sampler.sample(config.prompts_per_step))
        assert counts == {0: 16, 1: 16, 2: 16}
    # ocr scores NaN without quoted text: exactly the ocr set is its own (the release's ocr source)
    quoted = [any('"' in p for p in s.prompts) for s in sets]
    assert [all('"' in p for p in s.prompts) for s in sets] == quoted == [False, True, False]
    held_out = eval_prompt_sets(config)
    trained = {p for s in sets for p in s.prompts}
    assert len(held_out) == 3 and not trained & {p for s in held_out for p in s.prompts}


def test_the_compositional_sets_carry_geneval_metadata_that_the_geneval_reward_accepts():
    """The recipe's third set and its held-out split are GenEval prompt files: every prompt has
    metadata the `geneval` reward judges (COCO classes, GenEval's colours and relations), the six
    task kinds equally, so `--rewards …,geneval` (or `remote:geneval`) scores exactly that set."""
    from marble_kit.rewards import prompt_metadata
    from marble_plugins.rewards.geneval import CLASSNAMES, TAGS, check_metadata

    config = recipe()
    compositional = resolve_prompt_sets(config.prompts, config.rewards)[2]
    held_out = eval_prompt_sets(config)[2]
    for prompt_set, size in ((compositional, 48), (held_out, 12)):
        assert len(prompt_set.prompts) == size and prompt_set.rewards is None
        tags = Counter()
        for prompt in prompt_set.prompts:
            metadata = prompt_metadata(prompt)
            check_metadata(metadata, prompt, CLASSNAMES)  # raises a MarbleError on unusable metadata
            tags[metadata["tag"]] += 1
            for clause in metadata["include"]:
                assert clause["class"] in prompt and clause.get("color", "") in prompt
        assert set(tags) == set(TAGS) and len(set(tags.values())) == 1
    others = resolve_prompt_sets(config.prompts, config.rewards)[:2]
    assert not any(prompt_metadata(p) for s in others for p in s.prompts)  # geneval: NaN there


@pytest.fixture(scope="module")
def arch():
    """The recipe's policy options through the `sd3.5-arch` factory (the GPU smoke test's policy),
    with a 3-block transformer: two dual-attention blocks (attn2, as in SD3.5 Medium's first 13)
    and a last, context-pre-only one; a small VAE."""
    config = recipe().replace(policy="sd3.5-arch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MARBLE_ALLOW_CPU_ARCH", "1")
        for key, value in dict(num_layers=3, dual_attention_layers=(0, 1), attention_head_dim=8,
                               num_attention_heads=2, caption_projection_dim=16).items():
            patch.setitem(sd3.SD35_MEDIUM_TRANSFORMER_CONFIG, key, value)
        patch.setitem(sd3.SD35_VAE_CONFIG, "block_out_channels", (32, 32, 32, 32))
        policy = build("policy", config.policy, {"seed": config.seed, **config.policy_options})
    return config, policy


def test_sd35_arch_takes_every_recipe_option_and_lora_lands_on_the_release_modules(arch):
    _, policy = arch
    assert (policy.max_sequence_length, policy.guidance_scale, policy.resolution) == (128, 1.0, 512)
    transformer = policy.transformer
    adapted = {name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)}
    expected = {f"transformer_blocks.{i}.attn.{proj}" for i in range(3)
                for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    expected |= {f"transformer_blocks.{i}.attn.to_add_out" for i in range(2)}  # the last block has none
    assert adapted == expected
    second = {name for name, _ in transformer.named_modules() if ".attn2." in name}
    assert {f"transformer_blocks.{i}.attn2.to_q" for i in (0, 1)} <= second  # the blocks have attn2
    assert len(policy.trainable_parameters()) == 2 * len(expected)
    assert all(p.shape[0] == 32 or p.shape[1] == 32 for p in policy.trainable_parameters())  # rank 32


def test_bare_suffixes_adapt_27_percent_more_of_sd35_medium():
    """SD3.5 Medium itself (built on the meta device): peft matches a target as a suffix, so the
    bare names also adapt attn2 in its 13 dual-attention blocks."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**sd3.SD35_MEDIUM_TRANSFORMER_CONFIG)
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}

    def lora_parameters(targets):
        matched = [n for n in linears if check_target_module_exists(LoraConfig(target_modules=targets), n)]
        return len(matched), sum(32 * (linears[n].in_features + linears[n].out_features) for n in matched)

    (exact_layers, exact), (bare_layers, bare) = lora_parameters(RELEASE_TARGETS), lora_parameters(BARE_TARGETS)
    assert (exact_layers, bare_layers) == (24 * 7 + 23, 24 * 7 + 23 + 13 * 4)
    assert bare / exact - 1 == pytest.approx(0.272, abs=1e-3)
    assert set(sd3.DEFAULT_TARGET_MODULES) == set(RELEASE_TARGETS)


def test_grid_timesteps_are_the_release_sigmas(arch):
    _, policy = arch
    for steps in (25, 40):
        ours = policy.sampling_timesteps(steps).double().numpy()
        assert np.abs(ours - release_sigmas(steps)).max() < 1e-6
    # The trained range is [0.0089, 1]: SD3's scheduler ends at shift(1/1000), not at shift(1/25).
    assert release_sigmas(25)[-1] == pytest.approx(0.00893, abs=1e-5)


def test_grid_schedule_trains_24_distinct_of_the_25_per_image_one_dropped_at_random():
    config = TrainConfig(prompts_per_step=3, images_per_prompt=2, sample_steps=25, timesteps_per_image=24,
                         timestep_schedule="grid", out="unused")
    trainer = Trainer(config, build_components(config))
    grid = trainer.policy.sampling_timesteps(25)
    assert torch.equal(trainer.timestep_grid, grid)
    images = 1000
    t = trainer._draw_timesteps(images).view(24, images)  # timestep-major, like the folded rows
    dropped = Counter()
    for column in t.T:
        chosen = set(column.tolist())
        assert len(chosen) == 24 and chosen <= set(grid.tolist())
        dropped.update(set(grid.tolist()) - chosen)
    assert len(dropped) == 25 and sum(dropped.values()) == images
    assert 15 <= min(dropped.values()) and max(dropped.values()) <= 70  # Binomial(1000, 1/25): 40 ± 6
    with pytest.raises(MarbleError, match="has no sampling_timesteps"):
        Trainer._timestep_grid(SimpleNamespace(config=config, policy=object()))
    with pytest.raises(MarbleError, match="exceeds the sampler's 25 timesteps"):
        config.replace(timesteps_per_image=26)


def test_weight_ema_follows_the_release_schedule_and_swaps_in():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([param], decay=0.9)
    expected = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 101):  # flow_grpo/ema.py: d = min((1 + n)/(10 + n), decay), n = global_step
        with torch.no_grad():
            param.copy_(torch.tensor([step, -step, 0.5 * step]))
        decay = min((1 + step) / (10 + step), 0.9)
        expected = decay * expected + (1 - decay) * param.detach().double()
        assert ema.update(step) == decay
    assert torch.allclose(ema.shadow[0].double(), expected, rtol=1e-5)
    raw = param.detach().clone()
    with ema.applied():
        assert torch.equal(param.detach(), ema.shadow[0])
    assert torch.equal(param.detach(), raw)


def test_config_refuses_eval_rewards_that_are_trained():
    with pytest.raises(MarbleError, match="eval_rewards .* none that is trained"):
        TrainConfig(eval_rewards=["color"])


TINY = ["--set", "prompts_per_step=3", "--set", "images_per_prompt=2", "--set", "timesteps_per_image=1",
        "--set", "sample_steps=3", "--set", "threads=1", "--set", "sample_every=0",
        "--set", "checkpoint_every=1", "--no-progress"]
EVAL = ["--set", "ema_decay=0.9", "--set", "eval_every=1", "--set", "eval_max_prompts=3",
        "--set", "eval_images_per_prompt=2", "--set", "eval_rewards=brightness"]
EVAL_KEYS = ("eval/", "eval_delta/", "ema_decay", "time/")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The same 3 steps with and without the weight EMA, the evaluation and an eval-only reward."""
    root = tmp_path_factory.mktemp("evaluated")
    for name, extra in (("plain", []), ("evaluated", EVAL)):
        result = marble("train", "--out", root / name, "--steps", 3, *TINY, *extra)
        assert result.exit_code == 0, result.output
    return root


def test_evaluation_and_eval_rewards_leave_training_bit_for_bit_alone(evaluated):
    plain, evaluated_rows = metric_lines(evaluated / "plain"), metric_lines(evaluated / "evaluated")
    assert [row["step"] for row in evaluated_rows] == [0, 1, 2, 3]  # step 0: the base evaluation
    strip = [{k: v for k, v in row.items() if not k.startswith(EVAL_KEYS)} for row in evaluated_rows[1:]]
    assert strip == [{k: v for k, v in row.items() if not k.startswith("time/")} for row in plain]
    for row in evaluated_rows:
        assert {"eval/brightness", "eval_delta/brightness", "eval/composite"} <= set(row)
        assert not any(k.endswith("/brightness") and not k.startswith("eval") for k in row)
    _, state = load_checkpoint(evaluated / "evaluated" / "checkpoints" / "step-000003")
    assert state["balancer"]["lam"].shape == (3,)  # the QP never saw brightness
    assert [row["ema_decay"] for row in evaluated_rows[1:]] == [2 / 11, 3 / 12, 4 / 13]


def test_best_checkpoint_has_the_highest_composite_and_marble_eval_repeats_the_numbers(evaluated):
    run = evaluated / "evaluated"
    rows = metric_lines(run)
    composites = []
    for row in rows:  # the composite, recomputed from each eval.json: mean Δ / base std of the trained
        report = json.loads((run / "eval" / f"step-{row['step']:06d}" / "eval.json").read_text())
        by_reward = {r["reward"]: r for r in report["rewards"]}
        deltas = [(by_reward[k]["tuned_mean"] - by_reward[k]["base_mean"]) / by_reward[k]["base_std"]
                  for k in ("color", "shape", "centering")]
        composites.append(sum(deltas) / 3)
        assert math.isclose(row["eval/composite"], composites[-1], rel_tol=1e-9, abs_tol=1e-12)
    best_step = int(np.argmax(composites))  # the first of equal maxima, like a strict ">"
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["step"] == meta["best"]["step"] == best_step
    assert [c.name for c in list_checkpoints(run)] == ["step-000002", "step-000003"]  # best is not pruned

    out = run / "marble-eval"
    result = marble("eval", run / "checkpoints" / "step-000003", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    again = json.loads((out / "eval.json").read_text())
    logged = json.loads((run / "eval" / "step-000003" / "eval.json").read_text())
    assert again["weights"] == "ema" and again["rewards"] == logged["rewards"]
    ema = load_checkpoint(run / "checkpoints" / "step-000003")[1]["ema"]["shadow"]
    adapter = load_file(run / "checkpoints" / "step-000003" / "ema_adapter" / "pytorch_lora_weights.safetensors")
    assert sorted(t.numel() for t in adapter.values()) == sorted(t.numel() for t in ema)
    raw = marble("eval", run / "checkpoints" / "step-000003", "--out", run / "raw", "--weights", "raw",
                 "--rewards", "color", "--max-prompts", 1, "--sample-steps", 4, "--json")
    assert raw.exit_code == 0, raw.output
    report = json.loads((run / "raw" / "eval.json").read_text())
    assert (report["weights"], report["sample_steps"], len(report["prompts"])) == ("raw", 4, 1)
