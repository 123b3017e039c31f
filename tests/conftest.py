"""Test-wide settings: only built-in plugins load unless a test opts in."""

import os

import torch

# Outside plugins (e.g. an installed example package) stay out of the registry by default.
os.environ.setdefault("MARBLE_LOAD_PLUGINS", "")
# Two threads on two cores stall sporadically (notes/tiny-sd3.md); one thread is steady.
torch.set_num_threads(1)

# Property tests: no per-example deadline and no "too slow" health check (a loaded CI machine is
# not a failing property); each test sets its own max_examples. The examples are derandomized
# (the same on every run) so a clean clone passes or fails reproducibly; HYPOTHESIS_PROFILE=explore
# draws fresh random examples for hunting.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile("marble", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=True)
settings.register_profile("explore", parent=settings.get_profile("marble"), derandomize=False)
# `mutmut run` (pyproject.toml) only needs to know whether a property fails: no shrinking.
settings.register_profile("mutation", parent=settings.get_profile("marble"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "marble"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random FLUX.1 saved with FluxPipeline.save_pretrained (tests/tiny_flux.py), once
    per session: the `flux` policy loads it with `path=` like a downloaded FLUX.1-dev."""
    from tiny_flux import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "FLUX.1-tiny")
