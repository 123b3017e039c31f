"""`marble bench fidelity`: how far `affine`, `periodic` and the sampled Gram are from `exact`.

One training run per seed is driven by MARBLE with the `exact` Gram (K + 1 backward passes, the
reference). On every step, on the very same batch and weights, :class:`FidelityTrainer` also
computes the `affine` per-reward gradients of the whole batch and of per-group row samples
(``gram_rows`` = f), and shadow balancers (fresh instances of the same balancer, with their own
EMA state) say what each mode would have done:

* ``exact``       the driving balancer on the exact Gram, every step;
* ``affine``      a shadow balancer on the affine Gram, every step;
* ``periodic``    a shadow balancer on the affine Gram every n steps; between solves it keeps its
  last weights (stale λ), as ``--gram periodic`` does;
* ``rows-<f>``    a shadow balancer on the affine Gram of a sample of the rows (``gram_rows`` = f),
  every step; its update is one backward over all rows with those weights, i.e. Σ w_k g_k with
  the whole-batch gradients;
* ``uniform``     fixed 1/K weights, for scale.

Every mode balances the rewards the trainer would (a preference in the rows its gradients come
from, SPEC §1.4). Per step and mode: the cosine between the mode's fused direction d and exact's,
|Δλ|₁ against exact's λ, and the worst reward cosine min_k cos(g_k, d) over the active rewards,
measured with the exact gradients g_k. With ``fp32_reference`` (a policy with mixed precision),
the exact gradients are also computed in float32 on the same batch, and the Gram and direction
errors of `exact` and `affine` against that reference are recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from marble_kit import gram as gram_ops
from marble_kit.bench.common import (
    build_policy,
    components_for,
    fraction,
    machine_description,
    mean_and_spread,
    new_figure,
    policy_fingerprint,
    save_figure,
)
from marble_kit.config import DEFAULT_REWARDS, TrainConfig
from marble_kit.errors import MarbleError
from marble_kit.registry import build
from marble_kit.trainer import TrainBatch, Trainer, balance_weights

SAMPLED_FRACTIONS = (0.5, 0.25)
BASE_MODES = ("exact", "affine", "periodic", "uniform")
# affine overlaps exact almost everywhere: dashed on top so both stay visible
MODE_STYLE = {"exact": {"color": "C0", "lw": 2.4}, "affine": {"color": "C1", "lw": 1.4, "ls": "--"},
              "periodic": {"color": "C2", "lw": 1.5}, "uniform": {"color": "C3", "lw": 1.2, "alpha": 0.8}}
SAMPLED_STYLES = ({"color": "C4", "lw": 1.3}, {"color": "C5", "lw": 1.3}, {"color": "C6", "lw": 1.3})


def sampled_mode(fraction: float) -> str:
    return f"rows-{fraction:g}"


def modes_of(fractions: tuple[float, ...] | list[float]) -> list[str]:
    return ["exact", "affine", "periodic", *(sampled_mode(f) for f in fractions), "uniform"]


MODES = tuple(modes_of(SAMPLED_FRACTIONS))


@dataclass
class FidelitySettings:
    """What `marble bench fidelity` runs (defaults: 3 seeds × 40 steps, a few minutes on 2 cores)."""

    steps: int = 40
    seeds: int = 3
    balancer: str = "marble"
    balancer_options: dict = field(default_factory=dict)
    gram_period: int = 10
    rewards: list = field(default_factory=lambda: list(DEFAULT_REWARDS))
    prompts: list = field(default_factory=lambda: ["default"])
    prompts_per_step: int = 4
    images_per_prompt: int = 4
    timesteps_per_image: int = 4
    sample_steps: int = 8
    lr: float = 5e-3
    kl: float = TrainConfig.kl
    reward_scope: str = "judged"
    fractions: list = field(default_factory=lambda: list(SAMPLED_FRACTIONS))
    fp32_reference: bool = False
    policy: str = "tiny-sd3"
    policy_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seeds < 1 or self.gram_period < 1:
            raise MarbleError("fidelity bench: steps, seeds and the period must be ≥ 1")
        if not all(0.0 < float(f) < 1.0 for f in self.fractions):
            raise MarbleError(f"fidelity bench: row fractions must be in (0, 1), got {self.fractions}")

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            policy=self.policy, policy_options=dict(self.policy_options), rewards=list(self.rewards),
            balancer=self.balancer, balancer_options=dict(self.balancer_options), gram="exact",
            prompts=list(self.prompts), seed=seed, steps=self.steps,
            prompts_per_step=self.prompts_per_step, images_per_prompt=self.images_per_prompt,
            timesteps_per_image=self.timesteps_per_image, sample_steps=self.sample_steps, lr=self.lr,
            kl=self.kl, reward_scope=self.reward_scope, out="-", checkpoint_every=0, sample_every=0)


def sd35_arch_fidelity_settings(**overrides: Any) -> FidelitySettings:
    """SD3.5 Medium's architecture on one GPU: a small batch, bf16, checkpointing, LoRA r 32 (also the
    other GPU architectures' defaults, e.g. ``policy="flux-arch"``)."""
    settings = {"policy": "sd3.5-arch", "steps": 4, "seeds": 1, "prompts_per_step": 2, "images_per_prompt": 4,
                "timesteps_per_image": 2, "sample_steps": 10, "lr": 3e-4,
                "policy_options": {"device": "cuda", "mixed_precision": "bf16", "gradient_checkpointing": True}}
    settings.update(overrides)
    return FidelitySettings(**settings)


@dataclass
class Gradients:
    """Per-reward gradients of one mode on one step (float64, CPU) and its active rewards."""

    grads: torch.Tensor
    active: torch.Tensor


class FidelityTrainer(Trainer):
    """Trains with the `exact` Gram and keeps, per step, the exact, the `affine` and the sampled
    `affine` per-reward gradients of the same batch (``self.gradients``) for the comparison.
    The row samples come from a generator of their own: the training stream is untouched."""

    gradients: dict[str, Gradients] | None = None
    fractions: tuple[float, ...] = SAMPLED_FRACTIONS
    fp32_reference: bool = False

    def _exact_gradients(self, batch: TrainBatch, anchor: bool = True, anchor_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        grads, anchor_grad = super()._exact_gradients(batch, anchor, anchor_rows)
        if self.gradients is not None and "exact" in self.gradients:
            return grads, anchor_grad  # a nested call (the fp32 reference below)
        record = {"exact": self._record(batch, grads)}
        record["affine"] = self._record(batch, self._affine_gradients(batch, anchor=False)[0])
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + self.step_count)
        for f in self.fractions:
            rows = self._gram_rows(batch, self.judgement, self.config.prompts_per_step, f, generator)
            record[sampled_mode(f)] = self._record(rows, self._affine_gradients(rows, anchor=False)[0])
        if self.fp32_reference:
            self.gradients = record
            with self.policy.full_precision():
                reference, _ = super()._exact_gradients(batch, anchor=False)
            record["fp32"] = self._record(batch, reference)
        self.gradients = record
        return grads, anchor_grad

    def _record(self, batch: TrainBatch, grads: torch.Tensor) -> Gradients:
        grads = self.dist.all_reduce_mean(grads)
        return Gradients(grads.detach().double().cpu(), self._active(batch.candidates, grads))

    def step(self) -> dict[str, Any]:
        self.gradients = None
        return super().step()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def compare_step(exact_grads: torch.Tensor, directions: dict[str, torch.Tensor],
                 lams: dict[str, torch.Tensor], active: torch.Tensor | None = None
                 ) -> dict[str, dict[str, float]]:
    """Per mode: cos(d_mode, d_exact), |λ_mode − λ_exact|₁ and min_k cos(g_k, d_mode) over the
    active rewards (all when ``active`` is None)."""
    out = {}
    for mode, direction in directions.items():
        cosines = gram_ops.update_cosines(exact_grads, direction)
        if active is not None and active.any():
            cosines = cosines[active]
        out[mode] = {"cos_to_exact": cosine(direction, directions["exact"]),
                     "lambda_l1": float((lams[mode] - lams["exact"]).abs().sum()),
                     "worst_cos": float(cosines.min())}
    return out


@dataclass
class ShadowBalancers:
    """The affine-every-step, periodic and sampled-rows shadows of the driving balancer."""

    affine: Any
    periodic: Any
    period: int
    sampled: dict[str, Any] = field(default_factory=dict)
    periodic_weights: torch.Tensor | None = None
    periodic_lam: torch.Tensor | None = None

    def step(self, affine_gram: torch.Tensor, step: int, active: torch.Tensor | None = None,
             sampled: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
             ) -> tuple[dict[str, torch.Tensor], bool]:
        """This step's loss weights and λ of every shadow; whether periodic solved now.
        ``sampled``: mode → (Gram, active) of its row sample. Between periodic solves the last
        weights are kept for the rewards active now (as the trainer's reuse steps do)."""
        active = torch.ones(affine_gram.shape[0], dtype=torch.bool) if active is None else active
        out = {}
        affine_weights = balance_weights(self.affine, affine_gram, step, active)
        solve = step % self.period == 0 or self.periodic_weights is None
        if solve:
            self.periodic_weights = balance_weights(self.periodic, affine_gram, step, active)
            self.periodic_lam = _lam(self.periodic, self.periodic_weights)
        out.update({"affine": affine_weights, "affine_lam": _lam(self.affine, affine_weights),
                    "periodic": torch.where(active, self.periodic_weights, torch.zeros_like(self.periodic_weights)),
                    "periodic_lam": self.periodic_lam})
        for mode, (gram, mode_active) in (sampled or {}).items():
            weights = balance_weights(self.sampled[mode], gram, step, mode_active)
            out[mode], out[f"{mode}_lam"] = weights, _lam(self.sampled[mode], weights)
        return out, solve


def _lam(balancer: Any, weights: torch.Tensor) -> torch.Tensor:
    lam = getattr(balancer, "lam", None)
    return (lam if lam is not None else weights).detach().double().clone()


def precision_errors(record: dict[str, Gradients]) -> dict[str, float]:
    """Gram relative error and direction cosine (uniform weights over the active rewards) of the
    mixed-precision `exact` and `affine` gradients against the float32 exact reference."""
    reference = record["fp32"].grads
    ref_gram = gram_ops.gram_matrix(reference)
    active = record["exact"].active
    weights = active.double() / max(int(active.sum()), 1)
    out = {}
    for mode in ("exact", "affine"):
        grads = record[mode].grads
        out[f"{mode}_gram_error_vs_fp32"] = float((gram_ops.gram_matrix(grads) - ref_gram).norm()
                                                   / ref_gram.norm().clamp_min(1e-300))
        out[f"{mode}_direction_cos_vs_fp32"] = cosine(weights @ grads, weights @ reference)
    return out


def run_seed(settings: FidelitySettings, seed: int, policy: Any = None) -> dict[str, Any]:
    """One exact-driven run with its per-step comparison records."""
    config = settings.config(seed)
    policy = policy if policy is not None else build_policy(config)
    if settings.fp32_reference and not hasattr(policy, "full_precision"):
        raise MarbleError(f"fidelity bench: policy {config.policy!r} has no float32 mode for --fp32-reference")
    trainer = FidelityTrainer(config, components_for(config, policy))
    trainer.fractions = tuple(float(f) for f in settings.fractions)
    trainer.fp32_reference = settings.fp32_reference
    if getattr(trainer.balancer, "gram_metric", "euclidean") != "euclidean":
        raise MarbleError("fidelity bench compares Euclidean Grams; drop the balancer's metric option")
    num_rewards = len(config.rewards)

    def shadow():
        return build("balancer", config.balancer, config.balancer_options, num_rewards)

    sampled_modes = [sampled_mode(f) for f in trainer.fractions]
    shadows = ShadowBalancers(shadow(), shadow(), settings.gram_period, {m: shadow() for m in sampled_modes})
    records = []
    for step in range(settings.steps):
        trainer.step()
        record = trainer.gradients
        exact, affine = record["exact"], record["affine"]
        affine_gram, exact_gram = gram_ops.gram_matrix(affine.grads), gram_ops.gram_matrix(exact.grads)
        sampled = {m: (gram_ops.gram_matrix(record[m].grads), record[m].active) for m in sampled_modes}
        shadow_weights, solved = shadows.step(affine_gram, step, affine.active, sampled)
        exact_weights = trainer.loss_weights.double()
        uniform = exact.active.double() / max(int(exact.active.sum()), 1)
        directions = {
            "exact": exact_weights @ exact.grads,
            "affine": shadow_weights["affine"] @ affine.grads,
            # reuse steps train on one backward of L(r_eff), i.e. Σ w_k g_k with the true g_k
            "periodic": shadow_weights["periodic"] @ (affine.grads if solved else exact.grads),
            # sampled rows: the update is one backward over every row with the sample's weights
            **{m: shadow_weights[m] @ exact.grads for m in sampled_modes},
            "uniform": uniform @ exact.grads,
        }
        lams = {"exact": _lam(trainer.balancer, exact_weights), "affine": shadow_weights["affine_lam"],
                "periodic": shadow_weights["periodic_lam"], "uniform": uniform,
                **{m: shadow_weights[f"{m}_lam"] for m in sampled_modes}}
        entry = {"step": step + 1, "periodic_solved": solved,
                 "active": exact.active.tolist(), "exact_lambda": lams["exact"].tolist(),
                 "affine_active_equal": bool(torch.equal(affine.active, exact.active)),
                 "gram_relative_error": float((affine_gram - exact_gram).norm() / exact_gram.norm().clamp_min(1e-300)),
                 **compare_step(exact.grads, directions, lams, exact.active)}
        if "fp32" in record:
            entry["precision"] = precision_errors(record)
        records.append(entry)
    return {"seed": seed, "steps": records, "fingerprint": policy_fingerprint(policy),
            "device": str(policy.device), "modes": modes_of(trainer.fractions)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in runs[0]["modes"]:
        entries = [step[mode] for run in runs for step in run["steps"]]
        reuse = [step[mode] for run in runs for step in run["steps"] if not step["periodic_solved"]]
        rows.append({
            "mode": mode,
            "mean_cos_to_exact": mean_and_spread([e["cos_to_exact"] for e in entries])[0],
            "min_cos_to_exact": min(e["cos_to_exact"] for e in entries),
            "mean_lambda_l1": mean_and_spread([e["lambda_l1"] for e in entries])[0],
            "max_lambda_l1": max(e["lambda_l1"] for e in entries),
            "mean_lambda_l1_between_solves": mean_and_spread([e["lambda_l1"] for e in reuse])[0] if reuse else 0.0,
            "negative_worst_cos": fraction([e["worst_cos"] < 0 for e in entries]),
            "mean_worst_cos": mean_and_spread([e["worst_cos"] for e in entries])[0],
            "steps": len(entries),
        })
    return rows


def exact_lambda_movement(runs: list[dict[str, Any]]) -> float:
    """Mean |λ_t − λ_{t−1}|₁ of the driving (exact) balancer: the EMA's own step-to-step motion,
    the scale against which the sampled Gram's |Δλ|₁ is judged."""
    moves = []
    for run in runs:
        lams = [step["exact_lambda"] for step in run["steps"]]
        moves += [sum(abs(a - b) for a, b in zip(x, y)) for x, y in zip(lams[1:], lams[:-1])]
    return mean_and_spread(moves)[0] if moves else 0.0


def run_fidelity_benchmark(settings: FidelitySettings | None = None,
                           on_seed: Callable[[int], None] | None = None, policy: Any = None) -> dict[str, Any]:
    settings = settings or FidelitySettings()
    runs = []
    for seed in range(settings.seeds):
        if on_seed is not None:
            on_seed(seed)
        runs.append(run_seed(settings, seed, policy))
    errors = [step["gram_relative_error"] for run in runs for step in run["steps"]]
    report = {
        "benchmark": "fidelity",
        "settings": asdict(settings),
        "machine": machine_description(runs[0]["device"]),
        "policy_fingerprint": runs[0]["fingerprint"],
        "max_gram_relative_error": max(errors),
        "affine_active_set_agrees": fraction([s["affine_active_equal"] for run in runs for s in run["steps"]]),
        "exact_lambda_step_movement": exact_lambda_movement(runs),
        "rows": summarize(runs),
        "runs": runs,
    }
    precision = [s["precision"] for run in runs for s in run["steps"] if "precision" in s]
    if precision:
        report["precision_vs_fp32"] = {
            key: {"mean": mean_and_spread([p[key] for p in precision])[0],
                  "worst": (max if "error" in key else min)(p[key] for p in precision)}
            for key in precision[0]}
    return report


def plot_fidelity(report: dict[str, Any], path) -> Any:
    """Per step (mean over seeds): cos to exact's direction, |Δλ|₁ and the worst reward cosine."""
    fig, axes = new_figure(1, 3, width=5.0)
    runs = report["runs"]
    steps = [s["step"] for s in runs[0]["steps"]]
    panels = (("cos_to_exact", "cos(d_mode, d_exact)"), ("lambda_l1", "|λ_mode − λ_exact|₁"),
              ("worst_cos", "worst reward cos (exact g_k)"))
    for ax, (key, title) in zip(axes[0], panels):
        for index, mode in enumerate(runs[0]["modes"]):
            if mode == "exact" and key != "worst_cos":
                continue
            curve = [sum(run["steps"][i][mode][key] for run in runs) / len(runs) for i in range(len(steps))]
            style = MODE_STYLE.get(mode) or SAMPLED_STYLES[index % len(SAMPLED_STYLES)]
            ax.plot(steps, curve, label=mode, **style)
        ax.set(title=title + " (mean over seeds)", xlabel="step")
        ax.grid(alpha=0.3)
        if key == "worst_cos":
            ax.axhline(0.0, color="black", lw=0.8)
    axes[0][2].legend(fontsize=8)
    return save_figure(fig, path)
