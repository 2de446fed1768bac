"""The compiled hot path (pyproject.toml ext-modules, shadow/compiled.py): built by pip install -e ., and
CONNMGR_PURE_PYTHON=1 runs the same modules from source."""

from __future__ import annotations

import importlib.machinery
import os
import re
import subprocess
import sys
from pathlib import Path

from shadow.compiled import MODULES, PURE_ENV, extension_of, pure_requested, report

ROOT = Path(__file__).resolve().parents[2]


def _files(env_value: str) -> dict[str, str]:
    """Each module's file, each imported first in a process of its own (whichever package
    a program imports first, the choice is made before a compiled module loads)."""
    env = {**os.environ, PURE_ENV: env_value}
    code = "import importlib,sys; m = sys.argv[1]; print(m, importlib.import_module(m).__file__)"
    files = {}
    for module in MODULES:
        out = subprocess.run([sys.executable, "-c", code, module], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True).stdout  # fmt: skip
        name, path = out.split()
        files[name] = path
    return files


def test_the_hot_path_runs_the_way_the_environment_says() -> None:
    compiled = report()
    if pure_requested():
        assert not any(compiled.values()), compiled
    else:  # CI and the README install with pip install -e ., which compiles
        assert all(compiled.values()), f"not compiled: {compiled} (rebuild with pip install -e .)"


def test_pure_python_imports_the_sources_whatever_was_built() -> None:
    files = _files("1")
    assert sorted(files) == sorted(MODULES)
    for name, path in files.items():
        assert path.endswith(name.rpartition(".")[2] + ".py"), (name, path)


def test_without_the_switch_a_current_extension_beside_the_source_is_preferred() -> None:
    files = _files("")
    for name, path in files.items():
        source = str(Path(path).with_name(name.rpartition(".")[2] + ".py"))
        built = extension_of(source)
        current = built is not None and os.path.getmtime(built) >= os.path.getmtime(source)
        assert path.endswith(".so") == current, (name, path, built)


def test_a_stale_extension_is_not_run(tmp_path: Path) -> None:
    """A source edited after the build runs as source, with a warning."""
    pkg = tmp_path / "shadow"
    pkg.mkdir()
    for f in ("__init__.py", "compiled.py", "errors.py"):
        (pkg / f).write_text((ROOT / "shadow" / f).read_text())
    (pkg / "framing.py").write_text("WHICH = 'source'\n")
    built = pkg / ("framing" + importlib.machinery.EXTENSION_SUFFIXES[0])
    built.write_bytes(b"not an extension")
    os.utime(built, (1, 1))  # older than the source
    code = "import shadow.framing as f; print(f.WHICH)"
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env={**os.environ, PURE_ENV: ""})  # fmt: skip
    assert r.stdout.strip() == "source", r.stderr
    assert "is older than" in r.stderr


def test_no_compiled_module_cimports_another() -> None:
    """A stale build is judged per module (the source runs instead of an old extension), so
    a compiled module must not depend at C level on another: its import would fail
    whenever that one runs from source."""
    ours = re.compile(r"^\s*(from\s+(shadow|replay|connmgr)\S*\s+cimport|cimport\s+(shadow|replay|connmgr))", re.M)
    for module in MODULES:
        pxd = ROOT / (module.replace(".", "/") + ".pxd")
        if pxd.exists():
            assert not ours.search(pxd.read_text()), f"{pxd} cimports another compiled module"
