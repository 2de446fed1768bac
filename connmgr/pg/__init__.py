"""Talking to PostgreSQL servers: backend login and whole-message reads, the
replication-protocol reader, the redo monitor and reconnect back-off."""
