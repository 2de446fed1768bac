"""Configuration: frozen dataclasses, loaded from a TOML file and/or command-line flags.

A TOML file has one table per dataclass below (``[server]``, ``[primary]``, ``[auth]``,
``[tls]``, ``[metrics]``). Every key is checked: an unknown key, a value of the wrong type
or out of range is refused at start with the key named, e.g.
``config.toml: [server] max_clients: expected an integer >= 1, got "many"``.

Defaults are what a single ``connmgr serve --listen A --primary B`` needs: trust toward
clients, the client's own user name toward the backend, no TLS, no metrics endpoint.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

from connmgr.errors import ConfigError
from shadow.framing import PQ_LARGE_MESSAGE_LIMIT

#: the smallest [server] max_buffered_message: below it streaming costs more than it saves
STREAM_MINIMUM = 64 << 10
#: what streams when it is longer than [server] max_buffered_message, by direction
STREAMED_FROM_CLIENT = b"QPBFd"
STREAMED_FROM_SERVER = b"Dd"

AUTH_TYPES = ("trust", "md5", "scram-sha-256")
RELAY_MODES = ("engine", "tasks")
MIRROR_MODES = ("one-phase", "two-phase")
FAILBACK_MODES = ("stay", "return", "manual")
CLIENT_TLS_MODES = ("disable", "allow", "require")
SERVER_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class ServerSection:
    """``[server]``: connmgr's own listener and limits."""

    listen: tuple[str, ...] = ("127.0.0.1:6432",)
    max_clients: int = 1000
    #: seconds a client may take from connect to the end of authentication
    handshake_timeout: float = 15.0
    #: seconds a client may sit idle outside a transaction; 0 = never time out
    client_idle_timeout: float = 0.0
    #: seconds a client may sit idle inside a transaction; 0 = never time out
    idle_in_transaction_timeout: float = 0.0
    #: seconds SIGTERM waits for open transactions to finish before closing them
    shutdown_timeout: float = 30.0
    #: largest protocol message accepted from a client or a server (bytes; a client also
    #: gets Postgres's smaller limits for the short message types, shadow/framing.py)
    max_message_size: int = PQ_LARGE_MESSAGE_LIMIT
    #: longest message connmgr holds whole (bytes). A longer Query, Parse, Bind,
    #: FunctionCall or CopyData from a client, or DataRow or CopyData from a server, is
    #: relayed as it arrives, looked at by its first bytes only: it gets no purge marker
    #: (a failover with it in flight in autocommit cannot move the session: 08006), a
    #: Parse of that size cannot be prepared again after a move, and the secondary does not
    #: keep it. 0 = hold every message whole (up to max_message_size)
    max_buffered_message: int = 8 << 20
    #: how sessions are relayed: "engine" (one task pumps every plain-TCP session over
    #: one epoll set; fastest) or "tasks" (two trio tasks per session; TLS always uses these)
    relay: str = "engine"
    #: users allowed into the admin console (database "connmgr"); empty = any user that
    #: authenticates (read-only SHOW commands only)
    admin_users: tuple[str, ...] = ()
    #: processes serving clients, sharing the listen port (SO_REUSEPORT; connmgr/workers/).
    #: 1 = this process serves them itself. With N > 1 a supervisor process runs N
    #: workers and owns the metrics endpoint; max_clients is split between the workers
    workers: int = 1


#: the most [server] workers: a worker's number lives in the top bits of its virtual pids
MAX_WORKERS = 64


@dataclass(frozen=True, slots=True)
class BackendSection:
    """``[primary]``: the Postgres server behind connmgr."""

    host: str = "127.0.0.1"
    port: int = 5432
    name: str = "primary"
    connect_timeout: float = 5.0
    #: log in to the backend as this user instead of the client's (empty = client's user)
    user: str = ""
    #: password for the backend login; empty = use the client's secret (users file,
    #: auth query or SCRAM pass-through) or none (trust)
    password: str = ""
    tls: str = "disable"
    tls_ca_file: str = ""


@dataclass(frozen=True, slots=True)
class AuthSection:
    """``[auth]``: how connmgr authenticates clients."""

    #: trust | md5 | scram-sha-256 ; empty = scram-sha-256 when a users file or an auth
    #: query is configured, trust otherwise
    type: str = ""
    users_file: str = ""
    #: look secrets up in the backend with this query, logged in as auth_user
    auth_query: str = ""
    auth_user: str = ""
    auth_password: str = ""
    auth_dbname: str = "postgres"
    #: secret that makes the fake SCRAM salts for unknown users stable across restarts
    mock_key: str = ""


@dataclass(frozen=True, slots=True)
class TlsSection:
    """``[tls]``: TLS toward clients."""

    mode: str = "disable"
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True, slots=True)
class MetricsSection:
    """``[metrics]``: the Prometheus endpoint (``host:port``; empty = off)."""

    listen: str = ""


@dataclass(frozen=True, slots=True)
class MirrorSection:
    """``[mirror]``: the stream of every session's messages to the secondary connmgr."""

    #: primary: host:port of the secondary's mirror listener ("" = not mirroring); on a
    #: host pair's secondary (with [host] and listen), where it mirrors once it has taken
    #: over: the other host's listener, for when that host joins again (connmgr/host/rejoin.py)
    peer: str = ""
    #: secondary: host:port to accept the primary's mirror stream on ("" = off)
    listen: str = ""
    #: unacknowledged records kept for deltas; beyond, the oldest go and the secondary resyncs
    max_buffer_bytes: int = 64 << 20
    heartbeat_interval: float = 0.1
    #: primary: a secondary that has sent nothing (it acknowledges every heartbeat) for this
    #: many seconds is taken as gone: the link is dropped and made again (a WARNING, and
    #: connmgr_mirror_peer_silent_total), instead of waiting on a peer that holds the TCP
    #: connection open and says nothing
    peer_timeout: float = 3.0
    #: embed purge markers (a row of connmgr.markers naming the session and transaction,
    #: see replay/markers.py) in writing transactions, and capture DDL for the secondary
    markers: bool = True
    #: "one-phase": acknowledgements go to the client at once, the mirror follows;
    #: "two-phase": a writing transaction's commit acknowledgement is held until the
    #: secondary connmgr has acknowledged the mirrored reply
    mode: str = "one-phase"
    #: two-phase: how long a held acknowledgement waits for the secondary; past it the
    #: primary degrades to one-phase (metric connmgr_mirror_two_phase_active 0, a WARNING)
    #: and returns to two-phase once the secondary has caught up again
    two_phase_timeout: float = 0.5


@dataclass(frozen=True, slots=True)
class RedoSection:
    """``[redo]``: the redo monitor's own session on the primary (needed when mirroring)."""

    user: str = "postgres"
    password: str = ""
    dbname: str = "postgres"
    #: seconds between two samples of pg_current_wal_insert_lsn()
    interval: float = 0.005
    #: seconds between two samples while no session is active (redo_monitor.py)
    idle_interval: float = 0.25


@dataclass(frozen=True, slots=True)
class PosterSection:
    """``[poster]``: secondary role -- where the poster queue is read from: a logical slot
    (pgoutput) of connmgr's own on the *primary* database."""

    host: str = ""  # "" = no poster queue
    port: int = 5432
    user: str = "postgres"
    password: str = ""
    dbname: str = "postgres"
    slot: str = "connmgr_poster"
    #: "connmgr_poster" (created by ``connmgr prepare-db``) publishes only the marker rows:
    #: all the poster needs. A FOR ALL TABLES publication works too (costlier to decode;
    #: it also counts commits made without connmgr as unmatched_commits).
    publication: str = "connmgr_poster"
    #: a temporary slot disappears with the connection (tests); a permanent one resumes
    temporary: bool = False
    #: replay DDL captured on the primary (replay/markers.py) on this connmgr's own
    #: database, as ``ddl_user`` (default: ``user``; must be able to SET ROLE to the DDL's
    #: authors and refresh subscriptions -- a superuser)
    replay_ddl: bool = True
    ddl_user: str = ""
    ddl_password: str = ""
    #: seconds between two sequence catch-up rounds (connmgr/pair/sequence_sync.py; 0 = off),
    #: and how many increments ahead of the primary the secondary's sequences are kept
    sequence_interval: float = 1.0
    sequence_lead: int = 1000


@dataclass(frozen=True, slots=True)
class FailoverSection:
    """``[failover]``: primary role -- moving live sessions to the secondary database
    when the primary database dies (connmgr/failover/controller.py)."""

    #: host:port of the secondary database ("" = no failover: a lost backend ends the
    #: session with 08006, as without a pair)
    secondary: str = ""
    #: connmgr's own session on the secondary: reads the marker rows and disables the
    #: subscriptions at the point of failure (a superuser, or the subscriptions' owner)
    user: str = "postgres"
    password: str = ""
    dbname: str = "postgres"
    #: a primary that does not accept a connection within this many seconds is dead
    detect_timeout: float = 0.3
    #: seconds between health checks of the primary while nothing else says anything
    health_interval: float = 0.1
    #: how long a client waits for its session to move before it gets an error (08006)
    max_wait: float = 30.0
    #: largest open transaction (requests + replies, bytes) kept for replay; a larger one
    #: is rolled back at a move with a retryable 40001
    max_replay_bytes: int = 8 << 20
    #: at the point of failure every column-owned sequence is set this many increments past
    #: the largest value in its column on the survivor
    sequence_lead: int = 1000
    #: a switchover (admin SWITCHOVER) waits at most this long for every session to finish
    #: its request in flight; if one does not, the switchover is abandoned
    drain_timeout: float = 10.0
    #: after a move (connmgr/failover/reseed.py): "stay" -- the secondary stays the primary; once
    #: the old primary answers again it is re-seeded as the new secondary (without a copy
    #: after a switchover; after a crash its replicated tables are emptied and copied);
    #: "return" -- the same, then a switchover back to [primary]; "manual" -- nothing until
    #: an admin runs RESEED (connmgr reseed), for whoever wants to look at the old primary
    #: (after a crash it may hold commits never acknowledged, which a re-seed discards)
    #: before it rejoins
    failback: str = "stay"
    #: seconds between two probes of the old primary after a move (stay and return)
    reseed_interval: float = 1.0
    #: how long a re-seed may take (the copy, then the wait for the synchronous standbys)
    reseed_timeout: float = 600.0


@dataclass(frozen=True, slots=True)
class HostSection:
    """``[host]``: host takeover (issue 14) -- when host A (connmgr and database) dies,
    host B takes the VIP and every client's TCP connection. Off while ``vip`` is empty.
    Needs CAP_NET_ADMIN and CAP_NET_RAW, the ``[net]`` extra, an etcd cluster (a member
    on each host and a witness) and a copy of host A's frames on host B's ``capture``
    interface (a switch's mirror port, ``tc mirred``)."""

    #: the address clients connect to, with its prefix length ("198.18.0.100/24")
    vip: str = ""
    #: the port clients connect to on the VIP (the leader listens there)
    port: int = 5432
    #: the interface the VIP is added to (and gratuitous ARP sent on)
    interface: str = "eth0"
    #: the interface the copies of host A's frames arrive on ("" = ``interface``)
    capture: str = ""
    #: every etcd member's client URL ("http://198.18.0.3:2379")
    etcd: tuple[str, ...] = ()
    #: the leader key; only its holder may hold the VIP and serve
    key: str = "/connmgr/leader"
    #: this connmgr's name in the leader key ("" = the host name)
    name: str = ""
    #: the lease behind the key, in seconds; a holder steps down lease_margin before it
    #: can expire, and renews every renew_interval. lease_ttl - lease_margin must outlast
    #: etcd electing a new raft leader (up to twice its --election-timeout) plus one
    #: renew_interval, or the death of etcd's leader (the witness, say) makes the primary
    #: step down and host B take over for nothing (losslessly, a pause of about lease_ttl):
    #: the default 2 s wants etcd electing within 0.5 s (--election-timeout 250..400 on a
    #: LAN, as the lab runs it); with etcd's default 1 s election timeout use 4 s
    lease_ttl: float = 2.0
    lease_margin: float = 0.5
    renew_interval: float = 0.5
    #: how long one etcd request may take before the next member is asked
    etcd_timeout: float = 0.3
    #: move sessions with a transaction open or a request in flight to this host, as the
    #: database failover does (replayed from host B's replica of them); false: such
    #: sessions end with 08006 (their transaction did not commit unless acknowledged)
    move_transactions: bool = True


@dataclass(frozen=True, slots=True)
class PolicySection:
    """``[policy]``: the access rules of the analysis layer (shadow/policy/): a TOML file of
    client classes and what each may not do (empty = no policy)."""

    file: str = ""
    #: seconds between two reads of a database's catalog (views, SQL functions) while
    #: restricted clients use it
    catalog_refresh: float = 2.0
    #: seconds a statement on an object under maintenance waits before it fails (55P03)
    maintenance_wait: float = 30.0
    #: where policy versions are pushed (``connmgr policy push``) and activated by every
    #: connmgr at one instant (connmgr/proxy/policy_sync.py): "database" (tables in the
    #: primary database, replicated with it) or "none"
    store: str = "database"
    #: the database holding the store ("" = [redo] dbname)
    store_database: str = ""
    #: seconds between two looks for a store that does not exist yet
    store_poll: float = 5.0
    #: logins fail (08006) until the store has been read once (else they get the
    #: [policy] file, or no policy, while it cannot be read)
    store_required: bool = False
    #: seconds between two reads of the store's objects under maintenance
    maintenance_poll: float = 0.5
    #: this connmgr's name in the store ("" = host:pid:token)
    member: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    primary: BackendSection = field(default_factory=BackendSection)
    auth: AuthSection = field(default_factory=AuthSection)
    tls: TlsSection = field(default_factory=TlsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    mirror: MirrorSection = field(default_factory=MirrorSection)
    redo: RedoSection = field(default_factory=RedoSection)
    poster: PosterSection = field(default_factory=PosterSection)
    failover: FailoverSection = field(default_factory=FailoverSection)
    host: HostSection = field(default_factory=HostSection)
    policy: PolicySection = field(default_factory=PolicySection)

    @property
    def auth_type(self) -> str:
        if self.auth.type:
            return self.auth.type
        if self.auth.users_file or self.auth.auth_query:
            return "scram-sha-256"
        return "trust"


DEFAULT_AUTH_QUERY = "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1"


def parse_hostport(
    text: str, *, default_port: int | None = None, what: str = "address", allow_zero: bool = False
) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; ConfigError when malformed.
    ``allow_zero`` admits port 0 (listen on any free port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{what}: expected host:port, got {text!r}")
        host, port_text = text, str(default_port)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port must be a number, got {port_text!r}") from None
    if not host or not (0 if allow_zero else 1) <= port < 65536:
        raise ConfigError(f"{what}: expected host:port with port 1-65535, got {text!r}")
    return host, port


def load(path: str | Path | None = None, **overrides: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a TOML file (optional) and per-section overrides.

    ``overrides`` maps a section name to ``{key: value}``; they win over the file. Raises
    :class:`ConfigError` naming the file, section and key of anything wrong.
    """
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for section, values in overrides.items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})

    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{name}] (known: {', '.join(sections)})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        built[name] = _build(sections[name].default_factory, value, f"{source}: [{name}]")
    config = Config(**built)
    _check(config, source)
    return config


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where} unknown key {key!r} (known: {', '.join(fields)})")
        kwargs[key] = _coerce(fields[key].type, value, f"{where} {key}")
    return cls(**kwargs)


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    kind = eval(annotation, {"tuple": tuple}) if isinstance(annotation, str) else annotation  # noqa: S307
    if get_origin(kind) is tuple:
        (item,) = get_args(kind)[:1]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{where}: expected a list of {item.__name__}s, got {value!r}")
        return tuple(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must be >= 0, got {value!r}")
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _check(config: Config, source: str) -> None:
    s = config.server
    if s.max_clients < 1:
        raise ConfigError(f"{source}: [server] max_clients: must be >= 1, got {s.max_clients}")
    if not 1024 <= s.max_message_size <= PQ_LARGE_MESSAGE_LIMIT:
        raise ConfigError(f"{source}: [server] max_message_size: must be between 1024 and {PQ_LARGE_MESSAGE_LIMIT}"
                          f" (Postgres takes no longer message), got {s.max_message_size}")
    if s.max_buffered_message and s.max_buffered_message < STREAM_MINIMUM:
        raise ConfigError(f"{source}: [server] max_buffered_message: must be 0 (hold every message whole) or at"
                          f" least {STREAM_MINIMUM}, got {s.max_buffered_message}")
    if s.relay not in RELAY_MODES:
        raise ConfigError(f"{source}: [server] relay: must be one of {', '.join(RELAY_MODES)}, got {s.relay!r}")
    if not s.listen:
        raise ConfigError(f"{source}: [server] listen: at least one address is required")
    if not 1 <= s.workers <= MAX_WORKERS:
        raise ConfigError(f"{source}: [server] workers: must be 1-{MAX_WORKERS}, got {s.workers}")
    if s.workers > s.max_clients:
        raise ConfigError(f"{source}: [server] workers: {s.workers} workers cannot share max_clients = {s.max_clients}"
                          " (each takes an equal share)")  # fmt: skip
    if s.workers > 1:
        roles = [name for name, on in (("[mirror] listen", config.mirror.listen), ("[host] vip", config.host.vip)) if on]
        if roles:
            raise ConfigError(f"{source}: [server] workers = {s.workers} with {', '.join(roles)}: the secondary"
                              " connmgr of a pair and a host pair's connmgr run one worker (the import queue and"
                              " the host takeover are not split across processes); set workers = 1")  # fmt: skip
    for addr in s.listen:
        parse_hostport(addr, what=f"{source}: [server] listen", allow_zero=True)
    p = config.primary
    if not 0 < p.port < 65536:
        raise ConfigError(f"{source}: [primary] port: must be 1-65535, got {p.port}")
    if p.tls not in SERVER_TLS_MODES:
        raise ConfigError(f"{source}: [primary] tls: must be one of {', '.join(SERVER_TLS_MODES)}, got {p.tls!r}")
    a = config.auth
    if a.type and a.type not in AUTH_TYPES:
        raise ConfigError(f"{source}: [auth] type: must be one of {', '.join(AUTH_TYPES)}, got {a.type!r}")
    if config.auth_type != "trust" and not (a.users_file or a.auth_query):
        raise ConfigError(
            f"{source}: [auth] type = {config.auth_type!r} needs users_file or auth_query"
            " to check passwords against"
        )
    if a.auth_query and not a.auth_user:
        raise ConfigError(f"{source}: [auth] auth_query needs auth_user")
    if a.users_file and not Path(a.users_file).is_file():
        raise ConfigError(f"{source}: [auth] users_file: no such file {a.users_file!r}")
    t = config.tls
    if t.mode not in CLIENT_TLS_MODES:
        raise ConfigError(f"{source}: [tls] mode: must be one of {', '.join(CLIENT_TLS_MODES)}, got {t.mode!r}")
    if t.mode != "disable" and not (t.cert_file and t.key_file):
        raise ConfigError(f"{source}: [tls] mode = {t.mode!r} needs cert_file and key_file")
    for key in ("peer", "listen"):
        if getattr(config.mirror, key):
            parse_hostport(getattr(config.mirror, key), what=f"{source}: [mirror] {key}", allow_zero=key == "listen")
    if config.mirror.mode not in MIRROR_MODES:
        raise ConfigError(
            f"{source}: [mirror] mode: must be one of {', '.join(MIRROR_MODES)}, got {config.mirror.mode!r}"
        )
    if config.mirror.two_phase_timeout <= 0:
        raise ConfigError(f"{source}: [mirror] two_phase_timeout: must be > 0")
    if config.mirror.heartbeat_interval <= 0:
        raise ConfigError(f"{source}: [mirror] heartbeat_interval: must be > 0")
    if not config.mirror.peer_timeout > 2 * config.mirror.heartbeat_interval:
        raise ConfigError(f"{source}: [mirror] peer_timeout: must be more than twice heartbeat_interval"
                          f" ({config.mirror.heartbeat_interval:g} s): the secondary answers at each heartbeat")
    if config.redo.interval <= 0:
        raise ConfigError(f"{source}: [redo] interval: must be > 0")
    if config.redo.idle_interval < config.redo.interval:
        raise ConfigError(f"{source}: [redo] idle_interval: must be at least interval ({config.redo.interval:g} s),"
                          f" got {config.redo.idle_interval:g}")  # fmt: skip
    if config.metrics.listen:
        parse_hostport(config.metrics.listen, what=f"{source}: [metrics] listen", allow_zero=True)
    f = config.failover
    if f.secondary:
        parse_hostport(f.secondary, what=f"{source}: [failover] secondary")
        if not config.mirror.peer:
            raise ConfigError(f"{source}: [failover] secondary needs [mirror] peer (the pair: markers decide"
                              " which interrupted commits committed)")  # fmt: skip
    for key in ("detect_timeout", "health_interval", "max_wait", "drain_timeout", "reseed_interval",
                "reseed_timeout"):
        if getattr(f, key) <= 0:
            raise ConfigError(f"{source}: [failover] {key}: must be > 0")
    if f.max_replay_bytes < 0:
        raise ConfigError(f"{source}: [failover] max_replay_bytes: must be >= 0")
    if f.sequence_lead < 1:
        raise ConfigError(f"{source}: [failover] sequence_lead: must be >= 1")
    _check_host(config, source)
    if config.policy.maintenance_wait <= 0:
        raise ConfigError(f"{source}: [policy] maintenance_wait: must be > 0 (seconds a statement on an object under"
                          f" maintenance waits before it fails with 55P03), got {config.policy.maintenance_wait}")
    if config.policy.store not in ("database", "none"):
        raise ConfigError(f"{source}: [policy] store: \"database\" (policy versions in tables of the primary"
                          f" database) or \"none\", got {config.policy.store!r}")
    if config.policy.maintenance_poll <= 0:
        raise ConfigError(f"{source}: [policy] maintenance_poll: must be > 0, got {config.policy.maintenance_poll}")
    if config.policy.store_poll <= 0:
        raise ConfigError(f"{source}: [policy] store_poll: must be > 0, got {config.policy.store_poll}")
    if config.policy.store_required and config.policy.store == "none":
        raise ConfigError(f"{source}: [policy] store_required: there is no store (store = \"none\")")
    if config.policy.catalog_refresh <= 0:
        raise ConfigError(f"{source}: [policy] catalog_refresh: must be > 0, got {config.policy.catalog_refresh}")
    if config.policy.file:
        from shadow.policy.rules import PolicyError, load_policy

        try:
            load_policy(config.policy.file)
        except PolicyError as e:
            raise ConfigError(f"{source}: [policy] file: {e}") from None
    if f.failback not in FAILBACK_MODES:
        raise ConfigError(f"{source}: [failover] failback: must be one of {', '.join(FAILBACK_MODES)},"
                          f" got {f.failback!r}")  # fmt: skip


def _check_host(config: Config, source: str) -> None:
    h = config.host
    if not h.vip:
        return
    where = f"{source}: [host]"
    address, sep, prefix = h.vip.partition("/")
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ConfigError(f"{where} vip: expected an IPv4 address with its prefix length (198.18.0.100/24),"
                          f" got {h.vip!r} (IPv6 is not supported yet)") from None  # fmt: skip
    if not sep or not prefix.isdigit() or not 1 <= int(prefix) <= 32:
        raise ConfigError(f"{where} vip: needs its prefix length, as in {address}/24")
    if not 1 <= h.port <= 65535:
        raise ConfigError(f"{where} port: must be 1-65535, got {h.port}")
    if not h.etcd:
        raise ConfigError(f"{where} etcd: host takeover needs the etcd members' URLs (a member on each host"
                          " and a witness); two connmgrs alone cannot break a tie")  # fmt: skip
    for url in h.etcd:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where} etcd: expected http://host:port, got {url!r}")
    if not h.key.startswith("/"):
        raise ConfigError(f"{where} key: must start with /, got {h.key!r}")
    if not 0 < h.lease_ttl:
        raise ConfigError(f"{where} lease_ttl: must be > 0")
    if not h.lease_margin < h.lease_ttl:
        raise ConfigError(f"{where} lease_margin: must be below lease_ttl ({h.lease_ttl:g} s)")
    if not 0 < h.renew_interval < h.lease_ttl - h.lease_margin:
        raise ConfigError(f"{where} renew_interval: must be above 0 and below lease_ttl - lease_margin"
                          f" ({h.lease_ttl - h.lease_margin:g} s), or the lease lapses between renewals")  # fmt: skip
    if not 0 < h.etcd_timeout:
        raise ConfigError(f"{where} etcd_timeout: must be > 0")
