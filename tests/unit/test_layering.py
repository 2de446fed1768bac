"""The layers, checked on the tree as it is (every file, found by directory).

* ``shadow/`` and ``replay/`` are sans-IO: no sockets, trio, threads, subprocesses or
  drivers, and no connmgr code.
* Arrows run one way: shadow <- replay <- connmgr. shadow imports neither of the others,
  replay imports shadow only.
* ``connmgr.embedded`` (local clusters, the harnesses, the demo, the campaign) is never
  imported by the runtime; only the command line reaches it, for ``connmgr demo``.
* Inside ``connmgr``, the base (config, errors, metrics, ``auth``, ``pg``) imports nothing
  above it, and only the composition root's users (``ops.cli``, ``embedded``) import
  ``connmgr.app``: every other component is handed what it uses.
* No import cycle between modules, counting imports under ``if TYPE_CHECKING`` and inside
  functions (so neither can hide one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shadow", "replay", "connmgr")
LAYER = {"shadow": 0, "replay": 1, "connmgr": 2}
FORBIDDEN = {"socket", "ssl", "trio", "scapy", "pyroute2", "asyncio", "selectors", "psycopg", "connmgr",
             "threading", "subprocess"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved; ``from pkg import
    mod`` gives ``pkg.mod`` when that is a module of ours). ``top_level_only``: leave out
    imports inside functions and under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.If) and _is_type_checking(child))
            if isinstance(child, ast.Import) and not (top_level_only and nested):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not (top_level_only and nested):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    mod = ".".join([*base, child.module] if child.module else base)
                else:
                    mod = child.module or ""
                found.add(mod)
                for alias in child.names:
                    if f"{mod}.{alias.name}" in MODULES:
                        found.add(f"{mod}.{alias.name}")
            visit(child, inner)

    visit(tree, False)
    return found


def graph(top_level_only: bool = False) -> dict[str, set[str]]:
    return {m: {i for i in imports_of(p, top_level_only) if i in MODULES and i != m} for m, p in MODULES.items()}


def cycles(g: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


SANS_IO = sorted(p for pkg in ("shadow", "replay") for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io_module_does_no_io(path):
    bad = {i.split(".")[0] for i in imports_of(path)} & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; it must stay sans-IO"


def test_arrows_run_from_connmgr_to_replay_to_shadow():
    wrong = sorted((m, i) for m, deps in graph().items() for i in deps
                   if LAYER[i.split(".")[0]] > LAYER[m.split(".")[0]])  # fmt: skip
    assert not wrong, f"imports from a lower layer to a higher one: {wrong}"


def test_the_runtime_never_imports_the_embedded_package():
    allowed = {"connmgr.ops.cli"}  # `connmgr demo`, lazily
    wrong = sorted((m, i) for m, deps in graph().items() for i in deps
                   if i.startswith("connmgr.embedded") and not m.startswith("connmgr.embedded")
                   and m not in allowed)  # fmt: skip
    assert not wrong, f"runtime modules importing connmgr.embedded: {wrong}"


def test_no_import_cycle():
    found = [sorted(c) for c in cycles(graph())]
    assert not found, f"import cycles (TYPE_CHECKING and function-level imports count): {found}"


#: the base of connmgr: what every component may use, and which uses no component
BASE = ("connmgr.config", "connmgr.errors", "connmgr.metrics", "connmgr.auth", "connmgr.pg")


def test_the_base_imports_no_component():
    def in_base(m: str) -> bool:
        return m in ("connmgr", *BASE) or m.startswith(tuple(b + "." for b in BASE))

    wrong = sorted((m, i) for m, deps in graph().items() for i in deps
                   if in_base(m) and i.startswith("connmgr") and not in_base(i))  # fmt: skip
    assert not wrong, f"the base of connmgr imports a component above it: {wrong}"


def test_only_the_command_line_builds_the_application():
    allowed = ("connmgr.ops.cli", "connmgr.embedded")
    wrong = sorted(m for m, deps in graph().items() if "connmgr.app" in deps and not m.startswith(allowed))
    assert not wrong, f"modules that take the whole application instead of what they use: {wrong}"


def test_the_checks_see_what_they_look_for():
    probe = ROOT / "shadow" / "_probe_for_the_layering_test.py"
    assert not probe.exists()
    probe.write_text("import trio\nfrom socket import socket\nfrom . import framing\n"
                     "if TYPE_CHECKING:\n    from connmgr import app\ndef f():\n    from replay import lsn\n")
    try:
        assert imports_of(probe) >= {"trio", "socket", "shadow", "shadow.framing", "connmgr", "connmgr.app",
                                     "replay", "replay.lsn"}  # fmt: skip
        assert "connmgr.app" not in imports_of(probe, top_level_only=True)
    finally:
        probe.unlink()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_ruff_is_clean():
    """The lint rules in pyproject.toml hold for the whole tree (ruff is a test extra)."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
