"""The plugin registry: one pluggy PluginManager, entry points loaded once, name lookup.

Built-in plugins (package ``marble_plugins``) are registered through the ``marble`` entry-point
group exactly like third-party packages. ``MARBLE_LOAD_PLUGINS`` limits which *outside*
distributions load (comma-separated distribution names; empty string = built-ins only), which
keeps tests isolated from whatever else is installed.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from marble_kit import hookspecs
from marble_kit.errors import MarbleError

PROJECT = "marble"
# A registered name ending in FAMILY_SUFFIX (``remote:*``) stands for every ``remote:NAME``: the
# factory gets NAME as its first argument (e.g. the reward a server serves).
FAMILY_SUFFIX = ":*"
KINDS = ("reward", "balancer", "policy")
BUILTIN_DISTRIBUTION = "marble-kit"


@dataclass(frozen=True)
class PluginInfo:
    """One registered component: its name, factory, description and provider."""

    kind: str
    name: str
    factory: Callable[..., Any]
    description: str
    provider: str  # distribution (pip package) that registered it
    module: str


@dataclass
class Registry:
    """Name → PluginInfo for each kind of component."""

    entries: dict[str, dict[str, PluginInfo]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )

    def add(self, info: PluginInfo) -> None:
        table = self.entries[info.kind]
        if info.name in table:
            other = table[info.name]
            raise MarbleError(
                f"duplicate {info.kind} name {info.name!r}: registered by {other.provider} "
                f"({other.module}) and by {info.provider} ({info.module}); uninstall one of them "
                "or rename the plugin"
            )
        table[info.name] = info

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> PluginInfo:
        table = self.entries[kind]
        family = self._family(kind, name)
        if family is not None:
            return family
        if name not in table:
            installed = ", ".join(sorted(table)) or "none"
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MarbleError(
                f"unknown {kind} {name!r}{hint}; installed {kind}s: {installed} "
                "(run `marble plugins` to list them)"
            )
        return table[name]

    def _family(self, kind: str, name: str) -> PluginInfo | None:
        """``prefix:NAME`` resolved through a registered ``prefix:*`` (an exact name wins)."""
        prefix, sep, member = name.partition(":")
        family = self.entries[kind].get(prefix + FAMILY_SUFFIX) if sep and name not in self.entries[kind] else None
        if family is None:
            return None
        if not member.strip():
            raise MarbleError(f"{kind} {name!r} names no member of {family.name!r}; write {prefix}:NAME "
                              f"(e.g. {prefix}:ocr)")
        return PluginInfo(kind, name, functools.partial(family.factory, member), family.description,
                          family.provider, family.module)

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for info in self.entries[kind].values()]


def _allowed_outside_distributions() -> set[str] | None:
    value = os.environ.get("MARBLE_LOAD_PLUGINS")
    if value is None:
        return None  # load everything installed
    return {item.strip() for item in value.split(",") if item.strip()}


def _entry_point_distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown"


def create_plugin_manager() -> pluggy.PluginManager:
    """A fresh PluginManager with the hookspecs and every allowed ``marble`` entry point."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    allowed = _allowed_outside_distributions()
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = _entry_point_distribution(ep)
        if dist != BUILTIN_DISTRIBUTION and allowed is not None and dist not in allowed:
            continue
        if pm.get_plugin(f"{dist}:{ep.name}") is not None:
            continue  # the same distribution visible twice on sys.path
        try:
            module = ep.load()
        except Exception as exc:  # a broken outside plugin must not take the CLI down silently
            raise MarbleError(
                f"plugin entry point {ep.name!r} of {dist} ({ep.value}) failed to import: {exc}"
            ) from exc
        pm.register(module, name=f"{dist}:{ep.name}")
    return pm


def _collect(pm: pluggy.PluginManager) -> Registry:
    registry = Registry()
    hooks = {
        "reward": pm.hook.register_rewards,
        "balancer": pm.hook.register_balancers,
        "policy": pm.hook.register_policies,
    }
    for kind, hook in hooks.items():
        for impl in hook.get_hookimpls():
            provider = impl.plugin_name.split(":", 1)[0]
            module = getattr(impl.plugin, "__name__", str(impl.plugin))

            def register(name, factory, description="", _kind=kind, _prov=provider, _mod=module):
                registry.add(PluginInfo(_kind, name, factory, description, _prov, _mod))

            impl.function(register=register)
    return registry


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (entry points are loaded once)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = _collect(create_plugin_manager())
    return _REGISTRY


def registry_from_plugins(*plugins: Any) -> Registry:
    """A registry built from explicit plugin objects/modules only (for tests and notebooks)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for index, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", type(plugin).__name__)
        pm.register(plugin, name=f"{name}:{index}")
    return _collect(pm)


def build(kind: str, name: str, options: dict[str, Any] | None = None, *args: Any,
          registry: Registry | None = None) -> Any:
    """Build component ``name`` of ``kind`` with ``options``; bad options name the plugin."""
    info = (registry or get_registry()).get(kind, name)
    options = dict(options or {})
    check_options(info, options, positional=len(args))
    try:
        built = info.factory(*args, **options)
    except MarbleError:
        raise
    except (TypeError, ValueError) as exc:
        raise MarbleError(f"{kind} {name!r}: invalid options {options}: {exc}") from exc
    if kind == "reward":  # the hookspec allows any callable reward(images, prompts): wrap it
        from marble_kit.rewards import as_reward

        built = as_reward(built, name, info.provider)
    return built


def accepted_options(info: PluginInfo, positional: int = 0) -> dict[str, inspect.Parameter] | None:
    """The keyword options a factory accepts (None when it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(info.factory)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    usable = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    skipped = [p for p in usable if p.kind is p.POSITIONAL_OR_KEYWORD][:positional]
    return {p.name: p for p in usable if p not in skipped}


def check_options(info: PluginInfo, options: dict[str, Any], positional: int = 0) -> None:
    accepted = accepted_options(info, positional)
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise MarbleError(
            f"{info.kind} {info.name!r} has no option {unknown[0]!r}; valid options: {valid}"
        )
