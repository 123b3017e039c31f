"""The `marble` command line: a thin Typer layer over `marble_kit` (no math here)."""
