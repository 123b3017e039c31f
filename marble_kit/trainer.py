"""The MARBLE training step (SPEC §1) and the loop around it.

One step, top to bottom:

    rollout  → rewards R [K, B]  → advantages → reward probabilities r [K, B]
             → per-reward losses L_k over the rows reward k judges (SPEC §1.4)
             → per-reward gradients g_k (Gram G = g gᵀ, `affine`: two backward passes)
             → balancer over the rewards that express a preference: loss weights w
             → fused gradient Σ w_k g_k (+ anchor) → optimizer step
             → old-policy EMA, diagnostics.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from marble_kit import gram as gram_ops
from marble_kit.advantages import group_advantages, reward_statistics, summed_rewards
from marble_kit.balancing import MinNormQP, balance, solve_period_due
from marble_kit.config import TrainConfig
from marble_kit.distributed import Distributed
from marble_kit.ema import WeightEMA
from marble_kit.errors import MarbleError
from marble_kit.nft import (
    affine_cotangents_autograd,
    anchor_cotangent,
    anchor_loss,
    fused_row_weights,
    nft_cotangents,
    nft_loss_per_sample,
    reward_row_coefficients,
    velocity_loss_per_sample,
)
from marble_kit.policy import offloaded
from marble_kit.prompts import PromptSampler, applicability_mask, configured_reward, resolve_prompt_sets
from marble_kit.registry import build

# After this many consecutive steps in which a reward judged nothing (or preferred nothing), a
# one-line warning names it; the per-step metrics `active/<reward>` say it from the first step.
INACTIVE_WARN_STEPS = 3
# A per-reward gradient whose norm is below this many units of round-off of the largest one is
# a numerical zero (an exact zero computed through sums that do not cancel exactly): fp32 7.6e-6.
# Half precision is capped so that a real gradient 0.1% the size of another is never dropped.
ROUNDOFF_ULPS = 64
ROUNDOFF_CAP = 1e-3


def numerical_zero_ratio(dtype: torch.dtype) -> float:
    """Norm ratio below which a gradient computed in ``dtype`` counts as round-off of zero."""
    return min(ROUNDOFF_ULPS * torch.finfo(dtype).eps, ROUNDOFF_CAP)


@dataclass
class Components:
    """Everything a run is assembled from (built by :func:`build_components`)."""

    policy: Any
    rewards: list[Any]
    reward_names: list[str]
    balancer: Any
    prompt_sets: list[Any]
    eval_rewards: list[Any] = field(default_factory=list)  # scored in evaluations only, never trained


def build_components(config: TrainConfig) -> Components:
    """Rewards first (missing weights fail fast, before the policy loads), then the rest."""
    prompt_sets = resolve_prompt_sets(config.prompts, config.rewards)
    rewards = [build("reward", name, config.reward_options.get(name, {})) for name in config.rewards]
    eval_rewards = [build("reward", name, config.reward_options.get(name, {})) for name in config.eval_rewards]
    unknown_options = set(config.reward_options) - set(config.rewards) - set(config.eval_rewards)
    if unknown_options:
        raise MarbleError(
            f"reward options given for {sorted(unknown_options)} which are not in --rewards "
            f"{','.join(config.rewards)}; add the reward or drop the option"
        )
    for prompt_set in prompt_sets:
        for name in prompt_set.rewards or []:
            if not configured_reward(name, config.rewards):
                raise MarbleError(
                    f"prompt set {prompt_set.name!r} is tagged with reward {name!r}, which is not "
                    f"in --rewards {','.join(config.rewards)}; add it or change the tags"
                )
    balancer = build("balancer", config.balancer, config.balancer_options, len(config.rewards))
    policy = build("policy", config.policy, {"seed": config.seed, **config.policy_options})
    device = reward_device(config, policy)
    for reward in rewards + eval_rewards:
        reward.to(device)
    return Components(policy, rewards, list(config.rewards), balancer, prompt_sets, eval_rewards)


def balance_weights(balancer: Any, gram: torch.Tensor, step: int, active: torch.Tensor) -> torch.Tensor:
    """:func:`marble_kit.balancing.balance` as float64 on the CPU, exactly 0 for inactive rewards."""
    active = active.cpu()
    weights = torch.as_tensor(balance(balancer, gram, step, active)).detach().cpu().double()
    return torch.where(active, weights, torch.zeros_like(weights))


@dataclass
class RowJudgement:
    """Which reward judges which image of the *global* batch, and where it has a preference.

    ``judged`` [K, B·W]: the image is in reward k's loss (``reward_scope = "judged"``: the
    reward is finite there; ``"all"``: every image). ``prefers`` [K, B·W]: judged with a nonzero
    advantage. Training rows are image × timestep, so counts are per row (× T).
    """

    judged: torch.Tensor
    prefers: torch.Tensor
    timesteps: int

    def counts(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """n_k [K]: rows reward k judges, over all rows (``images`` None) or over the rows of
        the given global image indices (one entry per row)."""
        if images is None:
            return self.judged.sum(1) * self.timesteps
        return self.judged[:, images].sum(1)

    def candidates(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """[K] bool: the reward judges a row with a nonzero advantage (it may enter the QP)."""
        prefers = self.prefers if images is None else self.prefers[:, images]
        return prefers.any(1)


@dataclass
class TrainBatch:
    """A rollout folded into training rows: T timesteps per image (this rank's rows)."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    cond: Any
    r: torch.Tensor           # [K, N] reward probabilities, one row per training row
    v_old: torch.Tensor
    v_ref: torch.Tensor | None
    images: torch.Tensor      # [N] global image index of each row
    coef: torch.Tensor        # [K, N] L_k = Σ_i coef_ki·ℓ_k(i) (global mean over judged rows, ×W)
    candidates: torch.Tensor  # [K] bool: rewards with a preference in these rows (all ranks)
    # A sample of another batch's rows (gram_rows < 1): which of its rows, and the global n_k [K]
    # that ``coef`` divides by (the parent's divides by its own n_k, so coef ∝ 1/n_k per reward).
    rows: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def select(self, rows: torch.Tensor, coef: torch.Tensor, candidates: torch.Tensor) -> TrainBatch:
        """The training rows ``rows`` of this batch, with their own loss coefficients."""
        return TrainBatch(self.x0[rows], self.x_t[rows], self.t[rows], self.cond.index(rows),
                          self.r[:, rows], self.v_old[rows],
                          None if self.v_ref is None else self.v_ref[rows], self.images[rows],
                          coef, candidates)


class RewardFailure(MarbleError):
    """A reward failed while scoring a step; the trainer is still at its last complete step."""


class RewardScoring:
    """How a run scores its rewards on a batch: in training steps and in its evaluations alike
    (the held-out evaluation during training and `marble eval` call this, never the rewards).

    The K rewards score at once in ``reward_threads`` threads (each reward gets the same
    inputs as one after the other would, so the scores are bitwise the same); with
    ``reward_device = "offload"`` they score one after the other, each visiting the policy's
    device only while it scores. A failure is a :class:`RewardFailure` naming the first
    failing reward, in reward order (a reward's own ``on_error`` acts inside its call). The
    config is read at each call (``reward_threads`` as it is now).
    """

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config, self.device = config, device
        self._pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}

    def __call__(self, names: list[str], rewards: list[Any], images: torch.Tensor,
                 prompts: list[str]) -> torch.Tensor:
        """Scores [K, B] (float32) of ``rewards`` (named ``names``) on ``images``."""
        jobs = list(zip(names, rewards, strict=True))
        pool = self._pool(len(jobs))
        if pool is None:
            scores = [self._score_one(name, reward, images, prompts) for name, reward in jobs]
        else:
            futures = [pool.submit(self._score_one, name, reward, images, prompts) for name, reward in jobs]
            concurrent.futures.wait(futures)  # every reward finishes before the first error is raised
            scores = [future.result() for future in futures]
        return torch.stack(scores) if scores else torch.zeros(0, images.shape[0])

    def _score_one(self, name: str, reward: Any, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # `offload`: the reward model visits the policy's device only while it scores.
        with offloaded([reward], self.device, enabled=self.config.reward_device == "offload"):
            try:
                return reward(images, prompts).float()
            except MarbleError as exc:
                raise RewardFailure(str(exc)) from exc
            except Exception as exc:
                raise RewardFailure(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc

    def _pool(self, count: int) -> concurrent.futures.ThreadPoolExecutor | None:
        """Threads for ``count`` rewards (None: score them one after the other in this thread)."""
        workers = min(self.config.reward_threads or count, count)
        if workers <= 1 or self.config.reward_device == "offload":
            return None
        if workers not in self._pools:
            self._pools[workers] = concurrent.futures.ThreadPoolExecutor(workers, "marble-reward")
        return self._pools[workers]


def reward_device(config: TrainConfig, policy: Any) -> torch.device:
    """Where a run keeps its rewards: the policy's device, the CPU (``offload``: they visit the
    policy's device while they score) or the device named."""
    if config.reward_device in ("policy", "offload"):
        return policy.device if config.reward_device == "policy" else torch.device("cpu")
    return torch.device(config.reward_device)


@dataclass
class DrawnRollout:
    """A rollout with the prompts, prompt-set ids and prompt-group ids it was drawn for."""

    rollout: Any
    prompts: list[str]
    set_ids: torch.Tensor
    group_ids: torch.Tensor


@dataclass
class Trainer:
    """Holds the optimizer, balancer, RNG and step counter; ``step()`` runs SPEC §1 once."""

    config: TrainConfig
    components: Components
    dist: Distributed = field(default_factory=Distributed)

    def __post_init__(self) -> None:
        cfg = self.config
        self.policy = self.components.policy
        self.rewards = self.components.rewards
        self.reward_names = self.components.reward_names
        self.balancer = self.components.balancer
        self.params = list(self.policy.trainable_parameters())
        if not self.params:
            raise MarbleError(f"policy {cfg.policy!r} has no trainable parameters")
        self.optimizer = self._build_optimizer()
        # The weight EMA (ema_decay > 0) starts at the initial weights; training never reads it.
        self.ema = WeightEMA(self.params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.timestep_grid = self._timestep_grid() if cfg.timestep_schedule == "grid" else None
        if cfg.prompts_per_step % self.dist.world_size:
            raise MarbleError(f"prompts_per_step {cfg.prompts_per_step} must be divisible by the "
                              f"number of processes ({self.dist.world_size}); groups stay whole on one rank")
        # The same seeds on every rank: each rank draws the global batch and keeps its slice.
        self.sampler = PromptSampler(self.components.prompt_sets, seed=cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.judgement: RowJudgement | None = None  # this step's, for diagnostics
        self._rows, self._passes = 1, 0.0             # training rows and backward passes of the step
        self.phase_hook: Any = None  # called with "gradient_step:start"/":end" (benchmarks)
        self.loss_weights: torch.Tensor | None = None  # reused between periodic solves
        # Per reward: steps in which it took no part in balancing (a metric, checkpointed) and
        # the current streaks behind the one-line warnings (not state: they only warn).
        self.inactive_steps = torch.zeros(len(self.reward_names), dtype=torch.float64)
        self._streaks: dict[str, list[int]] = {"unjudged": [0] * len(self.reward_names),
                                               "indifferent": [0] * len(self.reward_names)}
        self._warned: set[tuple[str, str]] = set()
        # reward_staleness = 1: the rollout the next step trains on, and the recipe to draw it again
        self._pending: DrawnRollout | None = None
        self._pending_recipe: dict[str, Any] | None = None
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor | None] = {}
        self.scoring = RewardScoring(cfg, self.policy.device)  # training's and its evaluations'
        if self.uses_gram and self.gram_mode_for(0) == "affine":
            gram_ops.refuse_cross_sample_ops(self.policy.trainable_module())
        if getattr(self.balancer, "gram_metric", "euclidean") == "adam-momentum" and (
                cfg.gram_rows < 1.0 or cfg.gram == "periodic"):
            # its guarantee needs this step's anchor gradient and fresh λ at the solve
            raise MarbleError(f"balancer metric \"adam-momentum\" balances the step Adam takes now; it needs "
                              f"the whole batch's gradients and a solve every step, not gram_rows="
                              f"{cfg.gram_rows:g} / --gram {cfg.gram}; use --gram affine or exact, gram_rows=1")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; with ``optimizer_sharding = "zero"`` in a multi-process run, wrapped in torch's
        ZeroRedundancyOptimizer: each rank keeps and updates the moments of its share of the
        parameters and broadcasts the updated values (same math, 1/W of the optimizer memory)."""
        cfg = self.config
        options = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.weight_decay}
        if cfg.optimizer_sharding == "zero":
            metric = getattr(self.balancer, "gram_metric", "euclidean")
            if metric != "euclidean":
                raise MarbleError(f"optimizer_sharding=\"zero\" keeps each rank's share of AdamW's moments "
                                  f"only, but balancer metric {metric!r} reads all of them on every rank; "
                                  "use optimizer_sharding=\"none\" or the euclidean metric")
            if self.dist.active:
                from torch.distributed.optim import ZeroRedundancyOptimizer

                return ZeroRedundancyOptimizer(self.params, optimizer_class=torch.optim.AdamW, **options)
        return torch.optim.AdamW(self.params, **options)

    def consolidate(self) -> None:
        """Before :meth:`state_dict` on rank 0, on every rank: gather a sharded optimizer state."""
        if hasattr(self.optimizer, "consolidate_state_dict"):
            self.dist.consolidate_optimizer(self.optimizer)

    # ----------------------------------------------------------------------------- helpers
    @property
    def summed_weights(self) -> torch.Tensor | None:
        return getattr(self.balancer, "summed_reward_weights", None)

    @property
    def uses_gram(self) -> bool:
        return self.summed_weights is None and (self.balancer.needs_gram or self.config.gram != "none")

    def gram_mode_for(self, step: int) -> str:
        """This step's Gram computation: affine / exact, 'reuse' (periodic mode between solves:
        the last loss weights) or 'none' (the balancer needs no Gram and none is asked for)."""
        mode = self.config.gram
        if not self.uses_gram:
            return "none"
        if mode == "periodic":
            solve = solve_period_due(step, self.config.gram_period) or self.loss_weights is None
            return self.config.gram_solver if solve else "reuse"
        return "affine" if mode == "none" else mode  # `none` with a Gram-hungry balancer

    def _clock(self, boundary: str | None = None) -> Any:
        """A time mark for the step timings: on the CPU the wall clock; on a GPU a CUDA event
        recorded on the current stream (no synchronization: the host keeps queueing work and the
        difference of two marks is the GPU time between them, read once the step is done). A
        named ``boundary`` ("gradient_step:start", "gradient_step:end") is reported to
        ``phase_hook`` first (the memory bench resets and reads the GPU's peak there)."""
        if boundary is not None and self.phase_hook is not None:
            self.phase_hook(boundary)
        if self.policy.device.type == "cuda":
            return _DeviceMark(self.policy.device)
        return time.perf_counter()

    def old_decay(self, step: int) -> float:
        """The old-policy decay after 0-based step ``step`` (``old_decay_offset`` 1: the release's
        count of the steps taken, min(rate·(step + 1), max))."""
        return min(self.config.old_decay_rate * (step + self.config.old_decay_offset), self.config.old_decay_max)

    @property
    def clip_threshold(self) -> float:
        """The clip on ‖g‖ of this project's loss: grad_clip of a loss scaled by grad_clip_scale."""
        return self.config.grad_clip / self.config.grad_clip_scale

    def _timestep_grid(self) -> torch.Tensor:
        """``timestep_schedule = "grid"``: the policy's own sampler timesteps t ∈ [0, 1] (float32)."""
        cfg = self.config
        grid_of = getattr(self.policy, "sampling_timesteps", None)
        if grid_of is None:
            raise MarbleError(f"policy {cfg.policy!r} has no sampling_timesteps(steps), which "
                              "timestep_schedule='grid' trains on; use timestep_schedule='uniform'")
        grid = torch.as_tensor(grid_of(cfg.sample_steps), dtype=torch.float32).cpu().reshape(-1)
        if grid.numel() != cfg.sample_steps or not ((grid >= 0) & (grid <= 1)).all():
            raise MarbleError(f"policy {cfg.policy!r}: sampling_timesteps({cfg.sample_steps}) gave "
                              f"{grid.numel()} values, not {cfg.sample_steps} in [0, 1]")
        return grid

    def _draw_timesteps(self, images: int) -> torch.Tensor:
        """t of the global rows, timestep-major ([T·images]): uniform in [min, max], or (grid)
        T distinct timesteps of the sampler's grid per image, a random subset of them (the
        release: a random permutation of its 25 per image, of which it trains the first 24)."""
        cfg, repeats = self.config, self.config.timesteps_per_image
        if self.timestep_grid is None:
            return cfg.timestep_min + (cfg.timestep_max - cfg.timestep_min) * torch.rand(
                images * repeats, generator=self.generator)
        picks = torch.rand(images, self.timestep_grid.numel(), generator=self.generator).argsort(dim=1)
        return self.timestep_grid[picks[:, :repeats]].T.reshape(-1)

    def _score(self, images: torch.Tensor, prompts: list[str], set_ids: torch.Tensor) -> torch.Tensor:
        """R [K, B]: every reward on every image, NaN where its prompt set is not tagged with it
        (:class:`RewardScoring`: ``reward_threads``, ``offload``, a :class:`RewardFailure`)."""
        rewards = self.scoring(self.reward_names, self.rewards, images, prompts)
        mask = applicability_mask(set_ids, self.reward_names, self.components.prompt_sets)
        return torch.where(mask, rewards, torch.full_like(rewards, float("nan")))

    # ------------------------------------------------------------- rollouts (reward_staleness)
    def _rollout(self) -> DrawnRollout:
        """Prompts and noise for the global batch (this rank keeps its slice), sampled with the
        old policy (SPEC §1.1)."""
        cfg = self.config
        world, rank = self.dist.world_size, self.dist.rank
        per_rank = cfg.prompts_per_step // world
        drawn = self.sampler.sample(cfg.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
        prompts = [p for p, _ in drawn for _ in range(cfg.images_per_prompt)]
        set_ids = torch.tensor([s for _, s in drawn for _ in range(cfg.images_per_prompt)])
        group_ids = torch.arange(len(drawn)).repeat_interleave(cfg.images_per_prompt)
        noise = torch.randn(self.policy.latent_shape(len(prompts) * world), generator=self.generator)
        noise = noise[rank * len(prompts):(rank + 1) * len(prompts)]
        with torch.no_grad():
            rollout = self.policy.sample(prompts, generator=self.generator, steps=cfg.sample_steps,
                                         noise=noise)
        return DrawnRollout(rollout, prompts, set_ids, group_ids)

    def _rollout_recipe(self) -> dict[str, Any]:
        """What regenerates the next rollout bit for bit (a checkpoint holds this, not the
        images): the policy's weights, the generator and the sampler as it is drawn."""
        return {"policy": {k: v.detach().clone() for k, v in self.policy.state_dict().items()},
                "generator": self.generator.get_state(), "sampler": self.sampler.state_dict()}

    def _regenerate_pending(self, recipe: dict[str, Any]) -> None:
        """The rollout a checkpoint's recipe describes, drawn again; everything else is left as
        the checkpoint has it (the recipe's draws came before the update's in the run)."""
        live = (self.policy.state_dict(), self.generator.get_state(), self.sampler.state_dict(),
                torch.get_rng_state())
        try:
            self.policy.load_state_dict(recipe["policy"])
            self.generator.set_state(recipe["generator"])
            self.sampler.load_state_dict(recipe["sampler"])
            pending = self._rollout()
            drawn_to = self.sampler.state_dict()
        finally:
            self.policy.load_state_dict(live[0])
            self.generator.set_state(live[1])
            self.sampler.load_state_dict(live[2])
            torch.set_rng_state(live[3])
        if drawn_to != live[2]:
            raise MarbleError("the checkpoint's pending rollout (reward_staleness = 1) does not lead to its "
                              "prompt-sampler state; resume from an earlier checkpoint")
        self._pending, self._pending_recipe = pending, recipe

    def _rollout_and_rewards(self, timings: dict[str, float]) -> tuple[DrawnRollout, torch.Tensor]:
        """This step's rollout and its rewards R [K, B] (SPEC §1.1-1.2).

        ``reward_staleness = 1``: this step trains on the rollout drawn during the last step
        (from the old policy before the last update) and, while its rewards are computed in the
        background, draws the next one from the current old policy. A reward failure puts the
        generator, sampler and pending rollout back where the step found them, so the trainer
        is exactly at its last complete step (and can be checkpointed there)."""
        saved = (self.generator.get_state(), self.sampler.state_dict(), self._pending, self._pending_recipe)
        clock = self._clock()
        drawn = self._pending if self._pending is not None else self._rollout()
        self._pending = self._pending_recipe = None
        timings["time/rollout"] = self._clock() - clock
        try:
            if not self.config.reward_staleness:
                clock = self._clock()
                rewards = self._score(drawn.rollout.images, drawn.prompts, drawn.set_ids)
                timings["time/rewards"] = self._clock() - clock
                return drawn, rewards
            if self._pools.get("background") is None:
                self._pools["background"] = concurrent.futures.ThreadPoolExecutor(1, "marble-scoring")
            future = self._pools["background"].submit(self._score, drawn.rollout.images, drawn.prompts,
                                                      drawn.set_ids)
            clock = self._clock()
            try:
                recipe = self._rollout_recipe()
                upcoming = self._rollout()  # overlaps the rewards
            finally:
                concurrent.futures.wait([future])
                timings["time/rollout"] += self._clock() - clock
            clock = self._clock()
            rewards = future.result()
            timings["time/rewards"] = self._clock() - clock  # what the rollout did not hide
            self._pending, self._pending_recipe = upcoming, recipe
            return drawn, rewards
        except RewardFailure:
            self.generator.set_state(saved[0])
            self.sampler.load_state_dict(saved[1])
            self._pending, self._pending_recipe = saved[2], saved[3]
            raise

    def _judgement(self, adv) -> RowJudgement:
        """Global image-level masks behind every reward's loss (SPEC §1.4, ``reward_scope``)."""
        prefers = adv.valid & (adv.advantages != 0)
        judged = adv.valid if self.config.reward_scope == "judged" else torch.ones_like(adv.valid)
        return RowJudgement(judged, prefers, self.config.timesteps_per_image)

    def _fold_timesteps(self, rollout, r: torch.Tensor, judgement: RowJudgement) -> TrainBatch:
        """T noisy versions x_t = (1−t)·x0 + t·ε of every image (SPEC §1.4)."""
        cfg = self.config
        batch, world, rank = rollout.x0.shape[0], self.dist.world_size, self.dist.rank
        repeats = cfg.timesteps_per_image
        rows = torch.arange(batch).repeat(repeats)
        # t and ε for the global rows (timestep-major, like a single process), then this rank's.
        global_rows = (torch.arange(repeats).repeat_interleave(batch) * batch * world
                       + rank * batch + torch.arange(batch).repeat(repeats))
        t = self._draw_timesteps(batch * world)
        noise = torch.randn((batch * world * repeats, *rollout.x0.shape[1:]), generator=self.generator)
        t, noise = t[global_rows], noise[global_rows]
        x0 = rollout.x0[rows].to(self.policy.device)
        t, noise = t.to(self.policy.device), noise.to(self.policy.device)
        t_b = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - t_b) * x0 + t_b * noise.to(x0.dtype)
        cond = rollout.cond.index(rows)
        v_old, v_ref = [], []
        for sl in self._micro_slices(x0.shape[0]):
            c = cond.index(torch.arange(sl.start, sl.stop))
            v_old.append(self.policy.old_velocity(x_t[sl], t[sl], c))
            if cfg.kl > 0:
                v_ref.append(self.policy.ref_velocity(x_t[sl], t[sl], c))
        images = rows + rank * batch
        coef = reward_row_coefficients(judgement.judged[:, images], judgement.counts(), scale=world)
        return TrainBatch(x0, x_t, t, cond, r[:, rows].to(self.policy.device), torch.cat(v_old),
                          torch.cat(v_ref) if v_ref else None, images, coef.to(self.policy.device),
                          judgement.candidates())

    def _gram_rows(self, batch: TrainBatch, judgement: RowJudgement, groups: int, fraction: float | None = None,
                   generator: torch.Generator | None = None) -> TrainBatch:
        """The rows the per-reward gradients come from when ``gram_rows`` = f < 1: in every prompt
        group (G images × T timesteps) max(1, round(f·G·T)) rows at random, drawn for the global
        batch on every rank (so the loss coefficients count the subset of all ranks); each rank
        keeps the rows of its own groups. A reward that judges a group keeps a row there."""
        cfg, world, rank = self.config, self.dist.world_size, self.dist.rank
        per_group = cfg.images_per_prompt * cfg.timesteps_per_image
        fraction = cfg.gram_rows if fraction is None else fraction
        keep = max(1, round(fraction * per_group))
        choice = torch.rand(groups, per_group, generator=generator or self.generator).argsort(dim=1)[:, :keep]
        # Group g's rows, timestep-major: timestep j of its image i is global image g·G + i.
        timestep, image = choice // cfg.images_per_prompt, choice % cfg.images_per_prompt
        global_images = (torch.arange(groups).view(-1, 1) * cfg.images_per_prompt + image).reshape(-1)
        timestep = timestep.reshape(-1)
        coef_counts = judgement.judged[:, global_images].sum(1)
        candidates = judgement.candidates(global_images)
        local_batch = batch.x0.shape[0] // cfg.timesteps_per_image
        mine = (global_images >= rank * local_batch) & (global_images < (rank + 1) * local_batch)
        local_rows = (timestep[mine] * local_batch + global_images[mine] - rank * local_batch).sort().values
        coef = reward_row_coefficients(judgement.judged[:, batch.images[local_rows]], coef_counts, scale=world)
        sample = batch.select(local_rows, coef.to(batch.coef.device), candidates)
        sample.rows, sample.counts = local_rows, coef_counts
        return sample

    def _micro_slices(self, n: int) -> list[slice]:
        size = self.config.micro_batch or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _loss_per_row(self, v, batch: TrainBatch, sl: slice, r_row: torch.Tensor) -> torch.Tensor:
        loss_fn = nft_loss_per_sample if self.config.loss_space == "x0" else velocity_loss_per_sample
        return loss_fn(v, batch.v_old[sl], batch.x_t[sl], batch.x0[sl], batch.t[sl], r_row,
                       self.config.beta)

    def _forward(self, batch: TrainBatch, sl: slice, copies: int = 1):
        """v_θ of the rows ``sl`` (repeated ``copies`` times: the stacked `affine` passes)."""
        rows = torch.arange(sl.start, sl.stop)
        x_t, t = batch.x_t[sl], batch.t[sl]
        if copies > 1:
            rows, t = rows.repeat(copies), t.repeat(copies)
            x_t = x_t.repeat(copies, *([1] * (x_t.ndim - 1)))
        with torch.profiler.record_function("marble::forward"):
            return self.policy.velocity(x_t, t, batch.cond.index(rows))

    def _anchor(self, v, batch: TrainBatch, sl: slice, n: int) -> torch.Tensor:
        if batch.v_ref is None:
            return v.sum() * 0.0
        return self.config.kl * anchor_loss(v, batch.v_ref[sl], num_samples=n)

    # ---------------------------------------------------------------- gradients of the step
    def _affine_gradients(self, batch: TrainBatch, anchor: bool = True, anchor_rows: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-reward gradients [K, P] from two backward passes, plus the anchor gradient [P]
        from a third (when there is an anchor and ``anchor`` is asked for; its mean is over
        ``anchor_rows`` rows, these rows' count unless given)."""
        n = batch.x0.shape[0] if anchor_rows is None else anchor_rows

        with_anchor = anchor and batch.v_ref is not None
        stacked = self.config.gram_backward == "stacked"
        copies = 2 + with_anchor if stacked else 1

        def micro_batch(sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            # The capture stays on through the backward passes: a checkpointed forward is replayed there.
            with gram_ops.LoraCapture(self.policy.trainable_module(), self.params) as capture:
                output = self._forward(batch, sl, copies)
                v = output[:sl.stop - sl.start] if stacked else output
                # ∂ℓ_k(i)/∂v_i = U_i + r_k(i)·W_i per row; L_k weighs row i by coef_ki (SPEC §1.5).
                if self.config.loss_space == "x0":
                    U, W = nft_cotangents(v, batch.v_old[sl], batch.x_t[sl], batch.x0[sl], batch.t[sl],
                                          self.config.beta, num_samples=1)
                else:
                    U, W = affine_cotangents_autograd(
                        lambda out, r: self._loss_per_row(out, batch, sl, r).sum(), v)
                coef = batch.coef[:, sl]
                extra = (self.config.kl * anchor_cotangent(v, batch.v_ref[sl], num_samples=n)
                         if with_anchor else None)
                self._count_passes(2 + (extra is not None), sl)
                gradients = (gram_ops.per_reward_gradients_affine_stacked if stacked
                             else gram_ops.per_reward_gradients_affine)
                return gradients(output, U, W, coef, coef * batch.r[:, sl].double(), capture, extra=extra)

        return self._sum_over_micro_batches(batch.x0.shape[0], micro_batch)

    def _exact_gradients(self, batch: TrainBatch, anchor: bool = True, anchor_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-reward gradients by one backward pass per reward (the reference), plus one for
        the anchor when there is one (kl > 0) and ``anchor`` is asked for (a mean over
        ``anchor_rows`` rows, these rows' count unless given)."""
        n = batch.x0.shape[0] if anchor_rows is None else anchor_rows
        num_rewards = batch.r.shape[0]
        with_anchor = anchor and batch.v_ref is not None

        def micro_batch(sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            v = self._forward(batch, sl)
            losses = []
            for k in range(num_rewards):
                coef = batch.coef[k, sl]
                # L_k over the rows reward k judges; a reward judging none of them has no pass.
                losses.append((coef.to(v.dtype) * self._loss_per_row(v, batch, sl, batch.r[k, sl])).sum()
                              if coef.any() else torch.zeros((), device=v.device))
            if with_anchor:
                losses.append(self._anchor(v, batch, sl, n))
            self._count_passes(sum(loss.requires_grad for loss in losses), sl)
            g = gram_ops.per_reward_gradients_exact(losses, self.params)
            return g[:num_rewards], (g[-1] if with_anchor else None)

        return self._sum_over_micro_batches(batch.x0.shape[0], micro_batch)

    def _sum_over_micro_batches(self, n: int, micro_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over micro-batches of (per-reward gradients [K, P], anchor gradient [P] or None);
        the anchor gradient is zero when there is no anchor."""
        grads = anchor = None
        for sl in self._micro_slices(n):
            g, a = micro_batch(sl)
            grads = g if grads is None else grads + g
            if a is not None:
                anchor = a if anchor is None else anchor + a
        if anchor is None:
            anchor = torch.zeros(grads.shape[1], dtype=grads.dtype, device=grads.device)
        return grads, anchor

    def _fused_backward(self, batch: TrainBatch, weights: torch.Tensor, anchor_rows: int | None = None) -> None:
        """One backward pass on Σ_k w_k·L_k + anchor = Σ_i c_i·ℓ(i; r_eff(i)) + anchor (SPEC §1.5);
        the anchor's mean is over ``anchor_rows`` rows (these rows' count unless given)."""
        n = batch.x0.shape[0] if anchor_rows is None else anchor_rows
        c, r_eff = fused_row_weights(weights, batch.coef, batch.r)
        for sl in self._micro_slices(batch.x0.shape[0]):
            v = self._forward(batch, sl)
            policy = (c[sl].to(v.dtype) * self._loss_per_row(v, batch, sl, r_eff[sl].to(v.dtype))).sum()
            self._count_passes(1, sl)
            with torch.profiler.record_function("marble::backward"):
                (policy + self._anchor(v, batch, sl, n)).backward()

    def _fused_from_sample(self, batch: TrainBatch, sample: TrainBatch, weights: torch.Tensor,
                           grads: torch.Tensor, anchor: torch.Tensor) -> None:
        """The fused gradient of every row (what :meth:`_fused_backward` of ``batch`` gives)
        without recomputing the sampled rows (gram_rows < 1). Their part is a combination of
        the Gram's gradients: reward k's coefficients there are m_ki/n_k^S, in the whole batch
        m_ki/n_k, so it is Σ_k w_k·(n_k^S/n_k)·g_k^S, plus their anchor (``anchor``, a mean
        over all rows); only the other rows take a forward and a backward pass."""
        rest = torch.ones(batch.x0.shape[0], dtype=torch.bool)
        rest[sample.rows] = False
        rest = rest.nonzero().flatten()  # (host-side indices: no device read)
        if rest.numel():
            self._fused_backward(batch.select(rest, batch.coef[:, rest.to(batch.coef.device)], batch.candidates),
                                 weights, anchor_rows=batch.x0.shape[0])
        self.dist.all_reduce_mean_grads(self.params)
        full = self.judgement.counts().to(torch.float64).cpu()  # (host tensors: no device read)
        share = torch.where(full > 0, sample.counts.to(torch.float64).cpu() / full.clamp_min(1.0),
                            torch.zeros_like(full))
        combined = weights.to(torch.float64).cpu() * share
        keep = combined != 0  # (an unweighted reward's gradient may be non-finite)
        part = combined[keep].to(grads) @ grads[keep]
        gram_ops.write_flat_grad(self.params, part + anchor, accumulate=True)

    def _count_passes(self, count: int, rows: slice) -> None:
        """Backward passes of this step, in whole-batch units (a micro-batch counts its share)."""
        self._passes += count * (rows.stop - rows.start) / self._rows

    def _active(self, candidates: torch.Tensor, grads: torch.Tensor,
                gram: torch.Tensor | None = None) -> torch.Tensor:
        """[K] bool: rewards that take part in balancing — a preference in the rows the gradients
        came from, a finite gradient, and one above round-off of the largest (SPEC §1.4). The
        norms are √G_kk of the float64 Gram (``gram``, else computed here); one device read."""
        gram = gram_ops.gram_matrix(grads) if gram is None else gram
        finite = torch.isfinite(grads).all(dim=1)
        norms = torch.where(finite, torch.diagonal(gram).clamp_min(0.0).sqrt(),
                            torch.zeros((), dtype=torch.float64, device=grads.device))
        norms, finite = torch.stack([norms, finite.double()]).cpu()
        finite = finite.bool()
        # Round-off scales with the gradients computed alongside, whether or not they are balanced.
        largest = float(norms[finite].max()) if finite.any() else 0.0
        dtype = getattr(self.policy, "autocast_dtype", None) or self.params[0].dtype
        return candidates.cpu() & finite & (norms > numerical_zero_ratio(dtype) * largest) & (norms > 0)

    def _solve_gram(self, gram: torch.Tensor, grads: torch.Tensor, anchor: torch.Tensor,
                    active: torch.Tensor) -> torch.Tensor:
        """The Gram the balancer solves on: euclidean, in Adam's metric, or of the momentum-shifted
        gradients (with the anchor, AdamW's decay and this step's clip factor, which is found
        together with the λ it depends on: SPEC §2, :func:`marble_kit.gram.metric_gram`)."""
        metric = getattr(self.balancer, "gram_metric", "euclidean")
        if metric != "adam-momentum":
            return gram if metric == "euclidean" else gram_ops.metric_gram(grads, self.optimizer, self.params, metric)
        parts = gram_ops.adam_momentum_parts(grads, self.optimizer, self.params, anchor=anchor)
        scale = 1.0
        if self.config.grad_clip > 0:
            solver, mask = MinNormQP(), active.cpu().numpy()
            scale = gram_ops.consistent_clip_scale(
                parts, self.clip_threshold,
                lambda e: torch.as_tensor(solver.solve(e.cpu().numpy(), active=mask).lam))
        return parts.gram(scale)

    def _balance(self, gram: torch.Tensor, step: int, active: torch.Tensor) -> torch.Tensor:
        return balance_weights(self.balancer, gram, step, active)

    # ------------------------------------------------------------------------------- step
    def step(self) -> dict[str, Any]:
        cfg, step = self.config, self.step_count
        timings: dict[str, float] = {}

        # 1. Rollout: G images per prompt from the old policy (SPEC §1.1). Prompts and noise are
        #    drawn for the global batch on every rank, each rank keeps its slice: the same config
        #    gives the same math on any number of processes.
        # 2. Rewards R [K, B], NaN where a reward does not judge a sample (SPEC §1.2); with
        #    reward_staleness = 1 computed while the next step's rollout is drawn.
        drawn, rewards = self._rollout_and_rewards(timings)
        rollout, group_ids = drawn.rollout, drawn.group_ids
        clock = self._clock()

        # 3. Per-reward advantages → reward probabilities r [K, B] (SPEC §1.3).
        gathered, gathered_groups = self.dist.gather_rewards(rewards, group_ids)
        judged = summed_rewards(gathered, self.summed_weights) if self.summed_weights is not None else gathered
        adv = group_advantages(judged, gathered_groups, std_scope=cfg.adv_std, clip=cfg.adv_clip)
        r = self.dist.local_rows(adv.probabilities)
        judgement = self.judgement = self._judgement(adv)

        # 4. Training rows: T timesteps per image, old and reference velocities, and each
        #    reward's loss over the rows it judges (SPEC §1.4).
        batch = self._fold_timesteps(rollout, r, judgement)
        self._rows, self._passes = batch.x0.shape[0], 0.0
        gradient_clock = self._clock("gradient_step:start")  # time/gradient_step: gradients, balancing, optimizer

        # 5-7. Per-reward gradients, Gram, balancer, one fused update (SPEC §1.5-1.7).
        self.optimizer.zero_grad(set_to_none=True)
        mode = self.gram_mode_for(step)
        metrics: dict[str, Any] = {}
        active = None
        if mode in ("affine", "exact"):
            # gram_rows < 1: the gradients of a per-group sample of the rows; the update is then
            # theirs combined with the fresh weights plus one backward over the other rows.
            sampled = cfg.gram_rows < 1.0
            gram_batch = self._gram_rows(batch, judgement, cfg.prompts_per_step) if sampled else batch
            gradients = self._affine_gradients if mode == "affine" else self._exact_gradients
            # (sampled: the sampled rows' anchor, a mean over all rows, for the fused gradient)
            grads, anchor = gradients(gram_batch, anchor_rows=batch.x0.shape[0] if sampled else None)
            # Global gradients: reduce the K gradient vectors, not per-rank Grams (SPEC §1.6).
            grads, anchor = self.dist.all_reduce_mean(grads), self.dist.all_reduce_mean(anchor)
            gram = gram_ops.gram_matrix(grads)
            active = self._active(gram_batch.candidates, grads, gram)
            # (sampled: the anchor of all rows is not known yet; the momentum metric solves without it)
            solve_anchor = torch.zeros_like(anchor) if sampled else anchor
            weights = self._balance(self._solve_gram(gram, grads, solve_anchor, active), step, active)
            # Every rank solved the same QP; rank 0's answer makes λ bitwise equal everywhere.
            weights = self.dist.broadcast_from_main(weights)
            if sampled:  # the sampled rows' part from their gradients, one pass over the others
                self._fused_from_sample(batch, gram_batch, weights, grads, anchor)
            else:  # the fused gradient is Σ w_k g_k of the same two passes: no third backward
                keep = active.cpu()  # (a host mask indexes without a device read)
                fused = weights[keep].to(grads) @ grads[keep]
                gram_ops.write_flat_grad(self.params, fused + anchor, copy=False)
            metrics.update(self._gradient_diagnostics(gram, weights, active))
        else:
            grads = None
            if self.summed_weights is not None:
                weights = torch.ones(1, dtype=torch.float64)  # one advantage of the summed reward
            elif mode == "reuse":  # the last solve's weights, over the rewards active now
                active = batch.candidates.cpu()
                weights = torch.where(active, self.loss_weights, torch.zeros_like(self.loss_weights))
            else:
                weights = self.balancer.weights(None, step)
            self._fused_backward(batch, weights)
            self.dist.all_reduce_mean_grads(self.params)
        weights = weights.detach().cpu().double()
        if mode != "reuse":  # periodic mode reuses the weights of its last solve
            self.loss_weights = weights

        before = _flat(self.params) if grads is not None else None
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, self.clip_threshold) if cfg.grad_clip > 0
                     else torch.sqrt(sum(p.grad.pow(2).sum() for p in self.params if p.grad is not None)))
        self.optimizer.step()
        timings["time/gradient_step"] = self._clock("gradient_step:end") - gradient_clock
        if before is not None:
            delta = _flat(self.params) - before
            cos_update = gram_ops.update_cosines(grads, -delta.to(grads))
            for name, value in zip(self.reward_names, cos_update.tolist()):
                metrics[f"cos_update/{name}"] = value
            metrics["cos_update/worst"] = _worst(cos_update, active)

        # Old policy ← EMA of the trainable weights; the evaluation EMA (its own) follows too.
        self.policy.update_old(self.old_decay(step))
        if self.ema is not None:
            metrics["ema_decay"] = self.ema.update(step + 1)
        timings["time/update"] = self._clock() - clock

        # 8. Diagnostics (SPEC §1.8).
        self.step_count += 1
        metrics.update({"step": self.step_count, "gram_mode": mode, "grad_norm": float(grad_norm),
                        "backward_passes": self._passes})
        metrics.update(reward_statistics(gathered, self.reward_names))
        lam = getattr(self.balancer, "lam", None)
        names = self.reward_names if self.summed_weights is None else ["summed"]
        for k, name in enumerate(names):
            metrics[f"weight/{name}"] = float(weights[k]) if k < len(weights) else float("nan")
            if lam is not None and k < len(lam):
                metrics[f"lambda/{name}"] = float(lam[k])
            valid = adv.valid[k]
            metrics[f"adv_abs/{name}"] = float(adv.advantages[k][valid].abs().mean()) if valid.any() else 0.0
            metrics[f"judged_rows/{name}"] = float(judgement.counts()[k])
        if active is not None:
            metrics.update(self._activity(active, judgement))
        if mode != "reuse":  # between periodic solves the balancer did not run: no stale metrics
            metrics.update({key: float(v) for key, v in getattr(self.balancer, "metrics", {}).items()})
        metrics.update({key: float(value) for key, value in timings.items()})  # (GPU: waits for the step)
        return metrics

    def _activity(self, active: torch.Tensor, judgement: RowJudgement) -> dict[str, float]:
        """Per-reward `active/…` and cumulative `inactive_steps/…` metrics; a one-line warning
        once a reward has judged, or preferred, nothing for INACTIVE_WARN_STEPS steps in a row."""
        counts, candidates = judgement.counts(), judgement.candidates()
        out = {}
        for k, name in enumerate(self.reward_names):
            out[f"active/{name}"] = float(active[k])
            self.inactive_steps[k] += float(not active[k])
            out[f"inactive_steps/{name}"] = float(self.inactive_steps[k])
            for kind, idle in (("unjudged", counts[k] == 0), ("indifferent", counts[k] > 0 and not candidates[k])):
                streak = self._streaks[kind]
                streak[k] = streak[k] + 1 if idle else 0
                if streak[k] >= INACTIVE_WARN_STEPS and (kind, name) not in self._warned:
                    self._warned.add((kind, name))
                    why = ("judged no sample" if kind == "unjudged" else
                           "scored the images of every prompt group equally (all advantages 0)")
                    warnings.warn(f"reward {name!r} {why} in the last {INACTIVE_WARN_STEPS} steps; it takes no "
                                  "part in balancing (λ = 0) while so", RuntimeWarning, stacklevel=2)
        return out

    def _gradient_diagnostics(self, gram: torch.Tensor, weights: torch.Tensor,
                              active: torch.Tensor) -> dict[str, float]:
        diag = gram_ops.cosine_diagnostics(gram, weights)
        out = {f"cos/{name}": float(c) for name, c in zip(self.reward_names, diag["cos"].tolist())}
        out["cos/worst"] = _worst(diag["cos"], active)  # the paper's worst-aligned reward, among the active
        out.update({f"grad_norm/{name}": math.sqrt(max(float(gram[k, k]), 0.0))
                    for k, name in enumerate(self.reward_names)})
        return out

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "loss_weights": self.loss_weights,
            "inactive_steps": self.inactive_steps.clone(),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
            **({"pending_rollout": self._pending_recipe} if self._pending_recipe is not None else {}),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.policy.load_state_dict(state["policy"])
        # ZeroRedundancyOptimizer.load_state_dict blanks the other ranks' entries of the dict it
        # is given: hand it a copy. (Its consolidated state is AdamW's, so either loads the other.)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.balancer.load_state_dict(state["balancer"])
        self.loss_weights = state["loss_weights"]
        if "inactive_steps" in state:  # checkpoints before per-reward activity start at 0
            self.inactive_steps = torch.as_tensor(state["inactive_steps"], dtype=torch.float64).clone()
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        if self.ema is not None:
            if "ema" not in state:
                raise MarbleError("the checkpoint holds no weight EMA, but ema_decay > 0; resume with the "
                                  "run's own config")
            self.ema.load_state_dict(state["ema"])
        self._pending = self._pending_recipe = None
        if "pending_rollout" in state:  # reward_staleness = 1: the rollout the next step trains on
            self._regenerate_pending(state["pending_rollout"])

    def eval_weights(self):
        """The weights evaluation and sample grids use: the EMA's when ema_decay > 0 (a context)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


def _worst(cosines: torch.Tensor, active: torch.Tensor | None) -> float:
    """The smallest cosine among the active rewards (NaN when none is active)."""
    values = cosines if active is None else cosines[active.to(cosines.device)]
    return float(values.min()) if values.numel() else float("nan")


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters' values as one flat vector (one copy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


class _DeviceMark:
    """A CUDA event on the current stream; ``later - earlier`` is an :class:`_Elapsed`."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record(torch.cuda.current_stream(device))

    def __sub__(self, earlier: _DeviceMark) -> _Elapsed:
        return _Elapsed(earlier.event, self.event)


class _Elapsed:
    """GPU seconds between recorded events (a sum of such intervals after ``+``); ``float()``
    waits for the last event."""

    def __init__(self, start: Any, end: Any):
        self.intervals = [(start, end)]

    def __add__(self, other: _Elapsed) -> _Elapsed:
        total = _Elapsed(*self.intervals[0])
        total.intervals = self.intervals + other.intervals
        return total

    def __float__(self) -> float:
        seconds = 0.0
        for start, end in self.intervals:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000.0
        return seconds
