"""Extra implementations from outside the package ("plugins"), named in ``SASA_BENCH_PLUGINS``.

A plugin is a module that calls ``sasa_impls.registry.register`` when imported: a dotted module name or
a path to a .py file, comma-separated in the environment variable. The runner passes the list to every
worker process, so each loads the same implementations; loading is idempotent (once per process).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

PLUGINS_ENV = "SASA_BENCH_PLUGINS"
_loaded: set[str] = set()


def plugin_specs() -> list[str]:
    """The plugin modules named in ``SASA_BENCH_PLUGINS``."""
    return [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]


def load_plugins(specs: list[str] | None = None) -> list[str]:
    """Import each plugin of ``specs`` (default: :func:`plugin_specs`) not imported yet; returns the specs."""
    specs = plugin_specs() if specs is None else specs
    for spec in specs:
        if spec in _loaded:
            continue
        if spec.endswith(".py"):
            name = "sasa_bench_plugin_" + re.sub(r"\W", "_", str(Path(spec).resolve()))
            module_spec = importlib.util.spec_from_file_location(name, spec)
            if module_spec is None:
                raise ValueError(f"{PLUGINS_ENV}: no such plugin file: {spec}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
        _loaded.add(spec)
    return specs
