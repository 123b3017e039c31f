"""The Typer application behind the `marble` console script."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="marble",
    help="Multi-reward RL fine-tuning of text-to-image diffusion models (MARBLE on DiffusionNFT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """marble-kit: multi-reward RL fine-tuning of text-to-image diffusion models."""
    from marble_cli.common import show_warnings_in_one_line

    show_warnings_in_one_line()


# One module per command (or command group); each exposes `register(app)`.
COMMAND_MODULES = (
    "marble_cli.train_cmd",
    "marble_cli.eval_cmd",
    "marble_cli.bench_cmd",
    "marble_cli.plot_cmd",
    "marble_cli.compare_cmd",
    "marble_cli.plugins_cmd",
    "marble_cli.score_cmd",
    "marble_cli.serve_cmd",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()  # warnings become one line in the root callback, for every command


if __name__ == "__main__":
    main()
