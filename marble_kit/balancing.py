"""Balancers: from the per-reward Gram matrix to loss weights (SPEC §1.7, §2).

The contract (:class:`Balancer`) maps the K×K Gram matrix G_kl = ⟨∇L_k, ∇L_l⟩ to **loss
weights** w such that the fused gradient is d = Σ_k w_k ∇L_k on the raw per-reward gradients.
The trainer then backpropagates (Σw)·L(r_eff) with r_eff = Σ_k (w_k/Σw)·r_k once.

This module holds what the built-in balancers share:

* :class:`DenseQP` — a small dense QP solved with OSQP (CSC matrices, warm start, polish);
* :func:`active_set_qp` — an exact primal active-set method in float64 (OSQP's answer is
  refined by it), and :func:`box_qp_batch` — many exact box-constrained QPs sharing one
  Hessian, solved together (UPGrad's K projections);
* :func:`sanitize_gram` — inactive rewards, non-finite rows, zero gradients, round-off non-PSD
  and rank deficiency, never raising and never yielding NaN;
* :class:`MinNormQP` — the MGDA min-norm problem min λᵀGλ on the simplex (optionally with a
  floor λ_k ≥ λ_min and unit-norm gradient normalization), solved in diagonally scaled
  variables so gradient norms spanning many orders of magnitude still give the true λ;
* :func:`ema_update`, :func:`loss_weights`, the metric bookkeeping, and :func:`balance`
  (the trainer's call, which also serves balancers written before ``active`` existed).
"""

from __future__ import annotations

import abc
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from marble_kit.errors import MarbleError

NORMALIZE_MODES = ("none", "unit")
GRAM_METRICS = ("euclidean", "adam", "adam-momentum")

# Eigenvalues of the unit-diagonal Gram below -NON_PSD_TOL are more than float64 round-off.
NON_PSD_TOL = 1e-10
RANK_TOL = 1e-9
DEGENERATE_FLAGS = ("zero_gradient", "nonfinite", "non_psd", "rank_deficient", "all_zero", "no_active",
                    "solver_fallback")


@runtime_checkable
class Balancer(Protocol):
    """Turns the per-reward Gram matrix into loss weights.

    ``weights(gram, step, active=None)``:

    * ``gram``: (K, K) Gram over all K rewards (in the metric named by ``gram_metric``), or None
      when ``needs_gram`` is False. Rows/columns of inactive rewards may hold zeros or anything
      finite: ignore them.
    * ``active``: (K,) bool tensor, the rewards that take part this step (None: all). The trainer
      decides it: a reward that judged no row this step, whose judged rows all have zero
      advantage, or whose gradient is non-finite or numerically zero for its dtype is inactive.
      An inactive reward gets weight 0 and λ 0, and the balancer solves the problem of the
      active rewards alone (MGDA on the active sub-Gram, UPGrad averaging over the active
      rewards, …): an absent reward is not part of the problem. A tiny but real gradient is,
      and the fused gradient d = Σ w_k g_k must be continuous as its norm goes to 0 — no norm
      threshold inside a balancer; exact zeros and non-finite entries are handled as defined
      limits, never NaN.
    * no active reward: all-zero weights, λ all zero, ``metrics["balancer/no_active"] = 1``,
      and any state (e.g. an EMA) left untouched.
    * returns (K,) loss weights w ≥ 0: the fused gradient is Σ_k w_k ∇L_k.

    A balancer whose ``weights`` has no ``active`` parameter still works (:func:`balance`): it
    gets the Gram with inactive rows and columns zeroed, and its inactive weights are forced to 0.

    Attributes:
        needs_gram: False → the trainer skips the Gram and calls ``weights(None, step, active)``.
        lam: the last λ (K,) for logging (weights normalized to sum 1; 0 for inactive rewards).
        metrics: this step's extra metrics (e.g. ``"balancer/degenerate": 1.0``).
        summed_reward_weights: not None only for the summed-reward baseline (the trainer sums
            the rewards with these weights before a single advantage).
        gram_metric: which Gram the trainer passes: "euclidean", "adam" or "adam-momentum"
            (see :func:`marble_kit.gram.metric_gram`).
    """

    needs_gram: bool
    lam: Tensor
    metrics: dict[str, float]

    def weights(self, gram: Tensor | None, step: int, active: Tensor | None = None) -> Tensor:
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


def check_max_weight(max_weight: float, where: str) -> float:
    max_weight = float(max_weight)
    if not max_weight >= 1.0:  # also refuses NaN
        raise MarbleError(f"{where}: max_weight={max_weight} must be ≥ 1 (a reward's own share 1/n "
                          "times n); it caps every loss weight (e.g. --balancer-opt max_weight=1000)")
    return max_weight


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


def _equality_qp_on_free(P: np.ndarray, q: np.ndarray, c: np.ndarray | None, target: float,
                         fixed_values: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimizer of ½xᵀPx + qᵀx with x = fixed_values off ``free`` (and cᵀx = target), and the
    multiplier ν of the equality.

    Least squares on the KKT system: the minimum-norm solution when P is singular, so
    duplicated rewards share their weight evenly.
    """
    x = np.where(free, 0.0, fixed_values)
    n_free = int(free.sum())
    fixed = ~free
    rhs_top = -q[free] - P[np.ix_(free, fixed)] @ x[fixed]
    if c is None:
        if n_free:
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


def active_set_qp(P: np.ndarray, q: np.ndarray | None, lower: np.ndarray, upper: np.ndarray | None = None,
                  c: np.ndarray | None = None, target: float = 0.0, x0: np.ndarray | None = None,
                  tol: float = 1e-10, max_iter: int | None = None) -> np.ndarray | None:
    """Exact min ½xᵀPx + qᵀx s.t. lower ≤ x ≤ upper (and cᵀx = target if c is given; then the
    upper bounds must be +inf) for a small dense PSD P, by a primal active-set method.

    Each iteration solves the equality-constrained problem on the free variables, walks
    towards it until a bound blocks, or — at a stationary point — releases the bound with the
    most negative multiplier. The answer is the last equality-constrained solution (bounds
    exact, free variables from one linear solve), so it depends on ``x0`` only through the
    active set it identifies: the start (e.g. OSQP's answer) changes the path, not the result.
    Without ``x0`` it starts from the lower bounds. Returns None if it does not verify
    optimality in ``max_iter`` iterations.
    """
    n = len(lower)
    q = np.zeros(n) if q is None else np.asarray(q, float)
    upper = np.full(n, np.inf) if upper is None else upper
    if c is not None and np.isfinite(upper).any():
        raise ValueError("active_set_qp: an equality row needs +inf upper bounds")
    x = _feasible_start(c, target, lower, lower.copy() if x0 is None else x0)
    x = np.minimum(x, upper)
    bound_tol = tol * np.maximum(1.0, np.abs(lower))
    status = np.zeros(n, dtype=np.int8)  # -1: at lower, +1: at upper, 0: free
    status[x <= lower + bound_tol] = -1
    finite_upper = np.where(np.isfinite(upper), upper, 0.0)
    status[np.isfinite(upper) & (x >= upper - tol * np.maximum(1.0, np.abs(finite_upper)))] = 1
    if c is not None and not (status == 0).any():
        status[int(np.argmax(x - lower))] = 0
    scale = max(1.0, float(np.abs(P).max()) * max(1.0, float(np.abs(x).max())), float(np.abs(q).max()))
    for _ in range(max_iter or 10 * n + 20):
        free = status == 0
        fixed_values = np.where(status == 1, upper, lower)
        target_x, nu = _equality_qp_on_free(P, q, c, target, fixed_values, free)
        if not np.all(np.isfinite(target_x)):
            return None
        x = np.where(free, x, fixed_values)
        step = target_x - x
        if np.abs(step).max() <= 1e-12 * max(1.0, float(np.abs(x).max())):
            gradient = P @ target_x + q - (nu * c if c is not None else 0.0)
            multipliers = np.where(status == -1, gradient, np.where(status == 1, -gradient, np.inf))
            worst = int(np.argmin(multipliers))
            if multipliers[worst] >= -1e-9 * scale:
                return np.clip(target_x, lower, upper)
            status[worst] = 0  # releasing this bound lowers the objective
            continue
        ratios = np.full(n, np.inf)
        down, up = free & (step < 0), free & (step > 0) & np.isfinite(upper)
        ratios[down] = (lower[down] - x[down]) / step[down]
        ratios[up] = (upper[up] - x[up]) / step[up]
        alpha = min(1.0, float(ratios.min()))
        if alpha < 1.0:
            hit = int(np.argmin(ratios))
            x = x + alpha * step
            status[hit] = -1 if down[hit] else 1
            x[hit] = lower[hit] if down[hit] else upper[hit]
            if c is not None and not (status == 0).any():
                return None
        else:
            x = target_x
    return None


def refine_active_set(P: np.ndarray, c: np.ndarray | None, target: float, lower: np.ndarray,
                      x: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray | None:
    """Exact min ½xᵀPx s.t. cᵀx = target (if c is given), x ≥ lower, started from ``x``
    (OSQP's answer: usually already optimal, then one KKT solve). See :func:`active_set_qp`."""
    return active_set_qp(P, None, lower, None, c, target, x0=x, tol=tol, max_iter=max_iter)


def _batched_pinv_solve(matrices: np.ndarray, rhs: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """x_b = M_b⁺ r_b for symmetric PSD M_b (eigenvalues below rcond·max dropped)."""
    values, vectors = np.linalg.eigh(matrices)
    cutoff = rcond * np.maximum(values[:, -1:], 1e-300)
    inverse = np.where(values > cutoff, 1.0 / np.where(values > cutoff, values, 1.0), 0.0)
    coefficients = np.einsum("bji,bj->bi", vectors, rhs) * inverse
    return np.einsum("bij,bj->bi", vectors, coefficients)


def box_qp_batch(H: np.ndarray, lower: np.ndarray, upper: np.ndarray, max_iter: int = 50,
                 q: np.ndarray | None = None, fallback: bool = True) -> tuple[np.ndarray, int, np.ndarray]:
    """Exact min ½vᵀHv + q_bᵀv s.t. lower[b] ≤ v ≤ upper[b], for every row b of ``lower`` /
    ``upper`` (B problems sharing one small PSD H) → (V [B, n], iterations, converged [B]).

    Block principal pivoting (Júdice & Pires), all problems at once: from the lower bounds,
    solve the equality-constrained problem of every problem's free set in one batched
    eigen-solve, then exchange every variable that violates a bound or whose multiplier has the
    wrong sign; when the count of violations stops falling, exchange only the last one
    (Murty's rule, which terminates). A converged problem satisfies its KKT conditions to
    round-off. A problem that does not converge in ``max_iter`` rounds is finished by
    :func:`active_set_qp` (a primal method that always does) unless ``fallback`` is False.
    No warm start: the answer is a function of H, q and the bounds alone.
    """
    batch, n = lower.shape
    q = np.zeros((batch, n)) if q is None else q
    status = np.full((batch, n), -1, dtype=np.int8)  # -1: at lower, +1: at upper, 0: free
    finite_upper = np.where(np.isfinite(upper), upper, 0.0)
    x_tol = 1e-12 * np.maximum(np.abs(lower), np.abs(finite_upper))
    best = np.full(batch, n + 1)
    patience = np.full(batch, 3)
    done = np.zeros(batch, dtype=bool)
    x = lower.copy()
    eye = np.eye(n, dtype=bool)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        free = status == 0
        fixed_values = np.where(status == 1, upper, lower)
        fixed_values = np.where(free, 0.0, fixed_values)
        if free.any():
            rhs = np.where(free, -(fixed_values @ H) - q, fixed_values)
            both = free[:, :, None] & free[:, None, :]
            matrices = np.where(both, H[None], 0.0) + (~free[:, :, None] & eye[None])
            x = _batched_pinv_solve(matrices, rhs)
            x = np.where(free, x, fixed_values)
        else:
            x = fixed_values
        gradient = x @ H + q
        g_tol = 1e-12 * (np.abs(x) @ np.abs(H) + np.abs(q)) + 1e-300
        low_violation = free & (x < lower - x_tol)
        up_violation = free & (x > upper + x_tol)
        dual_low = (status == -1) & (gradient < -g_tol)
        dual_up = (status == 1) & (gradient > g_tol)
        infeasible = low_violation | up_violation | dual_low | dual_up
        count = infeasible.sum(axis=1)
        done = count == 0
        if done.all():
            break
        improved = count < best
        best = np.where(improved, count, best)
        patience = np.where(improved, 3, patience - 1)
        # Murty's backup: only the largest infeasible index changes sides.
        last = n - 1 - np.argmax(infeasible[:, ::-1], axis=1)
        single = np.zeros_like(infeasible)
        single[np.arange(batch), last] = True
        change = np.where((patience > 0)[:, None], infeasible, infeasible & single) & ~done[:, None]
        status = np.where(change & low_violation, -1, status)
        status = np.where(change & up_violation, 1, status)
        status = np.where(change & (dual_low | dual_up), 0, status).astype(np.int8)
    x = np.clip(x, lower, upper)
    converged = done.copy()
    for b in np.flatnonzero(~done) if fallback else ():
        exact = active_set_qp(H, q[b], lower[b], upper[b])
        if exact is not None:
            x[b], converged[b] = exact, True
    return x, iterations, converged


# ------------------------------------------------------------------- degenerate handling
@dataclass
class CleanGram:
    """A sanitized Gram: the unit-diagonal matrix H = D G D over the nonzero rewards."""

    unit: np.ndarray          # (A, A) symmetric PSD, unit diagonal (A = number of nonzero rewards)
    included: np.ndarray      # (K,) bool: rewards in the problem (active and finite)
    nonzero: np.ndarray       # (K,) bool: included rewards with a nonzero gradient (rows of ``unit``)
    norms: np.ndarray         # (K,) gradient norms sqrt(G_kk) (0 where not nonzero)
    flags: dict[str, bool] = field(default_factory=dict)


def as_active_mask(active: Tensor | np.ndarray | None, num_rewards: int, where: str) -> np.ndarray:
    """The ``active`` argument of :meth:`Balancer.weights` as a (K,) numpy bool mask."""
    if active is None:
        return np.ones(num_rewards, dtype=bool)
    mask = active.detach().cpu().numpy() if isinstance(active, Tensor) else np.asarray(active)
    if mask.shape != (num_rewards,):
        raise MarbleError(f"{where}: active must be a ({num_rewards},) bool mask, got shape {tuple(mask.shape)}")
    return mask.astype(bool)


def sanitize_gram(gram: np.ndarray, active: np.ndarray | None = None, unit: bool = True) -> CleanGram:
    """Split the rewards into what the problem can use, never raising.

    Inactive rewards (``active`` False) and rows/columns with non-finite entries are out of the
    problem (λ = 0: an absent reward is not part of it, a broken one must not steer the
    update). No norm threshold: a tiny gradient stays in, and an exactly zero one (G_kk ≤ 0)
    stays in the problem as the zero vector, which each balancer handles as the limit of a
    vanishing gradient. The nonzero rows are symmetrized, scaled to unit diagonal, and
    projected onto the PSD cone when round-off made them indefinite.
    """
    k = gram.shape[0]
    active = np.ones(k, dtype=bool) if active is None else active
    flags = dict.fromkeys(DEGENERATE_FLAGS, False)
    finite_rows = np.isfinite(gram).all(axis=0) & np.isfinite(gram).all(axis=1)
    flags["nonfinite"] = bool((active & ~finite_rows).any())
    included = active & finite_rows
    diag = np.where(included, np.diag(np.where(np.isfinite(gram), gram, 0.0)), 0.0)
    nonzero = included & (diag > 0)
    flags["zero_gradient"] = bool((included & ~nonzero).any())
    flags["no_active"] = not active.any()
    flags["all_zero"] = bool(active.any() and not nonzero.any())
    norms = np.where(nonzero, np.sqrt(np.where(nonzero, diag, 0.0)), 0.0)
    if not nonzero.any() or not unit:  # unit=False: the caller needs only the masks and norms
        return CleanGram(np.zeros((0, 0)), included, nonzero, norms, flags)
    sub = gram[np.ix_(nonzero, nonzero)]
    sub = 0.5 * sub + 0.5 * sub.T  # (not 0.5·(sub + subᵀ): entries near float64's max would overflow)
    inv = 1.0 / norms[nonzero]
    unit = sub * inv[:, None] * inv[None, :]
    eigenvalues, vectors = np.linalg.eigh(unit)
    if eigenvalues[0] < 0.0:
        flags["non_psd"] = bool(eigenvalues[0] < -NON_PSD_TOL)
        eigenvalues = np.maximum(eigenvalues, 0.0)
        unit = (vectors * eigenvalues) @ vectors.T
        unit = 0.5 * (unit + unit.T)
    flags["rank_deficient"] = bool(eigenvalues[0] < RANK_TOL * max(1.0, eigenvalues[-1]))
    return CleanGram(unit, included, nonzero, norms, flags)


def _vertex_or_uniform_fallback(unit: np.ndarray, c: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """A defined answer when OSQP fails: the best of the feasible uniform point and vertices."""
    n = unit.shape[0]
    slack = 1.0 - c @ lower
    candidates = [lower + slack * np.eye(n)[i] / c[i] for i in range(n)]
    candidates.append(lower + slack / (n * c))
    values = [x @ unit @ x for x in candidates]
    return candidates[int(np.argmin(values))]


def balancer_metrics(flags: dict[str, bool], included: np.ndarray) -> dict[str, float]:
    """The flags as metrics, plus ``balancer/degenerate`` (any flag) and the active count."""
    metrics = {f"balancer/{name}": float(value) for name, value in flags.items()}
    metrics["balancer/degenerate"] = float(any(flags.values()))
    metrics["balancer/active_rewards"] = float(included.sum())
    return metrics


# ---------------------------------------------------------------------------- min-norm QP
@dataclass
class MinNormResult:
    lam: np.ndarray           # (K,) on the simplex over the rewards in the problem, 0 elsewhere (all 0: none)
    weights: np.ndarray       # (K,) loss weights on the raw gradients
    metrics: dict[str, float]
    norms: np.ndarray         # (K,) gradient norms sqrt(G_kk), 0 for zero gradients and rewards out of the problem
    active: np.ndarray        # (K,) bool: rewards in the problem (active and finite)


def loss_weights(lam: np.ndarray, norms: np.ndarray, normalize: str) -> np.ndarray:
    """Loss weights on the raw gradients (SPEC §1.7).

    normalize="none": w = λ. normalize="unit": λ was solved for unit-norm gradients, so
    w_k = s·λ_k/‖g_k‖ with s the mean norm of the nonzero gradients (keeps the step's scale).
    ``norms`` is 0 for rewards without a direction (zero, non-finite or inactive).
    """
    nonzero = norms > 0
    if normalize == "none" or not nonzero.any():
        return lam.copy()
    scale = float(norms[nonzero].mean())
    return np.where(nonzero, scale * lam / np.where(nonzero, norms, 1.0), 0.0)


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
    """The MGDA min-norm problem min λᵀGλ s.t. λ ≥ λ_min, Σλ = 1, with OSQP, refined exactly.

    Solved in scaled variables μ = λ·‖g‖ (λ = Dμ, D = diag(1/‖g_k‖)): the Hessian D G D has
    unit diagonal whatever the gradient norms, and the simplex row becomes Σ D_k μ_k = 1
    (scaled to max coefficient 1), which OSQP's equilibration handles well. With
    normalize="unit" the problem is the one of the unit-norm gradients (D G D, Σμ = 1).

    The answer is the exact active-set solution (:func:`active_set_qp`) that OSQP's iterate
    identifies, so it does not depend on the warm start beyond round-off of one linear solve.
    A reward with an exactly zero gradient is the limit of a vanishing one: the hull then
    contains 0, so the min-norm point is d = 0 with all free weight on the zero gradients (split
    evenly); with a floor λ_min the zero gradients take the weight the floor leaves. With
    normalize="unit" a zero gradient has no direction and is left out (λ = 0).
    """

    def __init__(self, eps: float = 1e-9):
        self.qp = DenseQP(eps=eps)

    def state_dict(self) -> dict[str, Tensor]:
        return self.qp.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.qp.load_state_dict(state)

    def solve(self, gram: np.ndarray, normalize: str = "none", min_weight: float = 0.0,
              active: np.ndarray | None = None) -> MinNormResult:
        k = gram.shape[0]
        clean = sanitize_gram(gram, active)
        flags = clean.flags
        iterations = 0
        nonzero = clean.nonzero
        members = nonzero if normalize == "unit" else clean.included  # rewards that get weight
        zero = members & ~nonzero
        lam = np.zeros(k)
        if not members.any() or (normalize == "unit" and not nonzero.any()):
            members = np.zeros(k, dtype=bool)  # nothing to balance: all-zero weights
        elif zero.any() and min_weight == 0.0:
            lam[zero] = 1.0 / zero.sum()  # 0 is in the hull: d = 0
        elif nonzero.sum() == 1 and not zero.any():
            lam[nonzero] = 1.0
        else:
            norms = clean.norms[nonzero]
            # Simplex row Σλ = 1 in μ (λ = c·μ), scaled to max coefficient 1; floor λ ≥ m ⇔ μ ≥ m/c.
            c = 1.0 / norms if normalize == "none" else np.ones_like(norms)
            c = c / c.max()
            unit, lower = clean.unit, min_weight / c
            if zero.any():  # one slack variable σ = Σ_{zero} λ_k ≥ m·#zero, no curvature
                unit = np.pad(unit, ((0, 1), (0, 1)))
                c, lower = np.append(c, 1.0), np.append(lower, min_weight * zero.sum())
            mu, iterations, flags["solver_fallback"] = self._solve_scaled(unit, c, lower)
            if zero.any():
                lam[zero] = mu[-1] / zero.sum()
                mu, c = mu[:-1], c[:-1]
            lam[nonzero] = mu * c
        lam = _clean_simplex(lam, min_weight, members)
        with np.errstate(over="ignore"):  # norms spanning > 1e308: handled just below
            weights = loss_weights(lam, clean.norms, normalize)
        if not np.all(np.isfinite(weights)):
            weights, flags["solver_fallback"] = lam.copy(), True
        metrics = balancer_metrics(flags, clean.included)
        metrics["balancer/qp_iterations"] = float(iterations)
        return MinNormResult(lam, weights, metrics, clean.norms, clean.included)

    def _solve_scaled(self, unit: np.ndarray, c: np.ndarray, lower: np.ndarray
                      ) -> tuple[np.ndarray, int, bool]:
        """min μᵀHμ s.t. cᵀμ = 1, μ ≥ lower → (μ, OSQP iterations, fell back?)."""
        if not lower.any() and unit.shape[0] == 2:  # the segment's closest point, in closed form
            a, b, r = unit[0, 0] / c[0] ** 2, unit[1, 1] / c[1] ** 2, unit[0, 1] / (c[0] * c[1])
            spread = a + b - 2.0 * r  # ‖g_1 − g_2‖² in λ units
            t = 0.5 if not spread > 0 else min(max((b - r) / spread, 0.0), 1.0)
            return np.array([t / c[0], (1.0 - t) / c[1]]), 0, False
        if not lower.any():
            fast = _min_norm_by_bounds(unit, c)
            if fast is not None:
                return fast, 0, False
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
        # last resort (no input is known to reach it): the first candidate mapped onto the
        # feasible set {cᵀμ = 1, μ ≥ lower} (a plain normalization would undercut the floor)
        return _feasible_start(c, 1.0, lower, candidates[0]), result.iterations, not result.solved


def _min_norm_by_bounds(unit: np.ndarray, c: np.ndarray) -> np.ndarray | None:
    """min μᵀHμ s.t. cᵀμ = 1, μ ≥ 0 through the bound-constrained QP x* = argmin_{x ≥ 0}
    ½xᵀHx − cᵀx: its KKT conditions (Hx)_k ≥ c_k, with equality where x_k > 0, are the simplex
    problem's for μ = x*/cᵀx* (multiplier 1/cᵀx* = μᵀHμ). Solved exactly by
    :func:`box_qp_batch`; None when the min-norm point is (nearly) 0, where that QP is unbounded,
    or when the answer does not verify — the caller then uses OSQP and the active-set refinement.
    """
    n = unit.shape[0]
    x, _, converged = box_qp_batch(unit, np.zeros((1, n)), np.full((1, n), np.inf), q=-c[None, :],
                                   fallback=False)
    x = x[0]
    total = float(c @ x)
    if not converged[0] or not np.isfinite(total) or total <= 0 or total > 1e12:
        return None
    gradient = unit @ x - c
    tolerance = 1e-9 * (np.abs(unit) @ x + c)
    if np.any(gradient < -tolerance) or np.any(np.abs(gradient[x > 0]) > tolerance[x > 0]):
        return None
    return x / total


def _clean_simplex(lam: np.ndarray, min_weight: float, members: np.ndarray) -> np.ndarray:
    """Clip round-off below the floor and renormalize to Σλ = 1 over ``members`` (the rest
    keeps 0; no members: all 0)."""
    lam = np.where(np.isfinite(lam) & members, lam, 0.0)
    if not members.any():
        return lam
    lam = np.maximum(lam, np.where(members, min_weight, 0.0))
    total = lam.sum()
    if not total > 0:
        return np.where(members, 1.0 / members.sum(), 0.0)
    return lam / total


# --------------------------------------------------------------------------------- EMA etc.
def ema_update(previous: np.ndarray | None, current: np.ndarray, rho: float) -> np.ndarray:
    """λ_t = ρ·λ_{t−1} + (1−ρ)·λ*_t (a convex combination: stays on the simplex and above
    any floor both satisfy). The first solve has no history and is taken as is."""
    if previous is None:
        return current.copy()
    return rho * previous + (1.0 - rho) * current


# Flags that are ordinary situations, answered exactly: metrics only, no warning (two rewards
# with parallel gradients make any Gram rank-deficient; a step without an active reward is
# already named by the trainer's own warning).
QUIET_FLAGS = ("rank_deficient", "no_active")


def warn_degenerate(name: str, metrics: dict[str, float], stacklevel: int = 3) -> None:
    """One warning naming what was degenerate (Python shows each distinct message once), located
    at the caller of the balancer's ``weights`` (``stacklevel`` counts from this function)."""
    issues = [key.split("/", 1)[1] for key in (f"balancer/{f}" for f in DEGENERATE_FLAGS if f not in QUIET_FLAGS)
              if metrics.get(key, 0.0)]
    if issues:
        warnings.warn(f"balancer {name!r}: degenerate Gram matrix ({', '.join(issues)}); "
                      "used its defined answer (see the balancer's docs)", RuntimeWarning, stacklevel=stacklevel)


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


class WeightsBalancer(abc.ABC):
    """What balancers whose solve gives loss weights directly (upgrad, pcgrad, cagrad) share:
    the contract's :meth:`weights` around their ``solve(gram, active) -> (weights, metrics)``,
    λ = w/Σw for logging, the degenerate-step counter and the checkpointed state."""

    needs_gram = True
    summed_reward_weights = None
    gram_metric = "euclidean"
    name = "balancer"

    def __init__(self, num_rewards: int):
        self.num_rewards = check_num_rewards(num_rewards, f"balancer {self.name!r}")
        self.lam = uniform(num_rewards)
        self.degenerate_steps = 0
        self.metrics: dict[str, float] = {}

    @abc.abstractmethod
    def solve(self, gram: np.ndarray, active: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """(K,) loss weights and this solve's metrics (with ``balancer/degenerate``) for a float64 Gram."""

    def solve_step(self, gram: np.ndarray, step: int, active: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """This step's solve (a balancer that depends on the step, e.g. PCGrad's seeded order,
        overrides it)."""
        return self.solve(gram, active)

    def weights(self, gram: Tensor | None, step: int, active: Tensor | None = None) -> Tensor:
        where = f"balancer {self.name!r}"
        array = as_gram_array(gram, self.num_rewards, where)
        weights, metrics = self.solve_step(array, step, as_active_mask(active, self.num_rewards, where))
        self.degenerate_steps += int(metrics["balancer/degenerate"])
        metrics["balancer/degenerate_steps"] = float(self.degenerate_steps)
        metrics["balancer/weight_sum"] = float(weights.sum())
        self.metrics = metrics
        warn_degenerate(self.name, metrics)
        total = weights.sum()
        self.lam = to_tensor(weights / total if total > 0 else weights)
        return to_tensor(weights)

    def state_dict(self) -> dict[str, Tensor]:
        return {"lam": self.lam.clone(), "degenerate_steps": torch.tensor(float(self.degenerate_steps))}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        where = f"balancer {self.name!r}"
        self.lam = state_tensor(state, "lam", (self.num_rewards,), where)
        self.degenerate_steps = int(state_tensor(state, "degenerate_steps", (), where))


def accepts_active(balancer: object) -> bool:
    """Whether ``balancer.weights`` takes the ``active`` keyword (the current contract)."""
    try:
        parameters = inspect.signature(balancer.weights).parameters
    except (TypeError, ValueError):
        return False
    return "active" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def balance(balancer: Balancer, gram: Tensor | None, step: int, active: Tensor | None = None) -> Tensor:
    """The trainer's call: ``balancer.weights(gram, step, active=active)``.

    A balancer written before ``active`` existed gets a Gram whose inactive rows and columns
    are zero, and its weights of inactive rewards are set to 0 afterwards.
    """
    if accepts_active(balancer):
        return balancer.weights(gram, step, active=active)
    if active is None or gram is None or bool(active.all()):
        return balancer.weights(gram, step)
    mask = active.to(device=gram.device, dtype=torch.bool)
    keep = (mask[:, None] & mask[None, :]).to(gram.dtype)
    weights = balancer.weights(torch.where(keep.bool(), gram, torch.zeros_like(gram)), step)
    return torch.where(mask.to(weights.device), weights, torch.zeros_like(weights))


__all__ = [
    "Balancer", "CleanGram", "DenseQP", "MinNormQP", "MinNormResult", "QPResult", "WeightsBalancer",
    "accepts_active", "active_set_qp", "as_active_mask", "as_gram_array", "balance", "balancer_metrics",
    "box_qp_batch", "check_gram_metric", "check_max_weight", "check_min_weight", "check_normalize",
    "check_num_rewards", "ema_update", "kkt_residual", "loss_weights", "refine_active_set",
    "sanitize_gram", "solve_period_due", "state_tensor", "to_tensor", "uniform", "warn_degenerate",
]
