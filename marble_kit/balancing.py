"""Balancers: from the per-reward Gram matrix to loss weights (SPEC §1.7, §2).

The contract (:class:`Balancer`) maps the K×K Gram matrix G_kl = ⟨∇L_k, ∇L_l⟩ to **loss
weights** w such that the fused gradient is d = Σ_k w_k ∇L_k on the raw per-reward gradients.
The trainer then backpropagates (Σw)·L(r_eff) with r_eff = Σ_k (w_k/Σw)·r_k once.

This module holds what the built-in balancers share:

* :class:`DenseQP` — a small dense QP solved with OSQP (CSC matrices with a fixed dense
  pattern, warm start, polish) followed by an exact active-set refinement in float64;
* :func:`sanitize_gram` — degenerate input handling (non-finite rows, zero gradients,
  round-off non-PSD, rank deficiency) that never raises and never yields NaN;
* :class:`MinNormQP` — the MGDA min-norm problem min λᵀGλ on the simplex (optionally with a
  floor λ_k ≥ λ_min and unit-norm gradient normalization), solved in diagonally scaled
  variables so gradient norms spanning many orders of magnitude still give the true λ;
* :func:`ema_update`, :func:`loss_weights` and the metric bookkeeping.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from marble_kit.errors import MarbleError

NORMALIZE_MODES = ("none", "unit")
GRAM_METRICS = ("euclidean", "adam", "adam-momentum")

# A reward whose squared gradient norm is below this fraction of the largest one is treated as
# exactly zero: 1e-24 (a norm ratio of 1e-12) keeps gradients spanning 1e-3..1e3 all active.
ZERO_GRADIENT_RATIO = 1e-24
# Eigenvalues of the unit-diagonal Gram below -NON_PSD_TOL are more than float64 round-off.
NON_PSD_TOL = 1e-10
RANK_TOL = 1e-9
DEGENERATE_FLAGS = ("zero_gradient", "nonfinite", "non_psd", "rank_deficient", "all_zero",
                    "solver_fallback")


@runtime_checkable
class Balancer(Protocol):
    """Turns the per-reward Gram matrix into loss weights.

    Attributes:
        needs_gram: False → the trainer skips the Gram and calls ``weights(None, step)``.
        lam: the last simplex λ (K,) for logging.
        metrics: this step's extra metrics (e.g. ``"balancer/degenerate": 1.0``).
        summed_reward_weights: not None only for the summed-reward baseline (the trainer sums
            the rewards with these weights before a single advantage).
        gram_metric: which Gram the trainer passes: "euclidean", "adam" or "adam-momentum"
            (see :func:`marble_kit.gram.metric_gram`).
    """

    needs_gram: bool
    lam: Tensor
    metrics: dict[str, float]

    def weights(self, gram: Tensor | None, step: int) -> Tensor:
        """(K, K) Gram → (K,) loss weights w ≥ 0 (fused gradient Σ_k w_k ∇L_k)."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


# ------------------------------------------------------------------------- option checks
def check_normalize(value: str, where: str) -> str:
    if value not in NORMALIZE_MODES:
        raise MarbleError(f"{where}: normalize={value!r} is not one of {', '.join(NORMALIZE_MODES)} "
                          "(e.g. --balancer-opt normalize=\"unit\")")
    return value


def check_gram_metric(value: str, where: str) -> str:
    if value not in GRAM_METRICS:
        raise MarbleError(f"{where}: metric={value!r} is not one of {', '.join(GRAM_METRICS)}")
    return value


def check_num_rewards(num_rewards: int, where: str) -> int:
    if not isinstance(num_rewards, int) or num_rewards < 1:
        raise MarbleError(f"{where}: needs at least one reward, got num_rewards={num_rewards!r}")
    return num_rewards


def check_min_weight(min_weight: float, num_rewards: int, where: str) -> float:
    min_weight = float(min_weight)
    if not 0.0 <= min_weight or min_weight * num_rewards > 1.0 + 1e-12:
        raise MarbleError(f"{where}: min_weight={min_weight} must satisfy 0 ≤ min_weight ≤ 1/K = "
                          f"{1.0 / num_rewards:.4g} for K={num_rewards} rewards")
    return min_weight


def as_gram_array(gram: Tensor | np.ndarray | None, num_rewards: int, where: str) -> np.ndarray:
    """The Gram as float64 numpy, with a shape check (a wrong shape is a caller's mistake)."""
    if gram is None:
        raise MarbleError(f"{where} needs the per-reward Gram matrix; train with --gram affine, "
                          "exact or periodic (not none)")
    array = gram.detach().cpu().double().numpy() if isinstance(gram, Tensor) else np.asarray(gram, float)
    if array.shape != (num_rewards, num_rewards):
        raise MarbleError(f"{where}: expected a ({num_rewards}, {num_rewards}) Gram matrix for "
                          f"{num_rewards} rewards, got shape {tuple(array.shape)}")
    return array


# ------------------------------------------------------------------------- dense OSQP QP
@dataclass
class QPResult:
    x: np.ndarray
    solved: bool
    iterations: int
    refined: bool


class DenseQP:
    """min ½xᵀPx s.t. l ≤ Ax ≤ u for small dense P (K ≤ ~50), solved with OSQP.

    Every call sets up a fresh OSQP workspace (upper triangle of P and A as CSC matrices),
    warm-started from the previous call's primal/dual solution and its adapted step size ρ.
    (A persistent workspace would carry its internal state from call to call, which cannot be
    saved.) So a solve is a function of its inputs and this warm start alone, the warm start is
    part of :meth:`state_dict`, and a resumed run repeats every solve bit for bit, iteration
    counts included. The setup costs ~0.35 ms at K = 5 (`marble bench balancers`). Polishing is
    on, and the answer is then refined by an exact active-set solve in float64 (equality rows
    of A plus the active lower bounds x ≥ l), which brings KKT residuals to round-off level.
    """

    def __init__(self, eps: float = 1e-9, max_iter: int = 10000, polish: bool = True):
        # polish=False for problems whose optimum often has no active constraint: OSQP's C code
        # then prints "Polishing not needed" even with verbose off (refine_active_set is exact anyway).
        self.settings = {"eps_abs": eps, "eps_rel": eps, "eps_prim_inf": 1e-12, "eps_dual_inf": 1e-12,
                         "max_iter": max_iter, "polishing": polish, "warm_starting": True, "verbose": False}
        self._warm: tuple[np.ndarray, np.ndarray] | None = None
        self._rho: float | None = None

    def solve(self, P: np.ndarray, A: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> QPResult:
        import osqp
        from scipy import sparse

        n, m = P.shape[0], A.shape[0]
        solver = osqp.OSQP()
        rho = {} if self._rho is None else {"rho": self._rho}
        solver.setup(P=sparse.csc_matrix(np.triu(P)), q=np.zeros(n), A=sparse.csc_matrix(A), l=lower, u=upper,
                     **self.settings, **rho)
        if self._warm is not None and self._warm[0].shape == (n,) and self._warm[1].shape == (m,):
            solver.warm_start(x=self._warm[0], y=self._warm[1])
        result = solver.solve(raise_error=False)
        x = np.asarray(result.x, dtype=float)
        solved = result.info.status_val in (1, 2) and bool(np.all(np.isfinite(x)))
        self._warm = (x.copy(), np.asarray(result.y, dtype=float).copy()) if solved else None
        rho_estimate = float(result.info.rho_estimate)
        if solved and result.info.rho_updates > 0 and np.isfinite(rho_estimate):
            self._rho = min(max(rho_estimate, 1e-6), 1e6)  # OSQP's own bounds on ρ
        return QPResult(x, solved, int(result.info.iter), False)

    def state_dict(self) -> dict[str, Tensor]:
        """The next solve's warm start (empty before the first successful solve)."""
        state = {}
        if self._warm is not None:
            state["qp_warm_x"] = torch.from_numpy(self._warm[0].copy())
            state["qp_warm_y"] = torch.from_numpy(self._warm[1].copy())
        if self._rho is not None:
            state["qp_rho"] = torch.tensor(self._rho, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`; a state without a warm start (older checkpoints) starts cold."""
        x, y, rho = state.get("qp_warm_x"), state.get("qp_warm_y"), state.get("qp_rho")
        self._warm = None if x is None or y is None else (
            torch.as_tensor(x).double().cpu().numpy().copy(), torch.as_tensor(y).double().cpu().numpy().copy())
        self._rho = None if rho is None else float(rho)


def _equality_qp_on_free(P: np.ndarray, c: np.ndarray | None, target: float, lower: np.ndarray,
                         free: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimizer of ½xᵀPx with x = lower off ``free`` (and cᵀx = target), and the multiplier ν.

    Least squares on the KKT system: the minimum-norm solution when P is singular, so
    duplicated rewards share their weight evenly.
    """
    x = lower.copy()
    n_free = int(free.sum())
    fixed = ~free
    rhs_top = -P[np.ix_(free, fixed)] @ x[fixed]
    if c is None:
        x[free] = np.linalg.lstsq(P[np.ix_(free, free)], rhs_top, rcond=1e-13)[0]
        return x, 0.0
    kkt = np.zeros((n_free + 1, n_free + 1))
    kkt[:n_free, :n_free] = P[np.ix_(free, free)]
    kkt[:n_free, n_free] = c[free]
    kkt[n_free, :n_free] = c[free]
    rhs = np.concatenate([rhs_top, [target - c[fixed] @ x[fixed]]])
    solution = np.linalg.lstsq(kkt, rhs, rcond=1e-13)[0]
    x[free] = solution[:n_free]
    return x, -float(solution[n_free])


def _feasible_start(c: np.ndarray | None, target: float, lower: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = np.maximum(np.where(np.isfinite(x), x, lower), lower)
    if c is None:
        return x
    excess = c @ (x - lower)
    slack = target - c @ lower
    if excess <= 0:
        return lower + slack / (len(x) * c)
    return lower + (x - lower) * (slack / excess)


def refine_active_set(P: np.ndarray, c: np.ndarray | None, target: float, lower: np.ndarray,
                      x: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray | None:
    """Exact min ½xᵀPx s.t. cᵀx = target (if c is given), x ≥ lower, by a primal active-set
    method started from ``x`` (OSQP's answer: usually already optimal, then one KKT solve).

    Each iteration solves the equality-constrained problem on the free variables, walks
    towards it until a bound blocks, or — at a stationary point — releases the bound with the
    most negative multiplier. Returns None if it does not verify optimality in ``max_iter``.
    """
    n = len(lower)
    x = _feasible_start(c, target, lower, x)
    bound_tol = tol * np.maximum(1.0, np.abs(lower))
    free = x > lower + bound_tol
    if not free.any():
        free[int(np.argmax(x - lower))] = True
    scale = max(1.0, float(np.abs(P).max()) * max(1.0, float(np.abs(x).max())))
    for _ in range(max_iter):
        target_x, nu = _equality_qp_on_free(P, c, target, lower, free)
        if not np.all(np.isfinite(target_x)):
            return None
        step = target_x - x
        if np.abs(step).max() <= 1e-12 * max(1.0, float(np.abs(x).max())):
            gradient = P @ x - (nu * c if c is not None else 0.0)
            multipliers = np.where(free, np.inf, gradient)
            worst = int(np.argmin(multipliers))
            if multipliers[worst] >= -1e-9 * scale:
                return np.maximum(x, lower)
            free[worst] = True  # releasing this bound lowers the objective
            continue
        blocking = free & (step < 0)
        ratios = np.full(n, np.inf)
        ratios[blocking] = (lower[blocking] - x[blocking]) / step[blocking]
        alpha = min(1.0, float(ratios.min()))
        x = x + alpha * step
        if alpha < 1.0:
            hit = int(np.argmin(ratios))
            x[hit] = lower[hit]
            free[hit] = False
            if not free.any():
                return None
        else:
            x = target_x
    return None


# ------------------------------------------------------------------- degenerate handling
@dataclass
class CleanGram:
    """A sanitized Gram: the unit-diagonal matrix H = D G D over the active rewards."""

    unit: np.ndarray          # (A, A) symmetric PSD, unit diagonal (A = number of active rewards)
    active: np.ndarray        # (K,) bool: rewards taking part in the QP
    norms: np.ndarray         # (K,) gradient norms sqrt(G_kk) (0 where inactive)
    flags: dict[str, bool] = field(default_factory=dict)


def sanitize_gram(gram: np.ndarray) -> CleanGram:
    """Remove what the QP cannot use, never raising.

    Rows/columns with non-finite entries and (numerically) zero gradients are left out of the
    QP (their λ is 0: a zero gradient neither helps nor conflicts, a broken one must not steer
    the update); the rest is symmetrized, scaled to unit diagonal, and projected onto the PSD
    cone when round-off made it indefinite.
    """
    k = gram.shape[0]
    flags = dict.fromkeys(DEGENERATE_FLAGS, False)
    finite_rows = np.isfinite(gram).all(axis=0) & np.isfinite(gram).all(axis=1)
    flags["nonfinite"] = not finite_rows.all()
    diag = np.where(finite_rows, np.diag(np.where(np.isfinite(gram), gram, 0.0)), 0.0)
    largest = float(diag.max()) if k else 0.0
    positive = diag > max(largest * ZERO_GRADIENT_RATIO, 0.0) if largest > 0 else np.zeros(k, bool)
    active = finite_rows & positive
    flags["zero_gradient"] = bool((finite_rows & ~positive).any())
    norms = np.where(active, np.sqrt(np.where(active, diag, 0.0)), 0.0)
    if not active.any():
        flags["all_zero"] = True
        return CleanGram(np.zeros((0, 0)), active, norms, flags)
    sub = gram[np.ix_(active, active)]
    sub = 0.5 * (sub + sub.T)
    inv = 1.0 / norms[active]
    unit = sub * inv[:, None] * inv[None, :]
    eigenvalues, vectors = np.linalg.eigh(unit)
    if eigenvalues[0] < 0.0:
        flags["non_psd"] = bool(eigenvalues[0] < -NON_PSD_TOL)
        eigenvalues = np.maximum(eigenvalues, 0.0)
        unit = (vectors * eigenvalues) @ vectors.T
        unit = 0.5 * (unit + unit.T)
    flags["rank_deficient"] = bool(eigenvalues[0] < RANK_TOL * max(1.0, eigenvalues[-1]))
    return CleanGram(unit, active, norms, flags)


def _vertex_or_uniform_fallback(unit: np.ndarray, c: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """A defined answer when OSQP fails: the best of the feasible uniform point and vertices."""
    n = unit.shape[0]
    slack = 1.0 - c @ lower
    candidates = [lower + slack * np.eye(n)[i] / c[i] for i in range(n)]
    candidates.append(lower + slack / (n * c))
    values = [x @ unit @ x for x in candidates]
    return candidates[int(np.argmin(values))]


# ---------------------------------------------------------------------------- min-norm QP
@dataclass
class MinNormResult:
    lam: np.ndarray           # (K,) on the simplex (λ of the normalized problem when normalize="unit")
    weights: np.ndarray       # (K,) loss weights on the raw gradients
    metrics: dict[str, float]
    norms: np.ndarray         # (K,) gradient norms sqrt(G_kk), 0 for rewards left out of the QP
    active: np.ndarray        # (K,) bool: rewards that took part in the QP


def loss_weights(lam: np.ndarray, norms: np.ndarray, normalize: str) -> np.ndarray:
    """Loss weights on the raw gradients (SPEC §1.7).

    normalize="none": w = λ. normalize="unit": λ was solved for unit-norm gradients, so
    w_k = s·λ_k/‖g_k‖ with s the mean norm of the active rewards (keeps the step's scale).
    ``norms`` is 0 for rewards left out of the QP (zero or non-finite gradient).
    """
    active = norms > 0
    if normalize == "none" or not active.any():
        return lam.copy()
    scale = float(norms[active].mean())
    return np.where(active, scale * lam / np.where(active, norms, 1.0), 0.0)


def kkt_residual(gram: np.ndarray, lam: np.ndarray, min_weight: float = 0.0) -> float:
    """Relative KKT residual of min λᵀGλ on {λ ≥ λ_min, Σλ = 1} (0 at the exact optimum).

    Optimality: (Gλ)_k = ν where λ_k > λ_min and (Gλ)_k ≥ ν where λ_k = λ_min; for λ_min = 0,
    ν = λᵀGλ, so this also measures MGDA's (Gλ)_k ≥ λᵀGλ. Each reward's violation is relative
    to max(|ν|, Σ_l |G_kl|·λ_l), the size of the terms (Gλ)_k is made of, so the measure means
    the same at any gradient scale and at Pareto-stationary points where the optimum is 0.
    """
    gram_lam = gram @ lam
    magnitude = np.abs(gram) @ np.abs(lam)
    free = lam > min_weight + 1e-9
    if not free.any():
        return 0.0
    nu = float(gram_lam[free].mean())
    scale = np.maximum(np.maximum(abs(nu), magnitude), 1e-300)
    violation = np.where(free, np.abs(gram_lam - nu), np.maximum(nu - gram_lam, 0.0))
    return float((violation / scale).max())


class MinNormQP:
    """The MGDA min-norm problem min λᵀGλ s.t. λ ≥ λ_min, Σλ = 1, with OSQP.

    Solved in scaled variables μ = λ·‖g‖ (λ = Dμ, D = diag(1/‖g_k‖)): the Hessian D G D has
    unit diagonal whatever the gradient norms, and the simplex row becomes Σ D_k μ_k = 1
    (scaled to max coefficient 1), which OSQP's equilibration handles well. With
    normalize="unit" the problem is the one of the unit-norm gradients (D G D, Σμ = 1).
    """

    def __init__(self, eps: float = 1e-9):
        self.qp = DenseQP(eps=eps)

    def state_dict(self) -> dict[str, Tensor]:
        return self.qp.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.qp.load_state_dict(state)

    def solve(self, gram: np.ndarray, normalize: str = "none", min_weight: float = 0.0) -> MinNormResult:
        k = gram.shape[0]
        clean = sanitize_gram(gram)
        flags = clean.flags
        iterations = 0
        if not clean.active.any():
            lam = np.full(k, 1.0 / k)  # nothing to balance: a defined, finite answer
        elif clean.active.sum() == 1:
            lam = np.where(clean.active, 1.0, 0.0)
        else:
            norms = clean.norms[clean.active]
            # Simplex row Σλ = 1 in μ (λ = c·μ), scaled to max coefficient 1; floor λ ≥ m ⇔ μ ≥ m/c.
            c = 1.0 / norms if normalize == "none" else np.ones_like(norms)
            c = c / c.max()
            mu, iterations, flags["solver_fallback"] = self._solve_scaled(clean.unit, c, min_weight / c)
            lam = np.zeros(k)
            lam[clean.active] = mu * c
        lam = _clean_simplex(lam, min_weight, clean.active)
        weights = loss_weights(lam, clean.norms, normalize)
        if not np.all(np.isfinite(weights)):
            weights, flags["solver_fallback"] = lam.copy(), True
        metrics = {f"balancer/{name}": float(value) for name, value in flags.items()}
        metrics["balancer/degenerate"] = float(any(flags.values()))
        metrics["balancer/qp_iterations"] = float(iterations)
        metrics["balancer/active_rewards"] = float(clean.active.sum())
        return MinNormResult(lam, weights, metrics, clean.norms, clean.active)

    def _solve_scaled(self, unit: np.ndarray, c: np.ndarray, lower: np.ndarray
                      ) -> tuple[np.ndarray, int, bool]:
        """min μᵀHμ s.t. cᵀμ = 1, μ ≥ lower → (μ, OSQP iterations, fell back?)."""
        n = unit.shape[0]
        A = np.vstack([c[None, :], np.eye(n)])
        lo = np.concatenate([[1.0], lower])
        hi = np.concatenate([[1.0], np.full(n, np.inf)])
        P = 2.0 * unit
        result = self.qp.solve(P, A, lo, hi)
        # Even an unconverged OSQP iterate usually identifies the active set; the exact
        # refinement then verifies it (KKT signs). Only an unverified answer is a fallback.
        candidates = [result.x] if np.all(np.isfinite(result.x)) else []
        candidates.append(_vertex_or_uniform_fallback(unit, c, lower))
        for candidate in candidates:
            candidate = np.maximum(candidate, lower)
            refined = refine_active_set(P, c, 1.0, lower, candidate)
            if refined is not None:
                return refined, result.iterations, False
        best = np.maximum(candidates[0], lower)
        return best / (c @ best), result.iterations, not result.solved


def _clean_simplex(lam: np.ndarray, min_weight: float, active: np.ndarray) -> np.ndarray:
    """Clip round-off below the floor and renormalize to Σλ = 1 (inactive rewards keep 0)."""
    lam = np.where(np.isfinite(lam), lam, 0.0)
    floor = np.where(active, min_weight, 0.0) if active.any() else np.zeros_like(lam)
    lam = np.maximum(lam, floor)
    total = lam.sum()
    if not total > 0:
        return np.full_like(lam, 1.0 / lam.size)
    return lam / total


# --------------------------------------------------------------------------------- EMA etc.
def ema_update(previous: np.ndarray | None, current: np.ndarray, rho: float) -> np.ndarray:
    """λ_t = ρ·λ_{t−1} + (1−ρ)·λ*_t (a convex combination: stays on the simplex and above
    any floor both satisfy). The first solve has no history and is taken as is."""
    if previous is None:
        return current.copy()
    return rho * previous + (1.0 - rho) * current


def warn_degenerate(name: str, metrics: dict[str, float]) -> None:
    """One warning naming what was degenerate (Python shows each distinct message once)."""
    issues = [key.split("/", 1)[1] for key in (f"balancer/{f}" for f in DEGENERATE_FLAGS)
              if metrics.get(key, 0.0)]
    if issues:
        warnings.warn(f"balancer {name!r}: degenerate Gram matrix ({', '.join(issues)}); "
                      "used a defined fallback on the simplex", RuntimeWarning, stacklevel=3)


def to_tensor(values: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def uniform(num_rewards: int) -> Tensor:
    return torch.full((num_rewards,), 1.0 / num_rewards, dtype=torch.float64)


def state_tensor(state: dict[str, Tensor], key: str, shape: tuple[int, ...], where: str) -> Tensor:
    """Fetch and validate one tensor of a balancer state dict (a resume with other rewards fails)."""
    if key not in state:
        raise MarbleError(f"{where}: checkpoint balancer state has no {key!r}; it was written by "
                          "another balancer (resume with the same --balancer)")
    value = torch.as_tensor(state[key]).detach().cpu().double()
    if tuple(value.shape) != shape:
        raise MarbleError(f"{where}: checkpoint {key!r} has shape {tuple(value.shape)} but this run "
                          f"expects {shape}; resume with the same rewards")
    return value


def solve_period_due(step: int, every: int) -> bool:
    """Periodic Gram mode (SPEC §1.6): solve on steps 0, n, 2n, …; reuse the weights between."""
    if every < 1:
        raise MarbleError(f"gram period must be ≥ 1, got {every}")
    return step % every == 0


def finite_or_uniform(weights: np.ndarray) -> np.ndarray:
    """Never hand NaN weights to the trainer."""
    if np.all(np.isfinite(weights)) and weights.sum() > 0:
        return weights
    return np.full(weights.shape, 1.0 / max(weights.size, 1))


__all__ = [
    "Balancer", "CleanGram", "DenseQP", "MinNormQP", "MinNormResult", "QPResult",
    "as_gram_array", "check_gram_metric", "check_min_weight", "check_normalize",
    "check_num_rewards", "ema_update", "finite_or_uniform", "kkt_residual", "loss_weights",
    "refine_active_set", "sanitize_gram", "solve_period_due", "state_tensor", "to_tensor",
    "uniform", "warn_degenerate",
]
