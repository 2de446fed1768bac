"""connmgr: a transparent, native-protocol high-availability layer for PostgreSQL."""

__version__ = "0.1.0"
