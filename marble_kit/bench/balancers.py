"""Balancer benchmarks: solve time and exactness of every Gram balancer for K = 2…10 next to
torchjd's equivalents (`marble bench balancers`), and the conflicts of Adam's actual step per
Gram metric (`marble bench optimizer`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from marble_kit.balancing import MinNormQP, kkt_residual


def random_gram_sequence(num_rewards: int, steps: int, dim: int = 64, drift: float = 0.1,
                         seed: int = 0) -> list[np.ndarray]:
    """Grams of K slowly drifting gradients with norms spread over two orders of magnitude,
    like consecutive training steps (which is what warm starting exploits)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(num_rewards, dim))
    scales = 10.0 ** rng.uniform(-1, 1, size=(num_rewards, 1))
    grams = []
    for _ in range(steps):
        directions = directions + drift * rng.normal(size=directions.shape)
        grads = scales * directions
        grams.append(grads @ grads.T)
    return grams


BENCH_BALANCERS = ("mgda-qp", "upgrad", "pcgrad", "cagrad")


def upgrad_kkt_residual(gram: np.ndarray, weights: np.ndarray) -> float:
    """How far the UPGrad answer is from satisfying ⟨g_k, d⟩ ≥ 0 for every reward, relative to
    the size of the terms of ⟨g_k, d⟩ (0 when every reward is protected)."""
    gram_w = gram @ weights
    magnitude = np.maximum(np.abs(gram) @ np.abs(weights), 1e-300)
    return float(np.maximum(-gram_w / magnitude, 0.0).max())


def cagrad_kkt_residual(gram: np.ndarray, weights: np.ndarray, c: float) -> float:
    """Relative KKT residual of CAGrad's dual min_{w∈Δ} ⟨g_w, g0⟩ + c‖g0‖‖g_w‖ at the w* that
    the loss weights 1/n + t·w* encode (t = Σweights − 1)."""
    n = gram.shape[0]
    t = weights.sum() - 1.0
    w = (weights - 1.0 / n) / t
    b = gram.mean(axis=1)
    radius = c * np.sqrt(max(b.mean(), 0.0))
    norm = np.sqrt(max(w @ gram @ w, 1e-300))
    gradient = b + radius * (gram @ w) / norm
    support = w > 1e-12
    nu = gradient[support].mean()
    scale = np.abs(b).max() + radius * np.sqrt(np.diag(gram).max())
    violation = np.where(support, np.abs(gradient - nu), np.maximum(nu - gradient, 0.0))
    return float(violation.max() / scale)


def _torchjd_weightings(k: int) -> dict[str, Any] | None:
    """torchjd's equivalents (regularization off where it has it), or None if not installed."""
    try:
        from torchjd.aggregation import CAGradWeighting, MGDAWeighting, PCGradWeighting, UPGradWeighting
        from torchjd.linalg import QuadprogProjector
    except ImportError:
        return None
    upgrad = UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
    return {
        "mgda-qp": MGDAWeighting(),  # its default Frank-Wolfe (ε = 1e-3, 100 iterations)
        "upgrad": upgrad,
        "pcgrad": PCGradWeighting(),
        "cagrad": CAGradWeighting(c=0.4, norm_eps=0.0),
    }


def benchmark_balancers(ks: range | list[int] = range(2, 11), repeats: int = 100, warmup: int = 10,
                        seed: int = 0, balancers: tuple[str, ...] = BENCH_BALANCERS) -> list[dict[str, Any]]:
    """Per K and balancer: the median time of one ``weights`` call, torchjd's equivalent on the
    same Grams in the same run, and how exact each answer is.

    ``error`` is marble-kit's own: the relative KKT residual (mgda-qp, upgrad, cagrad) or, for
    pcgrad, the relative distance of d from torchjd's with the same projection orders.
    ``torchjd_max_error`` is torchjd's distance from the exact answer: relative objective gap for
    MGDA, relative distance of d for UPGrad and CAGrad. CAGrad gets repeats/10 solves (torchjd
    solves it with a conic solver, ~30 ms).
    """
    import torch

    from marble_kit.registry import build
    from marble_plugins.balancers.pcgrad import pcgrad_weights, random_orders

    rows = []
    for k in ks:
        reference = _torchjd_weightings(k)
        for name in balancers:
            count = warmup + (max(5, repeats // 10) if name == "cagrad" else repeats)
            grams = [torch.tensor(g) for g in random_gram_sequence(k, count, seed=seed + k)]
            options = {"c": 0.4} if name == "cagrad" else {}
            balancer = build("balancer", name, options, k)
            weighting = reference[name] if reference is not None else None
            answers, theirs, ours_ms, theirs_ms = [], [], [], []
            for step, gram in enumerate(grams):  # interleaved: both see the same machine load
                start = time.perf_counter()
                answers.append(balancer.weights(gram, step).numpy())
                middle = time.perf_counter()
                if weighting is not None:
                    theirs.append(weighting(gram).numpy())
                end = time.perf_counter()
                if step >= warmup:
                    ours_ms.append((middle - start) * 1e3)
                    theirs_ms.append((end - middle) * 1e3)
            answers, theirs = answers[warmup:], theirs[warmup:]
            grams = grams[warmup:]
            errors = []
            for step, (gram, weights) in enumerate(zip(grams, answers), start=warmup):
                array = gram.numpy()
                if name == "mgda-qp":
                    errors.append(kkt_residual(array, weights))
                elif name == "upgrad":
                    errors.append(upgrad_kkt_residual(array, weights))
                elif name == "cagrad":
                    errors.append(cagrad_kkt_residual(array, weights, 0.4))
                else:  # PCGrad's definition on the vectors' Gram, same orders
                    exact = pcgrad_weights(array, random_orders(k, 0, step)).sum(axis=0)
                    errors.append(_relative_d_error(array, weights, exact))
            row = {"K": k, "balancer": name, "median_ms": statistics.median(ours_ms), "max_error": max(errors),
                   "solves": len(ours_ms), "torchjd_median_ms": None, "torchjd_max_error": None,
                   "ratio_to_torchjd": None}
            if weighting is not None:
                row["torchjd_median_ms"] = statistics.median(theirs_ms)
                row["ratio_to_torchjd"] = row["median_ms"] / row["torchjd_median_ms"]
                gaps = []
                for gram, ours, their in zip(grams, answers, theirs):
                    array = gram.numpy()
                    if name == "mgda-qp":
                        exact_value = ours @ array @ ours
                        gaps.append(float((their @ array @ their - exact_value) / exact_value))
                    elif name != "pcgrad":  # PCGrad's random orders differ; same orders: the tests
                        gaps.append(_relative_d_error(array, their, ours))
                row["torchjd_max_error"] = max(gaps) if gaps else None
            rows.append(row)
    return rows


def _relative_d_error(gram: np.ndarray, weights: np.ndarray, reference: np.ndarray) -> float:
    """‖d − d_ref‖/‖d_ref‖ from the Gram: (w−r)ᵀG(w−r) / rᵀGr."""
    difference = weights - reference
    return float(np.sqrt(max(difference @ gram @ difference, 0.0) / max(reference @ gram @ reference, 1e-300)))


def machine_description() -> dict[str, str]:
    import osqp

    try:
        from importlib.metadata import version

        torchjd_version = version("torchjd")
    except Exception:  # not installed: the bench shows marble-kit's columns only
        torchjd_version = "not installed"
    return {
        "torchjd": torchjd_version,
        "cpu_cores": str(os.cpu_count()),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "osqp": osqp.__version__,
        "numpy": np.__version__,
    }


def write_json(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows plus the machine description as JSON (for docs/benchmarks.md and CI artifacts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=2))
    return path


def _toy_problem(num_rewards: int, dim: int, seed: int):
    """K noisy least-squares objectives L_k(θ) = ½‖A_k θ − b_k‖²/n with conflicting optima and
    badly scaled coordinates (so Adam's preconditioner matters)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    coordinate_scale = 10.0 ** torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    matrices = [torch.randn(3 * dim, dim, generator=generator, dtype=torch.float64) * coordinate_scale
                for _ in range(num_rewards)]
    targets = [torch.randn(3 * dim, generator=generator, dtype=torch.float64) for _ in range(num_rewards)]
    return generator, matrices, targets


def optimizer_conflict_benchmark(metrics: tuple[str, ...] = ("euclidean", "adam", "adam-momentum"),
                                 num_rewards: int = 3, dim: int = 40, steps: int = 150,
                                 lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                                 batch: int = 16, seeds: tuple[int, ...] = (0, 1, 2),
                                 weight_decay: float = 0.0, anchor: float = 0.0, max_norm: float = 0.0
                                 ) -> list[dict[str, Any]]:
    """How often the actual AdamW step conflicts with a reward (notes/conflict-experiment.md).

    Each step draws a minibatch of rows per objective, computes the K gradients, solves MGDA
    in the chosen Gram metric (:func:`marble_kit.gram.metric_gram`), writes the fused gradient
    and takes a real ``torch.optim.AdamW`` step. Reported: the fraction of steps whose worst
    reward cosine is negative against the fused gradient d and against the actual update −Δθ,
    and the mean worst cosine against the update.

    The margin of the momentum guarantee: min_k (⟨g_k, u⟩ − ⟨d, u⟩)/(‖g_k‖·‖u‖) for Adam's
    actual direction u = −Δθ (the guarantee says ≥ 0 with Adam's preconditioner frozen),
    worst over steps 0–1, 2–10 and after 10. ``weight_decay`` (AdamW's), ``anchor`` (an
    unbalanced pull ½·anchor·‖θ‖² added to the fused gradient) and ``max_norm`` (gradient
    clipping, 0 = off) exercise the terms the adam-momentum Gram now includes; for that metric
    the clip factor is solved with λ (:func:`marble_kit.gram.consistent_clip_scale`).
    """
    import torch

    from marble_kit.gram import (
        adam_momentum_parts,
        consistent_clip_scale,
        cosine_diagnostics,
        gram_matrix,
        metric_gram,
        update_cosines,
        write_flat_grad,
    )

    rows = []
    for metric in metrics:
        fused_conflicts = update_conflicts = 0
        worst_update = []
        margins = {"0-1": [], "2-10": [], ">10": []}
        for seed in seeds:
            generator, matrices, targets = _toy_problem(num_rewards, dim, seed)
            theta = torch.nn.Parameter(0.1 * torch.ones(dim, dtype=torch.float64))
            optimizer = torch.optim.AdamW([theta], lr=lr, betas=betas, weight_decay=weight_decay)
            solver = MinNormQP()

            def solve(gram, solver=solver):
                return torch.as_tensor(solver.solve(gram.numpy()).lam)

            for step in range(steps):
                grads = []
                for matrix, target in zip(matrices, targets):
                    rows_drawn = torch.randint(0, matrix.shape[0], (batch,), generator=generator)
                    residual = matrix[rows_drawn] @ theta.detach() - target[rows_drawn]
                    grads.append(matrix[rows_drawn].T @ residual / batch)
                grads = torch.stack(grads)
                pull = anchor * theta.detach()
                if metric == "adam-momentum":
                    parts = adam_momentum_parts(grads, optimizer, [theta], anchor=pull)
                    scale = consistent_clip_scale(parts, max_norm, solve) if max_norm > 0 else 1.0
                    gram = parts.gram(scale)
                else:
                    gram = metric_gram(grads, optimizer, [theta], metric=metric)
                lam = solve(gram)
                fused_cos = cosine_diagnostics(gram_matrix(grads), lam)["worst"]
                before = theta.detach().clone()
                fused = lam @ grads
                write_flat_grad([theta], fused + pull)
                if max_norm > 0:
                    torch.nn.utils.clip_grad_norm_([theta], max_norm)
                optimizer.step()
                update = before - theta.detach()
                worst = float(update_cosines(grads, update).min())
                margin = ((grads @ update - fused @ update) / (grads.norm(dim=1) * update.norm())).min()
                margins["0-1" if step < 2 else "2-10" if step <= 10 else ">10"].append(float(margin))
                fused_conflicts += fused_cos < -1e-9
                update_conflicts += worst < -1e-9
                worst_update.append(worst)
        total = steps * len(seeds)
        rows.append({
            "metric": metric,
            "conflict_rate_fused": fused_conflicts / total,
            "conflict_rate_update": update_conflicts / total,
            "mean_worst_cos_update": float(np.mean(worst_update)),
            "steps": total,
            **{f"worst_margin_steps_{bucket}": (min(values) if values else None)
               for bucket, values in margins.items()},
        })
    return rows
