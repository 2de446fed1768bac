"""The protocol shadow: a sans-IO codec for the Postgres v3 protocol and the session state
it implies. Nothing in this package does I/O or imports trio, socket, scapy or pyroute2."""
