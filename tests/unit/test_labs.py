"""The labs' scripts start: each one's ``--help`` exits 0 (their argument parsers are built
from shared pieces, labs/benchkit, where two options can clash unseen until a run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "labs").glob("*.py"))


def test_there_are_labs() -> None:
    assert {"bench_pair.py", "bench_proxy.py", "cpu_per_tx.py", "secondary_import.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_lab_script_shows_its_help(script: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "labs" / script), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
