"""Reward curves, balancing weights and gradient cosines of a run, as PNG (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from marble_kit.errors import MarbleError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MarbleError(f"{run_dir} has no metrics.jsonl; pass the --out directory of a `marble train` run")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise MarbleError(f"{path}:{number} is not valid JSON; the file is damaged") from None
    return rows


def _series(rows: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                steps, values = out.setdefault(key[len(prefix):], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def _plot(rows, prefix: str, title: str, ylabel: str, path: Path, zero_line: bool = False) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = _series(rows, prefix)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=name, lw=1.6 if name != "worst" else 2.2,
                ls="--" if name == "worst" else "-")
    if zero_line:
        ax.axhline(0.0, color="black", lw=0.8)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    """Lay out, write atomically as PNG (into ``path``.tmp, then renamed) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write plots/rewards.png, plots/weights.png, plots/cosines.png, plots/update_cosines.png
    (and plots/eval.png when the run evaluated during training)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise MarbleError(f"{run_dir}/metrics.jsonl is empty; plot after the first training step")
    out = run_dir / "plots"
    made = [
        _plot(rows, "reward/", "Mean reward per reward model (NaN-aware)", "reward", out / "rewards.png"),
        _plot(rows, "lambda/", "Balancing coefficients λ", "λ", out / "weights.png"),
        _plot(rows, "cos/", "Cosine of each reward gradient with the fused gradient", "cosine",
              out / "cosines.png", zero_line=True),
        _plot(rows, "cos_update/", "Cosine of each reward gradient with the actual update", "cosine",
              out / "update_cosines.png", zero_line=True),
        _plot(rows, "eval_delta/", "Held-out change per reward (eval_every)", "Δ / base std",
              out / "eval.png", zero_line=True),
    ]
    return [p for p in made if p is not None]
