"""Test-wide settings: only built-in plugins load unless a test opts in."""

import os

import torch

# Outside plugins (e.g. an installed example package) stay out of the registry by default.
os.environ.setdefault("MARBLE_LOAD_PLUGINS", "")
# Two threads on two cores stall sporadically (notes/tiny-sd3.md); one thread is steady.
torch.set_num_threads(1)
