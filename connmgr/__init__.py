"""connmgr: a transparent, native-protocol high-availability layer for PostgreSQL."""

__version__ = "0.1.0"

import shadow  # noqa: F401,E402 -- applies CONNMGR_PURE_PYTHON to connmgr's compiled modules too
