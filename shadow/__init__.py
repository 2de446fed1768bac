"""The protocol shadow: a sans-IO codec for the Postgres v3 protocol and the session state
it implies. Nothing in this package does I/O or imports trio, socket, scapy or pyroute2."""

from shadow.compiled import prefer_sources, pure_requested

if pure_requested():  # CONNMGR_PURE_PYTHON=1: the hot modules from source (shadow/compiled.py)
    prefer_sources()
