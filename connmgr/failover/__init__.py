"""Failover: detection, the decision, switchover, the point of failure, session
moves, fail-back and re-seed."""
