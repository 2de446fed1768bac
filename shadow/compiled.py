"""Which of the relay's hot modules run compiled, and the switch that runs them as Python.

``pip install -e .`` compiles :data:`MODULES` with Cython (the ``ext-modules`` of
pyproject.toml); the extension sits beside the source and Python's import system prefers
it. The source stays
the definition -- the compiled module is the same code -- and must keep working on its own:
with ``CONNMGR_PURE_PYTHON=1`` in the environment (read when :mod:`shadow` is first
imported) the sources are imported instead; CI runs the suite both ways. A source newer
than its extension (edited or checked out since the build) is imported as source too, with
a warning, so a stale build never runs old code.

Each compiled module starts with ``# cython: annotation_typing=False``: its annotations stay
documentation, as in Python (Cython would otherwise enforce ``bytes`` and reject the
bytearray a caller may pass). C types come only from the ``.pxd`` beside a module.

``connmgr serve`` logs which way they run at start (``hot path: compiled`` or
``hot path: pure Python``), and ``connmgr --version`` says it too.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings

__all__ = ["MODULES", "PURE_ENV", "extension_of", "hot_path", "install", "is_compiled", "pure_requested", "report"]

#: the modules pyproject.toml compiles: the relay's per-message path and the latency
#: histogram it feeds per request; the mirror's records on the primary and their import on
#: the secondary
MODULES = (
    "shadow.framing", "shadow.session", "connmgr.proxy.relay", "connmgr.proxy.engine", "connmgr.metrics",
    "replay.mirror_protocol", "connmgr.pair.mirror", "replay.import_queue", "connmgr.pair.import_process",
)  # fmt: skip
PURE_ENV = "CONNMGR_PURE_PYTHON"


class _SourceFirst:
    """A meta-path finder for :data:`MODULES`: the ``.py`` file when pure Python is asked
    for, when nothing was compiled, or when the source is newer than its extension (a stale
    build: an edit or a checkout since the last ``pip install -e .``, said once per module);
    otherwise it steps aside and the extension is imported as usual."""

    pure = False

    @classmethod
    def find_spec(cls, name: str, path=None, target=None):
        if name not in MODULES or not path:
            return None
        leaf = name.rpartition(".")[2]
        for folder in path:
            source = os.path.join(folder, leaf + ".py")
            if not os.path.exists(source):
                continue
            if not cls.pure:
                built = extension_of(source)
                if built is not None and os.path.getmtime(built) >= os.path.getmtime(source):
                    return None  # the extension is current: the usual machinery loads it
                if built is not None:
                    warnings.warn(f"{built} is older than {source}: running the source (pip install -e . rebuilds)",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
            loader = importlib.machinery.SourceFileLoader(name, source)
            return importlib.util.spec_from_file_location(name, source, loader=loader)
        return None


def extension_of(source: str) -> str | None:
    """The compiled extension beside ``source`` (a .py path), or None."""
    stem = source[:-3]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(stem + suffix):
            return stem + suffix
    return None


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def install(pure: bool) -> None:
    """Put the finder in front of the import system (idempotent); ``pure``: always the
    sources."""
    _SourceFirst.pure = _SourceFirst.pure or pure
    if _SourceFirst not in sys.meta_path:
        sys.meta_path.insert(0, _SourceFirst)


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
