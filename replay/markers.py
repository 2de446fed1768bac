"""The SQL of the purge markers and of DDL capture (sans-IO: texts in, texts out).

Why a table, not a logical message
----------------------------------
A marker must answer one question at failover, when the primary is gone: *did transaction
n of session s commit?* The only witness left is the secondary database, so the marker
has to be data the secondary applies, in the transaction's own WAL: a row. A logical
decoding message (``pg_logical_emit_message``) is seen by connmgr's poster reader but not
applied by the subscriber, and the reader may lag the subscriber, so "the reader never saw
it" would not prove "it did not commit there". With a row, both readers agree by
construction: the subscriber applies ``connmgr.markers`` like any table, and the poster
reader decodes the same change.

One row per session (``origin``, ``session``) holds the sequence number of that session's
latest committed writing transaction; each marker upserts it (a HOT update of a small row,
so the table stays as large as the number of sessions). Transactions of one session commit
in order, so "``seq`` on the secondary >= n" is exactly "transaction n committed there".
``origin`` is the primary connmgr's instance number, so session numbers of an earlier run
never answer for this one.

``connmgr.mark(origin, session, seq)`` is ``SECURITY DEFINER`` (clients need no rights on
the table) and writes only if the transaction already has an xid
(``txid_current_if_assigned()``): a reader stays read-only and returns NULL. The marker
column is named ``connmgr.marker`` so the relay can recognise and swallow its replies.

**The flush.** A marker that wrote raises ``NOTICE 'connmgr.flush'`` (its own
``client_min_messages`` makes sure the notice is sent). Postgres flushes its output after
every notice, so everything the client's statements produced before the marker -- their
rows and command tags -- is in connmgr's hands *before the transaction's commit record is
written*. That is what makes interrupted commits exactly resolvable at failover: if the
primary dies during the commit, the only replies connmgr can be missing are the commit's
own (``CommandComplete COMMIT`` and ``ReadyForQuery``), which it can produce itself when
the secondary says the transaction committed. The relay swallows the notice.

DDL capture
-----------
Logical decoding carries no DDL. connmgr captures a DDL statement sent through it by
emitting, in the same transaction (just before it in a block; right after it, in the same
implicit transaction, in autocommit, so error positions stay the client's), a transactional
logical message
(prefix ``connmgr.ddl``) holding the statement and the session's ``current_user`` and
``search_path`` at that moment (evaluated by the server, in the session). The poster
reader sees the message inside the transaction's record, at the transaction's commit
point in the stream, and the secondary connmgr replays the statement there; a transaction
that aborts never emits it.

The guard of a new table
------------------------
A transaction that created tables (plain ``CREATE TABLE``, no rows of its own) carries,
in its marker statement, ``connmgr.ddl_guard(id, tables)``: if every table it made is
still empty at the commit, a ``connmgr.ddl_guards`` row and a ``connmgr.guard`` message.
On the secondary the row's replica trigger (``ddl_guard_wait``, enabled only for apply
workers) holds the apply worker inside the transaction until ``connmgr.ddl_done`` has the
id; :mod:`connmgr.ddl_apply` puts it there once the new tables are fenced.

The synchronous guarantee
-------------------------
``connmgr.mark()`` also sets ``synchronous_commit = on`` for the rest of the transaction
when the session weakened it (a ``SET LOCAL`` in a function with its own ``SET`` clauses
lasts to the end of the transaction when it names another parameter): the marker is the
last statement before the commit of every writing transaction connmgr marks.
"""

from __future__ import annotations

import json
import secrets

__all__ = [
    "MARKER_PREFIX",
    "MARKER_TABLE",
    "marker_content",
    "MARKER_COLUMN",
    "POSTER_PUBLICATION",
    "DDL_COLUMN",
    "DDL_PREFIX",
    "SCHEMA_SQL",
    "CHECK_SQL",
    "mark_sql",
    "ddl_capture_sql",
    "guard_sql",
    "GUARD_PREFIX",
    "DdlStatement",
    "parse_ddl_message",
]

MARKER_SCHEMA = "connmgr"
#: what the poster reader reports a marker row as: the message ("connmgr", b"o:s:q")
MARKER_PREFIX = "connmgr"
MARKER_TABLE = "connmgr.markers"
#: the column name of an injected marker's result: what the relay swallows
MARKER_COLUMN = "connmgr.marker"
DDL_COLUMN = "connmgr.ddl"
#: prefix of the transactional logical message that carries a captured DDL statement
DDL_PREFIX = "connmgr.ddl"
#: prefix of the message a guarded table-creating transaction carries (content: the guard id)
GUARD_PREFIX = "connmgr.guard"

#: creates (idempotently) what markers need in one database; run it as a superuser on the
#: primary *and* the secondary, before the subscription is created (the subscriber must
#: know the table before the first marker row arrives, or its apply worker stops)
SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS connmgr;
CREATE TABLE IF NOT EXISTS connmgr.markers (
    origin bigint NOT NULL,
    session bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (origin, session)
) WITH (fillfactor = 50);
CREATE OR REPLACE FUNCTION connmgr.mark(o bigint, s bigint, q bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET client_min_messages = notice
AS $connmgr$
BEGIN
    IF pg_catalog.txid_current_if_assigned() IS NULL THEN
        RETURN NULL;
    END IF;
    -- the synchronous guarantee is not the session's to weaken (SET, SET LOCAL,
    -- set_config(), options, ALTER ROLE/DATABASE ... SET): a writing transaction commits
    -- with synchronous_commit = on (remote_apply, stronger, is kept); local to it
    IF pg_catalog.current_setting('synchronous_commit') NOT IN ('on', 'remote_apply') THEN
        PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);
    END IF;
    INSERT INTO connmgr.markers AS m (origin, session, seq) VALUES (o, s, q)
    ON CONFLICT (origin, session) DO UPDATE SET seq = excluded.seq;
    RAISE NOTICE 'connmgr.flush';
    RETURN true;
END
$connmgr$;
CREATE TABLE IF NOT EXISTS connmgr.ddl_guards (
    id text PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE IF NOT EXISTS connmgr.ddl_done (
    id text PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE OR REPLACE FUNCTION connmgr.ddl_guard(g text, tables regclass[]) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $connmgr$
DECLARE
    rel regclass;
    has_rows boolean;
    guarded boolean := false;
BEGIN
    FOREACH rel IN ARRAY tables LOOP
        -- NULL: dropped again, or rolled back to a savepoint
        CONTINUE WHEN rel IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class
            WHERE oid = rel AND relkind = 'r' AND relpersistence = 'p');
        EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s)', rel) INTO has_rows;
        IF has_rows THEN
            RETURN false;  -- rows in the creating transaction: the secondary copies the table
        END IF;
        guarded := true;
    END LOOP;
    IF guarded THEN
        INSERT INTO connmgr.ddl_guards (id) VALUES (g) ON CONFLICT DO NOTHING;
        PERFORM pg_catalog.pg_logical_emit_message(true, 'connmgr.guard', g);
    END IF;
    RETURN guarded;
END
$connmgr$;
CREATE OR REPLACE FUNCTION connmgr.ddl_guard_wait() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $connmgr$
DECLARE
    deadline timestamptz := pg_catalog.clock_timestamp() + interval '10 s';
BEGIN
    -- a table synchronization worker copying the table (a re-seed) has nothing to wait for
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_stat_subscription
               WHERE pid = pg_catalog.pg_backend_pid() AND relid IS NOT NULL) THEN
        RETURN NEW;
    END IF;
    WHILE NOT EXISTS (SELECT 1 FROM connmgr.ddl_done WHERE id = NEW.id) LOOP
        IF pg_catalog.clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'connmgr: the secondary connmgr has not replayed DDL % yet', NEW.id
                USING HINT = 'The apply worker retries; the primary''s commits wait until the'
                             ' secondary connmgr (its [poster] section) replays the DDL.';
        END IF;
        PERFORM pg_catalog.pg_sleep(0.002);
    END LOOP;
    RETURN NEW;
END
$connmgr$;
DO $connmgr$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgname = 'ddl_guard_wait'
                   AND tgrelid = 'connmgr.ddl_guards'::regclass) THEN
        CREATE TRIGGER ddl_guard_wait BEFORE INSERT ON connmgr.ddl_guards
            FOR EACH ROW EXECUTE FUNCTION connmgr.ddl_guard_wait();
        -- only in apply workers (session_replication_role = replica): on the secondary
        ALTER TABLE connmgr.ddl_guards ENABLE REPLICA TRIGGER ddl_guard_wait;
    END IF;
END $connmgr$;
REVOKE ALL ON connmgr.ddl_guards, connmgr.ddl_done FROM PUBLIC;
REVOKE ALL ON FUNCTION connmgr.ddl_guard(text, regclass[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION connmgr.ddl_guard(text, regclass[]) TO PUBLIC;
REVOKE ALL ON connmgr.markers FROM PUBLIC;
REVOKE ALL ON FUNCTION connmgr.mark(bigint, bigint, bigint) FROM PUBLIC;
GRANT USAGE ON SCHEMA connmgr TO PUBLIC;
GRANT EXECUTE ON FUNCTION connmgr.mark(bigint, bigint, bigint) TO PUBLIC;
DO $connmgr$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = 'connmgr_poster') THEN
        CREATE PUBLICATION connmgr_poster FOR TABLE connmgr.markers;
    END IF;
END $connmgr$;
"""

#: the publication the poster slot decodes: only the marker rows (and, with ``messages``,
#: the DDL messages). The poster needs nothing else, and pgoutput skips transactions with
#: nothing published, so the reader sees the writing transactions connmgr marked and
#: decodes a fraction of the WAL traffic a FOR ALL TABLES publication would send it.
POSTER_PUBLICATION = "connmgr_poster"

#: one row, true if this database has the marker function
CHECK_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE oid ="
    " pg_catalog.to_regprocedure('connmgr.mark(bigint,bigint,bigint)') AND prosrc LIKE '%connmgr.flush%'"
    " AND prosrc LIKE '%synchronous_commit%')"
    " AND pg_catalog.to_regprocedure('connmgr.ddl_guard(text,regclass[])') IS NOT NULL"
)

#: the message of the notice a writing marker raises; the relay swallows it
FLUSH_NOTICE = "connmgr.flush"


def mark_sql(origin: int, session_id: int, seq: int, guard: str = "") -> str:
    """The marker statement for transaction ``seq`` of a session (``guard``: from
    :func:`guard_sql`, for a transaction that created tables)."""
    return f'SELECT connmgr.mark({origin}, {session_id}, {seq}) AS "{MARKER_COLUMN}"{guard}'


def ddl_capture_sql(statement: str) -> str:
    """The statement that records ``statement`` for replay on the secondary, in the
    current transaction, with the session's role and search_path as they are now."""
    tag = "$connmgr_" + secrets.token_hex(4) + "$"
    while tag in statement:  # pragma: no cover - 2**-32
        tag = "$connmgr_" + secrets.token_hex(4) + "$"
    return (
        "SELECT pg_catalog.pg_logical_emit_message(true, '" + DDL_PREFIX + "',"
        " pg_catalog.json_build_object('role', current_user,"
        " 'search_path', pg_catalog.current_setting('search_path'),"
        f" 'sql', {tag}{statement}{tag})::text) AS \"{DDL_COLUMN}\""
    )


def guard_sql(tables: list[str]) -> str:
    """What the marker statement of a transaction that created ``tables`` (names as the
    client wrote them) adds: a ``connmgr.ddl_guard`` call with a fresh id. If every one of
    them is still empty at the commit, the call writes a ``connmgr.ddl_guards`` row and a
    ``connmgr.guard`` message; the secondary fences the tables before its apply worker may
    commit the transaction (see :mod:`connmgr.ddl_apply`)."""
    # resolved here, with the session's search_path (the function has its own)
    rels = ", ".join(f"pg_catalog.to_regclass({quote_text(t)})" for t in tables)
    return f", connmgr.ddl_guard('{secrets.token_hex(12)}', ARRAY[{rels}]::regclass[])"


def quote_text(text: str) -> str:
    """``text`` as a standard-conforming string literal (no backslash escapes in it)."""
    return "'" + text.replace("'", "''") + "'"


class DdlStatement:
    """A captured DDL statement as the poster reader found it."""

    __slots__ = ("role", "search_path", "sql")

    def __init__(self, role: str, search_path: str, sql: str) -> None:
        self.role = role
        self.search_path = search_path
        self.sql = sql

    def __repr__(self) -> str:
        return f"DdlStatement(role={self.role!r}, search_path={self.search_path!r}, sql={self.sql[:60]!r})"


def parse_ddl_message(content: bytes) -> DdlStatement:
    """Decode a ``connmgr.ddl`` message; raises ValueError naming what is wrong."""
    try:
        doc = json.loads(bytes(content).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"connmgr.ddl message is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("connmgr.ddl message is not a JSON object")
    fields = []
    for key in ("role", "search_path", "sql"):
        value = doc.get(key)
        if not isinstance(value, str):
            raise ValueError(f"connmgr.ddl message has no string {key!r}")
        fields.append(value)
    return DdlStatement(*fields)


def marker_content(origin: int, session_id: int, seq: int) -> bytes:
    """How the poster reader reports a marker row: ``b"origin:session:seq"``."""
    return b"%d:%d:%d" % (origin, session_id, seq)
