"""The proxy: client lifecycle (startup, TLS, authentication), the relay and its
engine, the byte streams of the hot path."""
