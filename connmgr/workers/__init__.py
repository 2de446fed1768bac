"""``[server] workers = N``: N processes serve the clients of one connmgr.

How it works
------------
``connmgr serve`` with ``workers > 1`` runs a :class:`~connmgr.workers.supervisor.Supervisor`
instead of serving clients itself:

1. It *reserves* every listen address: a socket bound with ``SO_REUSEPORT`` that never
   listens (port 0 becomes a real port here, once for all workers). A socket that does not
   listen gets no connections; it only keeps the port while workers come and go.
2. It starts N workers (``connmgr _worker FD``, each a whole connmgr of its own: relay
   engine, registry, auth), hands each its configuration, its number and the reserved
   addresses over a control socket, and waits for each to say it listens. Every worker
   binds the same addresses with ``SO_REUSEPORT``; the kernel spreads new connections
   over them by a hash of the connection's addresses.
3. It serves what must be one for all: the metrics endpoint (every worker's families,
   each sample labelled ``worker``), the console's fleet-wide answers (SHOW CLIENTS,
   SERVERS, STATS, WORKERS), shutdown, and cancel routing.
4. A worker that dies is started again (its clients lost their connections, as they would
   with a single process); one that cannot start at all stops the supervisor with its
   error.

Cancel requests. A CancelRequest is a new connection, so it lands on any worker. A
worker's number is in the top bits of every virtual pid it hands out
(:meth:`connmgr.proxy.registry.Registry.register_key`); a worker that gets a key of
another sends it to the supervisor, which passes it to the owner.

Limits. ``max_clients`` is the total: each worker takes ``ceil(max_clients / N)``.

The pair. On the pair's primary connmgr every worker mirrors its own sessions, and the
failover is decided once, by the supervisor, for all workers
(:mod:`connmgr.failover.fleet`). The secondary connmgr's roles (one import queue and
poster slot for the pair) and the host takeover run in one process: the configuration
refuses ``workers > 1`` with ``[mirror] listen`` or ``[host]``.

The control protocol (:mod:`connmgr.workers.control`) is length-prefixed JSON over a Unix
socket pair, one per worker: requests carry an ``id`` and get one reply with ``re`` set
to it; notifications have no ``id``.
"""

#: SHOW WORKERS: what the supervisor says of each worker (or a single process of itself)
WORKER_COLUMNS = ["worker", "pid", "clients", "uptime_s", "restarts"]
