"""shadow/ is sans-IO: it must not import sockets, trio, scapy, pyroute2 or any connmgr code.
The same holds for the pure-logic modules of replay/ (queues, matching) once they exist."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"socket", "ssl", "trio", "scapy", "pyroute2", "asyncio", "selectors", "psycopg", "connmgr", "threading", "subprocess"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


SHADOW_FILES = sorted((ROOT / "shadow").glob("*.py")) + [
    ROOT / "replay" / name for name in ("lsn.py", "pgoutput.py", "import_queue.py", "markers.py", "session_state.py")
    if (ROOT / "replay" / name).exists()
]


@pytest.mark.parametrize("path", SHADOW_FILES, ids=lambda p: p.name)
def test_shadow_module_does_no_io(path):
    bad = imported_modules(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; it must stay sans-IO"


def test_the_check_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import trio\nfrom socket import socket\nfrom . import sibling\n")
    assert imported_modules(probe) & FORBIDDEN == {"trio", "socket"}


def test_ruff_is_clean():
    """The lint rules in pyproject.toml hold for the whole tree (ruff is a test extra)."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
