"""Build: the relay's hot modules compiled with Cython, when it can be.

The modules in :data:`shadow.compiled.MODULES` are plain Python (they run as they are, and
``CONNMGR_PURE_PYTHON=1`` makes them do so even where a compiled copy exists). Here they are
also compiled to C extensions, which Python prefers to the source beside them; the
``.pxd`` file next to a module, if any, gives Cython the C types of its hot loops. Cython
comes from the build requirements (pyproject.toml); gcc and the Python headers are on every
machine we support. A build that fails anyway is reported and the install goes on in pure
Python (``connmgr doctor``-style check: ``python -m shadow.compiled``).

``CONNMGR_PURE_PYTHON=1`` at install time skips the compilation.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

MODULES = ["shadow/framing.py", "shadow/session.py", "connmgr/proxy/relay.py", "connmgr/proxy/engine.py"]


class OptionalBuildExt(build_ext):
    """Compile if possible; otherwise say why and install the pure-Python modules."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 -- any compiler failure means: stay pure
            _warn(f"compiling the hot path failed ({e}); connmgr runs in pure Python")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            _warn(f"compiling {ext.name} failed ({e}); it runs in pure Python")


def _warn(text: str) -> None:
    print(f"connmgr build: {text}", file=sys.stderr)


def _extensions() -> list:
    if os.environ.get("CONNMGR_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed; connmgr runs in pure Python")
        return []
    return cythonize(
        MODULES,
        build_dir="build/cython",
        quiet=True,
        compiler_directives={"language_level": "3", "binding": True},
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
