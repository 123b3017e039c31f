"""Shared CLI plumbing: one-line errors with exit code 2, the rich console."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from marble_kit.errors import MarbleError

# Piped or redirected output (logs, CI, `| less`) gets 120 columns rather than rich's 80, so the
# eval and bench tables keep one line per row; $COLUMNS still wins, a terminal uses its width.
PIPE_WIDTH = None if os.environ.get("COLUMNS") else 120
console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)


def show_warnings_in_one_line() -> None:
    """Python warnings as ``warning: <message>`` on stderr (no file:line and source line: the
    message of a marble warning says what happened and what to do)."""

    def show(message, category, filename, lineno, file=None, line=None):
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MarbleError into ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MarbleError as exc:
            # escape: a message may hold brackets (`pip install 'marble-kit[wandb]'`), not markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no rich markup), for scripts."""
    typer.echo(json.dumps(data, indent=2, default=str))


def split_names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def names_option(text: str | None, flag: str) -> list[str] | None:
    """A comma-separated list option: None when not given; given but naming nothing
    (``--rewards ""``, ``--rewards ,``) is an error rather than a silent fall-back to defaults."""
    if text is None:
        return None
    names = split_names(text)
    if not names:
        raise MarbleError(f"{flag} {text!r} names nothing; pass {flag} NAME[,NAME...] "
                          "(`marble plugins` lists the installed ones) or leave the flag out")
    return names
