"""Every exception class of connmgr says what a client sees of it: it carries a
``sqlstate`` (its own or inherited), or its docstring names the SQLSTATE or says it is
internal (never sent to a client as such). Checked on the source, so a new class cannot
slip through."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _exception_classes():
    """(path, class node, base names) of every class deriving from an exception."""
    found = {}
    for pkg in ("shadow", "replay", "connmgr"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                    found[node.name] = (path, node, bases)
    exceptionish = {"Exception", "ValueError", "RuntimeError"}
    changed = True
    while changed:  # the closure: classes deriving from exception classes of ours
        changed = False
        for name, (_p, _n, bases) in found.items():
            if name not in exceptionish and any(b in exceptionish for b in bases):
                exceptionish.add(name)
                changed = True
    return {n: v for n, v in found.items() if n in exceptionish}


def _has_sqlstate(node: ast.ClassDef) -> bool:
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "sqlstate" for t in targets):
            return True
    return "self.sqlstate" in ast.unparse(node)


def test_every_exception_class_says_what_a_client_sees():
    classes = _exception_classes()
    assert len(classes) >= 20, sorted(classes)  # the scan sees them

    def carries(name: str) -> bool:
        if name not in classes:
            return False
        _path, node, bases = classes[name]
        return _has_sqlstate(node) or any(carries(b) for b in bases)

    silent = []
    for name, (path, node, _bases) in sorted(classes.items()):
        doc = (ast.get_docstring(node) or "").lower()
        if not (carries(name) or "sqlstate" in doc or "internal" in doc):
            silent.append(f"{path.relative_to(ROOT)}: {name}")
    assert not silent, "exception classes that neither carry a SQLSTATE nor say they are internal:\n" + "\n".join(silent)

