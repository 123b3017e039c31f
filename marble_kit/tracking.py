"""Experiment trackers (``report_to``): TensorBoard event files and/or Weights & Biases.

Every metrics line that goes to ``metrics.jsonl`` also goes to each tracker at its step, and
every sample grid as an image. The libraries write their own formats (torch's
``SummaryWriter`` for TensorBoard, ``wandb`` for W&B); this module only routes the numbers.

A tracker never stops training: a tracker that fails (to start, to log or to close) is
reported once as a :class:`TrackerWarning` and dropped, and the run goes on without it. A
tracker package that is not installed is a one-line :class:`MarbleError` before the run starts.

Resume: TensorBoard's writer reopens with ``purge_step`` = the first step to recompute, so
events written after the checkpoint (by a crash) are superseded, as in ``metrics.jsonl``. The
W&B run id is kept in ``RUN/tracking.json``, so a resumed run continues the same W&B run at
its own steps (offline, each process writes its own ``offline-run-*`` folder with that id;
``wandb sync`` joins them).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from marble_kit.config import TRACKERS, TrainConfig
from marble_kit.errors import MarbleError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
TRACKING_FILE = "tracking.json"
DEFAULT_WANDB_PROJECT = "marble-kit"
# The module each tracker imports, and the extra that installs it.
REQUIREMENTS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class TrackerWarning(UserWarning):
    """A tracker failed; training goes on without it."""


def check_trackers(names: Iterable[str]) -> None:
    """Every tracker in ``names`` can be imported; otherwise a one-line error naming the extra."""
    import importlib

    for name in names:
        if name not in TRACKERS:
            raise MarbleError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, extra = REQUIREMENTS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MarbleError(f"--report-to {name} needs the {extra} package ({exc}); install it with "
                              f"pip install 'marble-kit[{extra}]'") from None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics line (``step`` and labels such as ``gram_mode`` left out)."""
    return {key: float(value) for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardBackend:
    """Scalars and images in ``RUN/tensorboard`` through torch's ``SummaryWriter``."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / TENSORBOARD_DIR
        # purge_step: TensorBoard's readers drop the events of earlier event files at or after
        # this step: the steps a resume recomputes (or all of a start from scratch).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else 0)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_image(self, tag: str, image: Any, step: int, caption: str) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbBackend:
    """The run in Weights & Biases (``wandb``; files in ``RUN/wandb`` unless ``$WANDB_DIR`` is set).

    ``$WANDB_MODE=offline`` writes locally and never touches the network; ``$WANDB_PROJECT``
    and ``$WANDB_ENTITY`` choose where an online run goes (default project ``marble-kit``).
    """

    name = "wandb"

    def __init__(self, run_dir: Path, config: TrainConfig):
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # console="off": wandb's stdout capture would fight the progress bar; the metrics are the record.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
                              name=run_dir.name, id=_stored_wandb_id(run_dir), resume="allow", dir=str(directory),
                              settings=wandb.Settings(console="off"))
        try:
            self.run.config.update(config.to_dict(), allow_val_change=True)
            _store_wandb_id(run_dir, self.run.id)
        except Exception:
            self.run.finish(exit_code=1)
            raise
        self.wandb = wandb

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, image: Any, step: int, caption: str) -> None:
        self.run.log({tag: self.wandb.Image(image, caption=caption)}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _stored_wandb_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / TRACKING_FILE).read_text()).get("wandb_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _store_wandb_id(run_dir: Path, run_id: str) -> None:
    path = run_dir / TRACKING_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"wandb_run_id": run_id}, indent=2) + "\n")
    tmp.replace(path)


class Tracker:
    """All of a run's trackers behind one object; a failing tracker is warned about and dropped.

    Use it as a context manager (closed at the end, also when training raises).
    """

    def __init__(self, backends: Iterable[Any] = ()):
        self.backends = list(backends)

    @property
    def names(self) -> list[str]:
        return [backend.name for backend in self.backends]

    def _call(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # a tracker must never stop training
                self.backends.remove(backend)
                _warn(backend.name, f"{method} failed", exc)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One metrics line (numeric entries) at ``step`` (default: the line's own ``step``)."""
        if self.backends:
            self._call("log_metrics", scalars(metrics), int(metrics["step"] if step is None else step))

    def log_image(self, tag: str, path: str | Path, step: int, caption: str = "") -> None:
        """A PNG written by the run (a sample grid) as an image at ``step``."""
        if not self.backends:
            return
        from PIL import Image

        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as exc:
            _warn("tracking", f"cannot read {path}", exc)
            return
        self._call("log_image", tag, image, int(step), caption or f"step {step}")

    def close(self, failed: bool = False) -> None:
        self._call("close", failed)
        self.backends = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def _warn(name: str, what: str, exc: BaseException) -> None:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    warnings.warn(f"tracker {name}: {what} ({type(exc).__name__}: {text}); training goes on without it",
                  TrackerWarning, stacklevel=3)


def open_tracker(config: TrainConfig, start_step: int = 0) -> Tracker:
    """The trackers of ``config.report_to`` for its run directory, continuing after ``start_step``.

    A tracker that cannot start is a :class:`TrackerWarning`; the others still open.
    """
    run_dir = Path(config.out)
    factories = {"tensorboard": lambda: TensorBoardBackend(run_dir, start_step),
                 "wandb": lambda: WandbBackend(run_dir, config)}
    backends = []
    for name in config.report_to:
        try:
            backends.append(factories[name]())
        except Exception as exc:
            _warn(name, "could not start", exc)
    return Tracker(backends)
