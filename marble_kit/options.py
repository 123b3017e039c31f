"""Plugin options from the command line: ``--reward-opt hps.weights=/path``."""

from __future__ import annotations

from typing import Any

import tomllib

from marble_kit.errors import MarbleError


def parse_value(text: str) -> Any:
    """A TOML scalar (``3``, ``0.5``, ``true``, ``"x"``, ``[1, 2]``); otherwise the raw string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_plugin_options(items: list[str] | None, flag: str) -> dict[str, dict[str, Any]]:
    """``["hps.weights=/p", "ocr.threads=1"]`` → ``{"hps": {"weights": "/p"}, "ocr": {...}}``."""
    parsed: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not sep or not dot or not name or not option:
            raise MarbleError(
                f"{flag} {item!r} is malformed; write it as NAME.OPTION=VALUE "
                f"(e.g. {flag} hps.weights=/models/HPS_v2.1_compressed.pt)"
            )
        parsed.setdefault(name, {})[option] = parse_value(value.strip())
    return parsed


def merge_options(base: dict[str, dict[str, Any]], override: dict[str, dict[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    merged = {name: dict(opts) for name, opts in base.items()}
    for name, opts in override.items():
        merged.setdefault(name, {}).update(opts)
    return merged
