"""WAL log sequence numbers (LSNs) as plain ints, and their text form.

Postgres shows an LSN (a 64-bit byte position in the WAL) as two hexadecimal halves,
``16/B374D848`` = ``0x16_B374D848``. In the replication protocol it travels as an
unsigned 64-bit integer; we keep it as a Python ``int`` everywhere and convert only at the
edges (SQL text, logs). ``0`` (``0/0``) is InvalidXLogRecPtr: "no position".
"""

from __future__ import annotations

import re

__all__ = ["INVALID_LSN", "MAX_LSN", "Lsn", "format_lsn", "parse_lsn"]

#: An LSN is an int in [0, 2**64).
Lsn = int
#: InvalidXLogRecPtr, shown as ``0/0``.
INVALID_LSN: Lsn = 0
MAX_LSN: Lsn = (1 << 64) - 1

# exactly what pg_lsn_in accepts: 1-8 hex digits, a slash, 1-8 hex digits; nothing else
# (int(x, 16) would also take "0x", "_", "+" and surrounding blanks)
_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> Lsn:
    """Return the int for ``"16/B374D848"``. Raises ``ValueError`` on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"LSN must be a string like '16/B374D848', not {type(text).__name__}")
    match = _LSN_RE.fullmatch(text)
    if match is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(f"invalid LSN {shown!r}: expected two hex numbers like '16/B374D848'")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(lsn: Lsn) -> str:
    """Return Postgres's text form (``"16/B374D848"``). Raises ``ValueError`` unless
    ``0 <= lsn < 2**64``."""
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN must be an int in [0, 2**64), not {lsn!r}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
