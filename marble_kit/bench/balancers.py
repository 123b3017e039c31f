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
            if index >= warmup:  # the first solves include OSQP's setup and factorization
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
