"""Which of the relay's hot modules run compiled, and the switch that runs them as Python.

``pip install -e .`` compiles :data:`MODULES` with Cython (the ``ext-modules`` of
pyproject.toml); the extension sits beside the source and Python's import system prefers
it. The source stays
the definition -- the compiled module is the same code -- and must keep working on its own:
with ``CONNMGR_PURE_PYTHON=1`` in the environment (read when :mod:`shadow` is first
imported) the sources are imported instead; CI runs the suite both ways.

``connmgr serve`` logs which way they run at start (``hot path: compiled`` or
``hot path: pure Python``), and ``connmgr --version`` says it too.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["MODULES", "PURE_ENV", "hot_path", "is_compiled", "prefer_sources", "pure_requested", "report"]

#: the modules pyproject.toml compiles (the relay's per-message path)
MODULES = ("shadow.framing", "shadow.session", "connmgr.proxy.relay", "connmgr.proxy.engine")
PURE_ENV = "CONNMGR_PURE_PYTHON"


class _SourceFirst:
    """A meta-path finder that loads :data:`MODULES` from their ``.py`` files."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name not in MODULES or not path:
            return None
        leaf = name.rpartition(".")[2]
        for folder in path:
            source = os.path.join(folder, leaf + ".py")
            if os.path.exists(source):
                loader = importlib.machinery.SourceFileLoader(name, source)
                return importlib.util.spec_from_file_location(name, source, loader=loader)
        return None


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def prefer_sources() -> None:
    """Import :data:`MODULES` from source from now on (idempotent)."""
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def is_compiled(module: object) -> bool:
    """Is ``module`` an extension (not Python source)?"""
    return not str(getattr(module, "__file__", "") or "").endswith(".py")


def report() -> dict[str, bool]:
    """``{module: compiled?}`` for :data:`MODULES` (imports them)."""
    return {name: is_compiled(importlib.import_module(name)) for name in MODULES}


def hot_path() -> str:
    """"compiled", "pure Python", or "partly compiled (...)" naming the compiled ones."""
    compiled = [name for name, c in report().items() if c]
    if len(compiled) == len(MODULES):
        return "compiled"
    return f"partly compiled ({', '.join(compiled)})" if compiled else "pure Python"
