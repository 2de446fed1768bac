"""Operations: the admin console, the Prometheus endpoint, the command line."""
