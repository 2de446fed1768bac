"""The protocol shadow: a sans-IO codec for the Postgres v3 protocol and the session state
it implies. Nothing in this package does I/O or imports trio, socket, scapy or pyroute2."""

from shadow.compiled import install, pure_requested

# the hot modules compiled when built and current, from source with CONNMGR_PURE_PYTHON=1
install(pure=pure_requested())
