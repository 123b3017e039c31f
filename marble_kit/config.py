"""Run configuration: a flat dataclass whose every field has a default and a help string.

Loaded from TOML (``marble train --config run.toml``), overridden by CLI flags, validated in
``__post_init__`` and saved (resolved) into the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from marble_kit.errors import MarbleError

GRAM_MODES = ("affine", "exact", "periodic", "none")
GRAM_BACKWARDS = ("separate", "stacked")
LOSS_SPACES = ("x0", "velocity")
REWARD_SCOPES = ("judged", "all")
DEFAULT_REWARDS = ["color", "shape", "centering"]
TRACKERS = ("tensorboard", "wandb")  # report_to choices (marble_kit.tracking)
TIMESTEP_SCHEDULES = ("uniform", "grid")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # components
    policy: str = _f("tiny-sd3", "Policy plugin (`marble plugins` lists them).")
    policy_options: dict = _f({}, "Options for the policy factory.")
    rewards: list = _f(DEFAULT_REWARDS, "Reward plugins, one advantage estimator each.")
    reward_options: dict = _f({}, "Per-reward factory options: {name: {option: value}}.")
    balancer: str = _f("marble", "Balancer plugin: weighted-sum, mgda-qp, marble, ...")
    balancer_options: dict = _f({}, "Options for the balancer factory.")
    prompts: list = _f(["default"], "Prompt sets: built-in names, .txt/.jsonl files or a .toml "
                       "manifest; `FILE:reward1+reward2` tags the rewards that judge a set.")
    # run
    out: str = _f("runs/marble", "Run directory.")
    seed: int = _f(0, "Seed of everything (prompt order, noise, timesteps, LoRA init).")
    steps: int = _f(150, "Optimizer steps.")
    prompts_per_step: int = _f(4, "P: prompts per step.")
    images_per_prompt: int = _f(4, "G: images per prompt (a group for the advantages).")
    sample_steps: int = _f(8, "Sampler steps of each rollout.")
    timesteps_per_image: int = _f(4, "Training timesteps drawn per image (folded into the batch).")
    micro_batch: int = _f(0, "Rows per forward/backward pass (0 = the whole batch at once).")
    # DiffusionNFT
    beta: float = _f(1.0, "NFT strength β (DiffusionNFT: 1.0 single reward, 0.1 multi-reward on SD3.5; "
                      "1.0 measured best on tiny-sd3, docs/user-guide.md).")
    kl: float = _f(3e-2, "Weight of the reference anchor mean‖v_θ − v_ref‖² (not balanced; 3e-2 "
                    "measured on tiny-sd3, docs/world.md; SD3.5 configs use ~1e-4).")
    loss_space: str = _f("x0", "NFT loss in x0 space (DiffusionNFT) or velocity space.")
    adv_clip: float = _f(5.0, "A_max: advantages are clipped to ±A_max.")
    adv_std: str = _f("group", "Advantage std per prompt group ('group', flow_grpo's default; a global "
                      "reward judging unlike prompt sets needs it, docs/world.md) or over the whole "
                      "batch ('global', the DiffusionNFT release; sd35-marble pins it).")
    timestep_schedule: str = _f("uniform", "Training timesteps: 'uniform' (t ~ U[timestep_min, timestep_max]) "
                                "or 'grid' (the sampler's own sample_steps timesteps, timesteps_per_image "
                                "distinct ones per image at random: the release trains 24 of its 25).")
    timestep_min: float = _f(0.02, "Smallest training t (t ~ U[min, max]).")
    timestep_max: float = _f(0.98, "Largest training t.")
    old_decay_rate: float = _f(0.02, "Old-policy EMA decay = min(rate·(step + old_decay_offset), old_decay_max).")
    old_decay_max: float = _f(0.5, "Cap of the old-policy EMA decay.")
    old_decay_offset: int = _f(0, "Added to the 0-based step in the old-policy decay (the release counts "
                               "the step just taken: 1).")
    # optimizer
    lr: float = _f(5e-3, "AdamW learning rate (tiny-sd3; 3e-4 for SD3.5 Medium).")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW β1.")
    adam_beta2: float = _f(0.999, "AdamW β2.")
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 = off).")
    grad_clip_scale: float = _f(1.0, "Loss scale grad_clip refers to: the gradient is clipped where "
                                "grad_clip_scale·‖g‖ > grad_clip (the release multiplies its loss by "
                                "adv_clip_max = 5 and clips at 1.0: 5).")
    ema_decay: float = _f(0.0, "EMA of the trainable weights for evaluation, sample grids and the saved "
                          "ema_adapter: decay min((1+n)/(10+n), ema_decay) after step n (0 = off; the "
                          "release: 0.9). Training itself never reads it.")
    optimizer_sharding: str = _f("none", "'zero': shard AdamW's moments across ranks (ZeRO-1, torch's "
                                 "ZeroRedundancyOptimizer) in multi-process runs; 'none': every rank "
                                 "holds them all.")
    # balancing
    gram: str = _f("affine", "Gram mode: affine (2 backward passes, exact), exact (K+1), "
                   "periodic (solve every gram_period steps), none.")
    gram_period: int = _f(10, "Solve interval n of the periodic mode.")
    gram_solver: str = _f("affine", "How the periodic mode computes the Gram on solve steps.")
    gram_rows: float = _f(1.0, "Fraction f of the training rows the per-reward gradients (and the Gram) "
                          "come from, drawn per prompt group; below 1 the update is one more backward "
                          "over all rows with the fresh weights (≈ 1 + 2f passes instead of 2).")
    gram_backward: str = _f("separate", "How the `affine` Gram's backward passes run: 'separate' (one "
                            "per cotangent: U, W and the anchor's) or 'stacked' (the rows repeated 2-3× "
                            "in one forward, ONE backward: fewer kernel launches, 2-3× the activations).")
    reward_scope: str = _f("judged", "Rows each reward's loss averages over: 'judged' (the rows it "
                           "judges, SPEC §1.4) or 'all' (every row; unjudged rows enter with r = 0.5).")
    # outputs
    log_every: int = _f(1, "Metrics line every N steps.")
    checkpoint_every: int = _f(50, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "Keep the last N checkpoints.")
    sample_every: int = _f(50, "Sample grid every N steps (0 = off).")
    eval_every: int = _f(0, "Held-out evaluation every N steps, at step 0 and at the last step (0 = off): "
                         "eval/* metrics, RUN/eval/step-N/eval.json, checkpoints/best by the composite.")
    eval_prompts: list = _f([], "Prompt sets of the held-out evaluation (default: world_eval for the "
                            "default world, else the run's prompt sets), as `prompts`.")
    eval_sample_steps: int = _f(0, "Sampler steps of the evaluation (0 = sample_steps; the release: 40).")
    eval_images_per_prompt: int = _f(4, "Images per held-out prompt (the same noise at every evaluation).")
    eval_max_prompts: int = _f(32, "At most this many held-out prompts, round-robin over the sets (0 = all).")
    eval_rewards: list = _f([], "Rewards that are scored in the evaluation but never trained (not in "
                            "advantages, the QP or λ): a trained reward's hacking shows in them.")
    threads: int = _f(0, "torch threads (0 = leave torch's default).")
    reward_device: str = _f("policy", "Where rewards run: 'policy' (the policy's device), "
                            "'offload' (kept on the CPU, moved to the policy's device only while "
                            "scoring: saves GPU memory between rollouts) or a torch device such as 'cpu'.")
    reward_threads: int = _f(0, "Threads that score the K rewards at once (0 = one per reward, 1 = one after "
                             "the other); the scores are bitwise the same either way.")
    reward_staleness: int = _f(0, "1 = compute step s's rewards while step s+1's rollout is drawn: the update "
                               "then trains on samples of the old policy one step older (one step of "
                               "staleness; docs/reward-services.md). 0 = off (default).")
    report_to: list = _f([], "Experiment trackers that also get every metrics line and sample grid: "
                         "tensorboard (event files in RUN/tensorboard), wandb (RUN/wandb; "
                         "WANDB_MODE=offline needs no network); [] or 'none' = off.")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> MarbleError:
            return MarbleError(f"config: {name} {why}")

        if isinstance(self.rewards, str):
            self.rewards = [n.strip() for n in self.rewards.split(",") if n.strip()]
        if isinstance(self.report_to, str):
            self.report_to = [n.strip() for n in self.report_to.split(",")]
        self.report_to = list(dict.fromkeys(n for n in self.report_to if n not in ("", "none")))
        unknown = [n for n in self.report_to if n not in TRACKERS]
        if unknown:
            raise bad("report_to", f"names an unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} "
                      "(comma-separated) or none")
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if isinstance(self.eval_prompts, str):
            self.eval_prompts = [self.eval_prompts]
        if isinstance(self.eval_rewards, str):
            self.eval_rewards = [n.strip() for n in self.eval_rewards.split(",") if n.strip()]
        if not self.rewards:
            raise bad("rewards", "is empty; name at least one reward (e.g. --rewards brightness)")
        if len(set(self.rewards)) != len(self.rewards):
            raise bad("rewards", f"lists a reward twice: {self.rewards}")
        if len(set(self.eval_rewards)) != len(self.eval_rewards) or set(self.eval_rewards) & set(self.rewards):
            raise bad("eval_rewards", f"{self.eval_rewards} must name each reward once and none that is trained "
                      f"({','.join(self.rewards)}); every trained reward is evaluated anyway")
        for name in ("steps", "prompts_per_step", "images_per_prompt", "sample_steps",
                     "timesteps_per_image", "gram_period", "eval_images_per_prompt"):
            if int(getattr(self, name)) < 1:
                raise bad(name, f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_sample_steps", "eval_max_prompts", "old_decay_offset"):
            if int(getattr(self, name)) < 0:
                raise bad(name, f"must be ≥ 0, got {getattr(self, name)}")
        if self.timestep_schedule not in TIMESTEP_SCHEDULES:
            raise bad("timestep_schedule", f"must be one of {', '.join(TIMESTEP_SCHEDULES)}, "
                      f"got {self.timestep_schedule!r}")
        if self.timestep_schedule == "grid" and self.timesteps_per_image > self.sample_steps:
            raise bad("timesteps_per_image", f"({self.timesteps_per_image}) exceeds the sampler's "
                      f"{self.sample_steps} timesteps of timestep_schedule='grid'; draw at most sample_steps")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise bad("ema_decay", f"must be in [0, 1) (0 = off, the release: 0.9), got {self.ema_decay}")
        if not float(self.grad_clip_scale) > 0:
            raise bad("grad_clip_scale", f"must be > 0, got {self.grad_clip_scale}")
        if self.gram not in GRAM_MODES:
            raise bad("gram", f"must be one of {', '.join(GRAM_MODES)}, got {self.gram!r}")
        if self.reward_threads < 0:
            raise bad("reward_threads", f"must be ≥ 0 (0 = one thread per reward), got {self.reward_threads}")
        if self.reward_staleness not in (0, 1):
            raise bad("reward_staleness", f"must be 0 (off) or 1 (one step), got {self.reward_staleness}")
        if self.optimizer_sharding not in ("none", "zero"):
            raise bad("optimizer_sharding", f"must be none or zero, got {self.optimizer_sharding!r}")
        if self.gram_solver not in ("affine", "exact"):
            raise bad("gram_solver", f"must be affine or exact, got {self.gram_solver!r}")
        if not 0.0 < float(self.gram_rows) <= 1.0:
            raise bad("gram_rows", f"must be in (0, 1], got {self.gram_rows}")
        if self.gram_backward not in GRAM_BACKWARDS:
            raise bad("gram_backward", f"must be one of {', '.join(GRAM_BACKWARDS)}, got {self.gram_backward!r}")
        if self.reward_scope not in REWARD_SCOPES:
            raise bad("reward_scope", f"must be one of {', '.join(REWARD_SCOPES)}, got {self.reward_scope!r}")
        if self.loss_space not in LOSS_SPACES:
            raise bad("loss_space", f"must be one of {', '.join(LOSS_SPACES)}")
        if self.adv_std not in ("global", "group"):
            raise bad("adv_std", f"must be global or group, got {self.adv_std!r}")
        if not 0 < self.beta:
            raise bad("beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.timestep_min < self.timestep_max <= 1:
            raise bad("timestep_min/timestep_max", "must satisfy 0 ≤ min < max ≤ 1")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        for name in ("policy_options", "reward_options", "balancer_options"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be a table of options")

    # --- TOML -----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MarbleError(f"{source}: unknown key {unknown[0]!r}{hint}; valid keys: "
                              f"{', '.join(sorted(known))}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in data.items():
            expected = {"int": int, "float": (int, float), "str": str, "list": list, "dict": dict}[types[key]]
            if types[key] == "list" and isinstance(value, str):
                continue
            if isinstance(value, bool) or not isinstance(value, expected):
                raise MarbleError(f"{source}: key {key!r} must be {types[key]}, got {value!r}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_toml(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def builtin_config_dir() -> Path:
    """Where the shipped run configurations live (``marble train --config NAME``)."""
    from importlib import resources

    return Path(str(resources.files("marble_kit").joinpath("data", "configs")))


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in builtin_config_dir().glob("*.toml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A TOML file given by path, or a shipped configuration by name (e.g. ``sd35-marble``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_config_dir() / f"{name_or_path}.toml"
    if path.suffix == "" and builtin.is_file():
        return builtin
    raise MarbleError(f"config file {path} does not exist and is no shipped configuration; pass a TOML "
                      f"file or one of: {', '.join(builtin_configs())}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line MarbleError."""
    path = Path(path)
    if not path.is_file():
        raise MarbleError(f"config file {path} does not exist; pass an existing TOML file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MarbleError(f"config file {path} is not valid TOML: {exc}") from None


def help_text(name: str) -> str:
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
