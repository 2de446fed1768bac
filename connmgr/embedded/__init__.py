"""Embedded PostgreSQL for the demo, the tests and the labs: local clusters, the
cluster pair harness, connmgr in a thread, the demo and the fault campaign.
The runtime never imports this package (only the CLI's demo command does)."""
