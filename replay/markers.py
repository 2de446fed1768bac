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
A transaction that created tables carries, in its marker statement,
``connmgr.ddl_guard(id, tables)``: a ``connmgr.ddl_guards`` row and a ``connmgr.guard``
message holding the id and, for each new table that has rows at the commit (``CREATE
TABLE AS``, an INSERT in the same block), those rows as text (each row's record output,
written with fixed ``DateStyle``/``IntervalStyle``/float settings, so the secondary's
record input reads back exactly what the primary held; at most
``connmgr.guard_rows_max_bytes``, 8 MiB by default: above it no guard, and the table is
copied as before). On the secondary the row's replica trigger (``ddl_guard_wait``, enabled
only for apply workers) says so in the worker's ``application_name`` and holds the apply
worker inside the transaction until ``connmgr.ddl_done`` has the id;
:mod:`connmgr.pair.ddl_apply` writes the rows (``connmgr.ddl_fill``) and puts the id there once
the new tables are fenced.

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
    "Guard",
    "parse_guard_message",
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
SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET extra_float_digits = 1 SET bytea_output = 'hex'
AS $connmgr$
DECLARE
    rel regclass;
    rows_of jsonb;
    guarded jsonb := '[]';
    filled jsonb := '{}';
    copy boolean := false;
    cap bigint := coalesce(nullif(pg_catalog.current_setting('connmgr.guard_rows_max_bytes', true), '')::bigint,
                           8388608);
BEGIN
    FOREACH rel IN ARRAY tables LOOP
        -- NULL: dropped again, or rolled back to a savepoint; only what a publication of the
        -- pair publishes (FOR ALL TABLES, a schema or a list that names it) is guarded
        CONTINUE WHEN rel IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = rel AND c.relkind = 'r' AND c.relpersistence = 'p'
              AND (EXISTS (SELECT 1 FROM pg_catalog.pg_publication p
                           WHERE p.puballtables AND p.pubname <> 'connmgr_poster')
                   OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t WHERE t.pubname <> 'connmgr_poster'
                              AND t.schemaname = n.nspname AND t.tablename = c.relname)));
        guarded := guarded || pg_catalog.to_jsonb(rel::text);
        CONTINUE WHEN copy;
        -- the rows the creating transaction wrote (CREATE TABLE AS, an INSERT in its block)
        -- go with the guard: the secondary writes them before the table joins the
        -- subscription, as a copy would, but before the commit instead of after it; each row
        -- as its text (every column through its type's output function, as COPY does)
        EXECUTE pg_catalog.format('SELECT pg_catalog.to_jsonb(pg_catalog.array_agg((r.*)::text)) FROM %s r', rel)
            INTO rows_of;
        IF rows_of IS NOT NULL THEN
            filled := filled || pg_catalog.jsonb_build_object(rel::text, rows_of);
            IF pg_catalog.octet_length(filled::text) > cap THEN
                -- too many (connmgr.guard_rows_max_bytes): the secondary copies the tables
                copy := true;
                filled := '{}';
            END IF;
        END IF;
    END LOOP;
    IF guarded = '[]' THEN
        RETURN false;
    END IF;
    INSERT INTO connmgr.ddl_guards (id) VALUES (g) ON CONFLICT DO NOTHING;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'connmgr.guard', pg_catalog.jsonb_build_object(
        'id', g, 'tables', guarded, 'rows', filled, 'copy', copy)::text);
    RETURN true;
END
$connmgr$;
CREATE OR REPLACE FUNCTION connmgr.ddl_fill(rel regclass, rows_of jsonb) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'
AS $connmgr$
DECLARE
    cols text;
    vals text;
    n bigint;
BEGIN
    -- on the secondary, for a new table its apply worker does not follow yet: its rows as
    -- the creating transaction left them (delete first: the record may come again)
    -- each row's text read back as the table's row type (the same columns, dropped ones
    -- included, the DDL being the same), once per row (OFFSET 0), generated columns left out
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(attname), ', ' ORDER BY attnum),
           pg_catalog.string_agg('(s.r).' || pg_catalog.quote_ident(attname), ', ' ORDER BY attnum)
        INTO cols, vals
        FROM pg_catalog.pg_attribute
        WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    EXECUTE pg_catalog.format('DELETE FROM %s', rel);
    EXECUTE pg_catalog.format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM (SELECT x::%s AS r'
                              ' FROM pg_catalog.jsonb_array_elements_text($1) x OFFSET 0) s', rel, cols, vals, rel)
        USING rows_of;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
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
    -- says "I am in the guard" to the secondary connmgr (pg_stat_activity): every change
    -- of the transaction before the guard row has been applied or skipped
    PERFORM pg_catalog.set_config('application_name', 'connmgr guard ' || NEW.id, true);
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
REVOKE ALL ON FUNCTION connmgr.ddl_fill(regclass, jsonb) FROM PUBLIC;
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
    " AND pg_catalog.to_regprocedure('connmgr.ddl_fill(regclass,jsonb)') IS NOT NULL"
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
    commit the transaction (see :mod:`connmgr.pair.ddl_apply`)."""
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
        if key == "role" and (not value or "\0" in value):
            raise ValueError("connmgr.ddl message has an empty or invalid role")
        fields.append(value)
    return DdlStatement(*fields)


class Guard:
    """A ``connmgr.guard`` message: the guard's id, its tables, and, raw, the JSON it came
    in (``rows`` maps each new table that has rows, qualified, to them; :meth:`fill_sql`
    writes them). ``copy``: the rows were over ``connmgr.guard_rows_max_bytes`` and are not
    in the message: the secondary copies the tables."""

    __slots__ = ("id", "tables", "filled", "copy", "payload")

    def __init__(self, id: str, tables: list[str], filled: list[str], copy: bool, payload: str) -> None:
        self.id = id
        #: the tables (qualified names) the guard covers: made in the transaction, published
        self.tables = tables
        #: those that had rows at the creating transaction's commit (and they are here)
        self.filled = filled
        self.copy = copy
        self.payload = payload

    def fill_sql(self) -> str:
        """On the secondary: write each filled table's rows (``connmgr.ddl_fill``), as the
        apply worker would (``session_replication_role = replica``: no user trigger fires);
        one row per table with its name and the number of rows."""
        return ("BEGIN; SET LOCAL session_replication_role = replica;"
                " SELECT key, connmgr.ddl_fill(key::regclass, value)"
                f" FROM pg_catalog.jsonb_each(({quote_text(self.payload)}::jsonb) -> 'rows'); COMMIT")

    def __repr__(self) -> str:
        return f"Guard({self.id!r}, tables={self.tables!r}, filled={self.filled!r}, copy={self.copy})"


def parse_guard_message(content: bytes) -> Guard:
    """Decode a ``connmgr.guard`` message; raises ValueError naming what is wrong. The
    rows are not re-encoded: the secondary reads the message's own text."""
    try:
        text = bytes(content).decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"connmgr.guard message is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("rows"), dict):
        raise ValueError("connmgr.guard message has no string 'id' and object 'rows'")
    tables = doc.get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise ValueError("connmgr.guard message has no list of table names 'tables'")
    return Guard(doc["id"], tables, list(doc["rows"]), doc.get("copy") is True, text)


def marker_content(origin: int, session_id: int, seq: int) -> bytes:
    """How the poster reader reports a marker row: ``b"origin:session:seq"``."""
    return b"%d:%d:%d" % (origin, session_id, seq)
