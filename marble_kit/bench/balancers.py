"""Balancer benchmarks: OSQP min-norm solve time for K = 2…10 (`marble bench balancers`)."""

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


def benchmark_qp(ks: range | list[int] = range(2, 11), repeats: int = 200, warmup: int = 20,
                 seed: int = 0, normalize: str = "none") -> list[dict[str, Any]]:
    """Median / p90 wall time (ms) of one min-norm solve per K, and the worst KKT residual."""
    rows = []
    for k in ks:
        solver = MinNormQP()
        grams = random_gram_sequence(k, warmup + repeats, seed=seed + k)
        times, residuals, iterations = [], [], []
        for index, gram in enumerate(grams):
            start = time.perf_counter()
            result = solver.solve(gram, normalize)
            elapsed = time.perf_counter() - start
            if index >= warmup:  # the first solves start cold (no warm start or adapted ρ yet)
                times.append(elapsed * 1e3)
                iterations.append(result.metrics["balancer/qp_iterations"])
                if normalize == "none":
                    residuals.append(kkt_residual(gram, result.lam))
        times.sort()
        rows.append({
            "K": k,
            "median_ms": statistics.median(times),
            "p90_ms": times[int(0.9 * (len(times) - 1))],
            "mean_osqp_iterations": float(np.mean(iterations)),
            "max_kkt_residual": max(residuals) if residuals else float("nan"),
            "solves": len(times),
        })
    return rows


def machine_description() -> dict[str, str]:
    import osqp

    return {
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
                                 batch: int = 16, seeds: tuple[int, ...] = (0, 1, 2)
                                 ) -> list[dict[str, Any]]:
    """How often the actual AdamW step conflicts with a reward (notes/conflict-experiment.md).

    Each step draws a minibatch of rows per objective, computes the K gradients, solves MGDA
    in the chosen Gram metric (:func:`marble_kit.gram.metric_gram`), writes the fused gradient
    and takes a real ``torch.optim.AdamW`` step. Reported: the fraction of steps whose worst
    reward cosine is negative against the fused gradient d and against the actual update −Δθ,
    and the mean worst cosine against the update.
    """
    import torch

    from marble_kit.gram import (
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
        for seed in seeds:
            generator, matrices, targets = _toy_problem(num_rewards, dim, seed)
            theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
            optimizer = torch.optim.AdamW([theta], lr=lr, betas=betas, weight_decay=0.0)
            solver = MinNormQP()
            for _ in range(steps):
                grads = []
                for matrix, target in zip(matrices, targets):
                    rows_drawn = torch.randint(0, matrix.shape[0], (batch,), generator=generator)
                    residual = matrix[rows_drawn] @ theta.detach() - target[rows_drawn]
                    grads.append(matrix[rows_drawn].T @ residual / batch)
                grads = torch.stack(grads)
                gram = metric_gram(grads, optimizer, [theta], metric=metric)
                lam = torch.as_tensor(solver.solve(gram.numpy()).lam)
                fused_cos = cosine_diagnostics(gram_matrix(grads), lam)["worst"]
                before = theta.detach().clone()
                write_flat_grad([theta], lam @ grads)
                optimizer.step()
                worst = float(update_cosines(grads, before - theta.detach()).min())
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
        })
    return rows
