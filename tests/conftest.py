"""Test-wide settings: only built-in plugins load unless a test opts in."""

import os

import torch

# Outside plugins (e.g. an installed example package) stay out of the registry by default.
os.environ.setdefault("MARBLE_LOAD_PLUGINS", "")
# Two threads on two cores stall sporadically (notes/tiny-sd3.md); one thread is steady.
torch.set_num_threads(1)

# CI machines are shared: no per-example deadline, no "too slow" health check (a loaded machine
# is not a failing property). Each test still sets its own max_examples.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("marble", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("marble")
