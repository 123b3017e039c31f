"""A pytest plugin for ``mutmut run`` only (``[tool.mutmut]`` in pyproject.toml loads it with ``-p``).

mutmut runs the tests in ``mutants/``, on a mutated copy of the sources that it puts first on
``sys.path``, and names each module after its path. ``marble_kit/`` is imported under its own
name from there, but ``marble_plugins`` is the ``plugins/`` directory (setuptools package-dir),
which the editable install would import from the unmutated tree. This plugin:

* imports ``marble_plugins.X`` as the mutated ``plugins.X`` (the same module object under both
  names), so the balancer plugins' mutants are live and mutmut finds their tests;
* imports diffusers' SD3 pipeline class (tens of seconds) once in mutmut's fork server, which
  every worker inherits, instead of in each worker's first training test;
* runs a mutant of module M only with the test files that ``[tool.marble-kit.mutation-tests]``
  lists for M (its own unit tests: mutmut alone would also run every training test that happens
  to call the function, which makes each surviving mutant cost minutes); a mutant that none of
  them reaches is reported as "no tests";
* runs the tests fastest first (mutmut's recorded durations), so a killing test stops the run
  (mutmut passes ``-x``) before the slower ones start.

The normal test run never loads it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ALIAS, TARGET = "marble_plugins", "plugins"


class _PluginsAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``marble_plugins[.X]`` → the module ``plugins[.X]`` (imported first, then shared)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == ALIAS or fullname.startswith(ALIAS + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(TARGET + spec.name[len(ALIAS):])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has just set __spec__ to the alias's spec: give the module its own back
        module.__spec__ = module.__spec__.loader_state


def _in_mutants() -> bool:
    """True in mutmut's copy of the tree (where its workers run the tests)."""
    return Path.cwd().name == "mutants" and (Path.cwd() / TARGET / "__init__.py").is_file()


def _install_alias() -> None:
    if not _in_mutants():
        return
    if any(isinstance(finder, _PluginsAlias) for finder in sys.meta_path):
        return
    if ALIAS in sys.modules and not sys.modules[ALIAS].__name__ == TARGET:
        raise RuntimeError(f"{ALIAS} was imported before the mutation plugin: its mutants would not be live")
    sys.meta_path.insert(0, _PluginsAlias())


_install_alias()

_durations: dict[str, float] | None = None


def _recorded_durations() -> dict[str, float]:
    """Test durations from mutmut's stats run (empty before it has run)."""
    global _durations
    if _durations is None:
        try:
            _durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
        except (OSError, ValueError, KeyError):
            return {}
    return _durations


def pytest_configure(config):
    if _in_mutants():
        from marble_plugins.policies.sd3 import sd3_pipeline_class

        sd3_pipeline_class()


def _test_files_for(module: str) -> list[str] | None:
    """The test files pyproject.toml lists for ``module`` (its longest listed dotted prefix)."""
    try:
        table = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["marble-kit"]["mutation-tests"]
    except (OSError, KeyError):
        return None
    keys = [key for key in table if module == key or module.startswith(key + ".")]
    return table[max(keys, key=len)] if keys else None


def pytest_collection_modifyitems(session, config, items):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    files = _test_files_for(mutant.rpartition(".")[0]) if "__mutmut_" in mutant else None
    if files is not None:
        dropped = [item for item in items if item.nodeid.split("::")[0] not in files]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if item.nodeid.split("::")[0] in files]
    durations = _recorded_durations()
    if durations:
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
