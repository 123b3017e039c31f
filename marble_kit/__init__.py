"""marble-kit: multi-reward RL fine-tuning of text-to-image diffusion models.

MARBLE (Multi-Aspect Reward BaLancE) on top of the DiffusionNFT training loop. The library
(`marble_kit`) holds the math, the training loop and the plugin registry; built-in plugins live
in `marble_plugins` and the Typer CLI in `marble_cli`.
"""

from marble_kit.errors import MarbleError

__version__ = "0.1.0"
__all__ = ["MarbleError", "__version__"]
