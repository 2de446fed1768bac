"""A session's guard: its client's batches of messages in, the same batches out with every
refused statement replaced (shadow/policy/decision.py). No I/O.

It looks at the messages that carry SQL: Query (``Q``: every statement in it) and Parse
(``P``: the statement prepared). A refused Parse prepares the raising ``DO`` instead, with
no parameters; every Bind to that statement is sent with no parameters either (its result
formats kept), so the Execute raises 42501 where Postgres raises a permission error: after
ParseComplete and BindComplete, at execution. A FunctionCall (``F``: a function called by
its OID, no SQL to read) is refused to a class that restricts objects or refuses CALL: it
is sent as a Query of the raising ``DO``, and the client gets the ErrorResponse and
ReadyForQuery a failed FunctionCall gets. Decisions are cached per (class, catalog,
text), and per statement shape (its tokens without the literals' values): a repeated
Query costs a lookup, a statement repeated with other values a tokenization.

The relay holds a guarded client's messages whole (no streaming of long ones), so the
guard sees every statement entire.

For a class with masks, the guard also tells the session's :class:`Results` what each
message it lets through will be answered with and what the rows of each statement show
(shadow/policy/results.py masks them on their way back); it follows the names of prepared
statements and cursors, so an EXECUTE or FETCH shows what the PREPARE or DECLARE it names
was found to show (a name it never saw made: every value masked).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable

from shadow.policy.analysis import Statement, statements
from shadow.policy.catalog import Catalog
from shadow.policy.decision import (
    UNKNOWN,
    Outcome,
    Refusal,
    Shown,
    decide_query_by_shape,
    refusal_sql,
)
from shadow.policy.maintenance import Entry, Maintenance, touches, wait_sql
from shadow.policy.results import Results
from shadow.policy.rules import ClientClass
from shadow.sqltext import raising_do

__all__ = ["UNRESTRICTED", "Guard", "decide"]

#: the class of a client no class takes (its guard only holds statements on objects under
#: maintenance)
UNRESTRICTED = ClientClass(name="")

_Q, _P, _B, _F, _D, _E, _C, _S = (ord(c) for c in "QPBFDECS")
_LEN = struct.Struct("!I")
_H = struct.Struct("!h")
_I = struct.Struct("!i")


def decide(cls: ClientClass, catalog: Catalog | None, text: bytes) -> tuple:
    """(the statement text to send instead or None, the refusal or None, the outcome of
    each statement that runs, how many statements a rewrite changed, the tables and the
    functions the statements that run name)

    Cached three ways: by the text; by the text with its numbers'
    values left out (``_BY_VALUES``), for a text that passes as it is and was decided by
    shape -- a digit run that starts a token (not one inside a name: ``t1``, ``$1``,
    ``x.5``) is a value, and one after ``BY`` could be a column's position, so a text with
    ``by``, a quote of a name or a ``$``/backslash is not shared that way -- and by each
    statement's shape (shadow/policy/decision.py)."""
    found = _BY_TEXT.get((cls, catalog, text))
    if found is not None:
        return found
    key = None
    if _NOT_BY_VALUES.search(text) is None:
        key = (cls, catalog, _VALUE_DIGITS.sub(b"0", text))
        shared = _BY_VALUES.get(key)
        if shared is not None:
            return shared
    sql = text.decode("utf-8", "surrogateescape")  # (bytes of another client_encoding come back unchanged)
    decision = decide_query_by_shape(sql, cls, catalog)
    new = None if decision.text is None else decision.text.encode("utf-8", "surrogateescape")
    found = (new, decision.refusal, decision.outcomes, decision.rewritten, decision.tables, decision.functions)
    if key is not None and decision.shared and new is None:
        _remember(_BY_VALUES, key, found)
    _remember(_BY_TEXT, (cls, catalog, text), found)
    return found


def _remember(cache: dict, key, value) -> None:
    cache[key] = value
    if len(cache) > _LIMIT:  # (the oldest goes: dicts keep their order)
        cache.pop(next(iter(cache)))


_NAMING = re.compile(rb"(?i)prepare|declare|execute|fetch|move")
_VALUE_DIGITS = re.compile(rb"(?<![A-Za-z0-9_.\x80-\xff])[0-9]+")
_NOT_BY_VALUES = re.compile(rb'["$\\]|[bB][yY]')
#: (class, catalog, text) -> the decision; (class, catalog, text with its values left out) -> outcomes
_BY_TEXT: dict = {}
_BY_VALUES: dict = {}
_LIMIT = 16384


class Guard:
    """``on_refusal(refusal)`` is told of every refused statement (logs, metrics)."""

    __slots__ = ("cls", "on_refusal", "refused", "catalog", "results", "named", "on_rewrite", "unrestricted",
                 "maintenance", "application_name", "tx_version", "expired", "wait_out", "hold", "on_masked",
                 "source", "version", "client", "statements", "stale", "on_switch", "made")  # fmt: skip

    def __init__(self, cls: ClientClass, on_refusal: Callable[[Refusal], None],
                 catalog: Callable[[], Catalog | None] = lambda: None,
                 on_masked: Callable[[int], None] | None = None,
                 on_rewrite: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.cls = cls
        self.on_refusal = on_refusal
        #: told how many statements of a message a rewrite changed
        self.on_rewrite = on_rewrite
        #: the database's catalog as it is now (refreshed by connmgr/proxy/policy.py)
        self.catalog = catalog
        #: names of prepared statements replaced by a refusal (b"" the unnamed one)
        self.refused: set[bytes] = set()
        #: a class with masks: the server's answers to mask (None: nothing is masked)
        self.on_masked = on_masked
        self.results = Results(on_masked) if cls.masks else None
        #: ("prepare" or "cursor", name) -> what its rows show
        self.named: dict[tuple[str, str], Shown | None] = {}
        #: a client no class takes: its guard only holds statements on objects under maintenance
        self.unrestricted = cls is UNRESTRICTED
        #: the objects under maintenance (shadow/policy/maintenance.py; None: none ever),
        #: the session's application_name, the version when its open transaction began
        self.maintenance: Maintenance | None = None
        self.application_name = ""
        self.tx_version = 0
        #: entries a statement waited for until the limit: it is replaced by a 55P03 (once)
        self.expired: tuple[tuple[Entry, ...], float] | None = None
        #: the runtime's: ``await wait_out(entries)`` (the trio pumps), ``hold(entries,
        #: then)`` (the relay engine: ``then()`` is called when the wait is over)
        self.wait_out: Callable[[tuple[Entry, ...]], Awaitable[None]] | None = None
        self.hold: Callable[[tuple[Entry, ...], Callable[[], None]], None] | None = None
        #: policy versions (shadow/policy/activation.py): ``source.active`` is the version
        #: in use now, ``version`` the one this guard's class is of, ``client`` (user,
        #: database, application_name, address) classifies the client again under another;
        #: ``statements()`` the session's prepared statements (name -> SQL) as the server
        #: holds them; ``stale`` their names (bytes) the version now in use would not run
        #: as they were prepared; ``on_switch()`` tells the relay the class changed
        self.source = None
        self.version = None
        self.client: tuple[str, str, str, str | None] = ("", "", "", None)
        self.statements: Callable[[], dict[str, str]] | None = None
        self.stale: set[bytes] = set()
        self.on_switch: Callable[[], None] | None = None
        #: after a class change: the SQL-level names (PREPARE, DECLARE) made since; an
        #: EXECUTE, FETCH or MOVE of any other was made under another class (None: no change yet)
        self.made: set[tuple[str, str]] | None = None

    def must_wait(self, buf: bytes, frames: list, in_transaction: bool) -> tuple[Entry, ...]:
        """The entries under maintenance the statements of ``frames`` must wait for (the
        relay holds the batch until they end, or until the limit)."""
        m = self.maintenance
        if not in_transaction:  # (a transaction this batch begins begins now)
            self.tx_version = m.version
            if (self.source is not None and self.source.active is not self.version
                    and not any(frame[0] > 0xFF for frame in frames)):  # (a streamed message: not analysed)
                self._follow()
        if not m.entries:
            return ()
        found: tuple[Entry, ...] = ()
        tx = self.tx_version if in_transaction else None
        for tag, start, end in frames:
            text = _statement_text(buf, tag, start, end)
            if text is None:
                continue
            _new, _refusal, _outcomes, _rewritten, tables, functions = decide(self.cls, self.catalog(), text)
            for entry in m.blocking(tables, functions, self.application_name, tx):
                if entry not in found:
                    found += (entry,)
        return found

    def filter(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """``frames`` ((tag, start, end) of ``buf``) with refused statements replaced; the
        same objects when nothing is."""
        if not self.unrestricted or self.refused or self.stale or self.made is not None:
            buf, frames = self._filter(buf, frames)
        if self.expired is not None:
            buf, frames = self._expire(buf, frames)
        return buf, frames

    def _filter(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        out: list[bytes] | None = None
        done = 0
        results = self.results
        for tag, start, end in frames:
            if tag == _Q and self.made is not None and (gone := self._made_before(bytes(buf[start:end - 1]))):
                if results is not None:
                    results.query(())
                new = gone.encode()
                message = b"Q" + _LEN.pack(len(new) + 5) + new + b"\0"
                refusal = None
            elif tag == _Q:
                new, refusal, outcomes, rewritten, _t, _f = decide(self.cls, self.catalog(), bytes(buf[start:end - 1]))
                if rewritten and self.on_rewrite is not None:
                    self.on_rewrite(rewritten)
                if results is not None:
                    results.query(tuple(self._shown(o) for o in outcomes))
                if new is None:
                    continue
                message = b"Q" + _LEN.pack(len(new) + 5) + new + b"\0"
            elif tag == _P:
                name_end = buf.find(0, start, end)
                text_end = buf.find(0, name_end + 1, end)
                if name_end < 0 or text_end < 0:
                    if results is not None:
                        results.parse(b"\0", UNKNOWN)  # (the server refuses it: 08P01)
                    continue  # malformed: the server refuses it (08P01)
                name = bytes(buf[start:name_end])
                new, refusal, outcomes, rewritten, _t, _f = decide(self.cls, self.catalog(),
                                                                   bytes(buf[name_end + 1:text_end]))  # fmt: skip
                if rewritten and self.on_rewrite is not None:
                    self.on_rewrite(rewritten)
                if results is not None:
                    shown = self._shown(outcomes[0]) if len(outcomes) == 1 else None
                    results.parse(name, shown)
                    self.named[("prepare", name.decode("utf-8", "replace"))] = shown
                self.stale.discard(name)  # (prepared again: under the version in use)
                if new is None or refusal is None:
                    self.refused.discard(name)  # (the name now holds an allowed statement)
                    if new is None:
                        continue
                    body = name + b"\0" + new + b"\0" + bytes(buf[text_end + 1:end])  # rewritten: types kept
                else:
                    self.refused.add(name)
                    new = refusal_sql(refusal).encode()
                    body = name + b"\0" + new + b"\0" + b"\0\0"  # no parameter types
                message = b"P" + _LEN.pack(len(body) + 4) + body
            elif tag == _F and (self.cls.restricts_objects or "CALL" in self.cls.refuse_kinds
                                or (self.cls.allow_kinds is not None and "CALL" not in self.cls.allow_kinds)):
                refusal = Refusal(Statement(0, 0, frozenset({"CALL"}), analysed=False,
                                            why="a FunctionCall message names its function by OID"),
                                  "a function call by OID (FunctionCall message)",
                                  f"class {self.cls.name!r}: it restricts objects or calls (fail closed)")  # fmt: skip
                new = refusal_sql(refusal).encode()
                message = b"Q" + _LEN.pack(len(new) + 5) + new + b"\0"
            elif tag == _B:
                if results is not None:
                    _bound(results, buf, start, end)
                if not self.refused and not self.stale:
                    continue
                message = _unbound(buf, start, end, self.refused) if self.refused else None
                if message is None:
                    message = _redirected(buf, start, end, self.stale) if self.stale else None
                    if message is None:
                        continue
                refusal = None
            else:
                if results is not None and tag in _ANSWERED:
                    _ANSWERED[tag](results, buf, start, end)
                continue
            if refusal is not None:
                self.on_refusal(refusal)
            if out is None:
                out = []
            out.append(bytes(buf[done:start - 5]))  # (a frame's start is its body's: after tag and length)
            out.append(message)
            done = end
        if out is None:
            return buf, frames
        out.append(bytes(buf[done:]))
        return _reframe(b"".join(out), frames)

    def _expire(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """The batch that waited until the limit: its Query or Parse touching what is still
        under maintenance becomes a 55P03 (nothing of it runs); the rest as usual."""
        (entries, waited), self.expired = self.expired, None
        still = tuple(e for e in entries if self.maintenance.entries.get(e.text.strip().lower()) is e)
        if not still:
            return buf, frames
        raising = wait_sql(still, waited).encode()
        out = []
        done = 0
        for tag, start, end in frames:
            if tag == _B and self.refused:  # (a Bind to a Parse replaced above: no parameters)
                message = _unbound(buf, start, end, self.refused)
                if message is not None:
                    out.append(bytes(buf[done:start - 5]))
                    out.append(message)
                    done = end
                continue
            text = _statement_text(buf, tag, start, end)
            if text is None:
                continue
            tables, functions = decide(self.cls, self.catalog(), text)[4:]
            if not any(touches(e, tables, functions) for e in still):
                continue
            if tag == _Q:
                message = b"Q" + _LEN.pack(len(raising) + 5) + raising + b"\0"
            else:
                name = bytes(buf[start:buf.find(0, start, end)])
                self.refused.add(name)
                body = name + b"\0" + raising + b"\0" + b"\0\0"
                message = b"P" + _LEN.pack(len(body) + 4) + body
            out.append(bytes(buf[done:start - 5]))
            out.append(message)
            done = end
        if not out:
            return buf, frames
        out.append(bytes(buf[done:]))
        return _reframe(b"".join(out), frames)

    def _follow(self) -> None:
        """The policy version in use changed, and this session is between transactions
        with no reply owed (a transaction begun under a version finishes under it): its
        client is classified again. A class with the same fingerprint decides alike, so
        nothing else changes; for another, the prepared statements the server holds are
        decided again -- those it would refuse or rewrite are *stale* (a Bind to one is
        sent to a statement that does not exist, whose name says why: 26000, nothing runs),
        the others show what the new class masks; names whose SQL is not known (SQL
        PREPARE, cursors held open) show every value masked."""
        version = self.source.active
        self.version = version
        cls = version.policy.classify(*self.client) or UNRESTRICTED
        old = self.cls
        if cls is old:
            return
        self.cls = cls
        self.unrestricted = cls is UNRESTRICTED
        if cls.fingerprint == old.fingerprint:
            return
        self.results = results = Results(self.on_masked) if cls.masks else None
        statements = self.statements() if self.statements is not None else {}
        named: dict = {}
        # (an unrestricted class refuses nothing: nothing of before is stale for it; else the
        # unnamed statement is too -- a Bind to it without a Parse first --, and SQL names)
        self.stale = set() if self.unrestricted else {b""}
        self.made = None if self.unrestricted else set()
        for name, sql in statements.items():
            key = name.encode()
            if key in self.refused:  # (the server holds the raising DO: it still refuses)
                continue
            if self._not_as_prepared(sql):
                self.stale.add(key)
            elif results is not None:
                shown = self._decided(sql)
                results.statements[key] = shown
                named[("prepare", name)] = shown
        if results is not None:
            for key in self.named:
                named.setdefault(key, UNKNOWN)
        self.named = named
        if self.on_switch is not None:
            self.on_switch()

    def _not_as_prepared(self, sql: str) -> bool:
        """Would this guard's class refuse or rewrite a statement prepared as ``sql``
        (empty: its text was not kept, a Parse that streamed -- not known, so yes)?"""
        if not sql:
            return True
        new, refusal = decide(self.cls, self.catalog(), sql.encode("utf-8", "surrogateescape"))[:2]
        return new is not None or refusal is not None

    def _made_before(self, text: bytes) -> str | None:
        """After a class change: a raising DO (26000) for a Query that executes, fetches
        from or moves a statement or cursor made under the class before (its decision was
        that class's); None if it does not. Records the names the Query makes."""
        if _NAMING.search(text) is None:
            return None
        made = self.made
        for st in statements(text.decode("utf-8", "surrogateescape")):
            if st.uses is not None and st.uses not in made:
                kind, name = st.uses
                what = "prepared statement" if kind == "prepare" else "cursor"
                return raising_do("26000", f"{what} \"{name}\" was made under a policy version no longer in use"
                                  " (connmgr)", f"the policy of this session changed since {what} {name} was made;"
                                  " nothing ran. Make it again.", "connmgr_version")  # fmt: skip
            if st.binds is not None:
                made.add(st.binds)
        return None

    def replica(self) -> Guard:
        """A guard in this one's state (its class, the names it knows) that tells nobody of
        refusals: a session's replay on another server masks its replies with it, to
        compare them with the masked ones the client received."""
        other = Guard(self.cls, lambda refusal: None, self.catalog)
        other.refused = set(self.refused)
        other.named = dict(self.named)
        if other.results is not None and self.results is not None:
            other.results.statements = dict(self.results.statements)
        return other

    def resume(self, state) -> None:
        """A session that continues on this connmgr (its host died): the prepared
        statements it had made and the requests the server still owes replies to, from the
        shadow's copy of it (``state``: shadow.session.SessionState). Its cursors and
        portals were not copied: their rows are masked in full. Its class is of this
        connmgr's policy version: a statement that version would refuse or rewrite is
        stale here (a Bind to it fails with 26000, nothing run)."""
        if not self.unrestricted:
            self.stale.update(name.encode() for name, sql in state.prepared_statements.items()
                              if self._not_as_prepared(sql))  # fmt: skip
        results = self.results
        if results is None:
            return
        for name, sql in state.prepared_statements.items():
            shown = self._decided(sql)
            results.statements[name.encode()] = shown
            self.named[("prepare", name)] = shown
        for request in state.pending:
            kind = request.kind
            if kind == "Q":
                results.query(None if request.sql is None else
                              tuple(self._shown(o) for o in self._outcomes(request.sql)))  # fmt: skip
            elif kind == "F":
                results.query(None)
            elif kind == "P":
                results.parse((request.statement or "").encode(), None if request.sql is None else
                              self._decided(request.sql))  # fmt: skip
            elif kind == "B":
                results.bind((request.portal or "").encode(), (request.statement or "").encode(), None)
            elif kind == "D":
                results.describe(ord("S") if request.statement is not None else ord("P"),
                                 (request.statement or request.portal or "").encode())  # fmt: skip
            elif kind == "E":
                results.execute((request.portal or "").encode())
            elif kind == "C":
                results.close(ord("S") if request.statement is not None else ord("P"),
                              (request.statement or request.portal or "").encode())  # fmt: skip
            elif kind == "S":
                results.sync()

    def _outcomes(self, sql: str) -> tuple[Outcome | None, ...]:
        return decide(self.cls, self.catalog(), sql.encode("utf-8", "surrogateescape"))[2]

    def _decided(self, sql: str) -> Shown | None:
        outcomes = self._outcomes(sql)
        return self._shown(outcomes[0]) if len(outcomes) == 1 else None

    def _shown(self, outcome: Outcome | None) -> Shown | None:
        """What a statement's rows show, its names followed (in the order the server runs them)."""
        if outcome is None:
            return None
        if outcome.binds is not None:
            self.named[outcome.binds] = outcome.bound
            if outcome.binds[0] == "prepare":
                self.results.statements[outcome.binds[1].encode()] = outcome.bound
            return None
        if outcome.uses is not None:
            return self.named.get(outcome.uses, UNKNOWN)
        return outcome.shown


def _statement_text(buf, tag: int, start: int, end: int) -> bytes | None:
    """The SQL text of a Query or a Parse (None: another message, or a Parse too malformed
    to read, which the server refuses)."""
    if tag == _Q:
        return bytes(buf[start:end - 1])
    if tag != _P:
        return None
    name_end = buf.find(0, start, end)
    text_end = buf.find(0, name_end + 1, end)
    return bytes(buf[name_end + 1:text_end]) if 0 <= name_end < text_end else None


def _bound(results: Results, buf, start: int, end: int) -> None:
    """Tell ``results`` of a Bind: its portal, statement and result formats (read only
    for a statement whose rows are masked)."""
    portal_end = buf.find(0, start, end)
    name_end = buf.find(0, portal_end + 1, end)
    formats: tuple[int, ...] = ()
    statement = bytes(buf[portal_end + 1:name_end])
    if statement in results.statements and results.statements[statement] is None:
        results.bind(bytes(buf[start:portal_end]), statement, formats)
        return
    try:
        pos = _after_parameters(buf, name_end + 1)
        (nresult,) = _H.unpack_from(buf, pos)
        formats = struct.unpack_from(f"!{nresult}h", buf, pos + 2) if nresult > 0 else ()
    except struct.error:
        formats = (1,)  # (malformed: the server refuses it; binary is the stricter reading)
    results.bind(bytes(buf[start:portal_end]), statement, formats)


def _after_parameters(buf, pos: int) -> int:
    """Where a Bind's result formats start, its parameter formats and values beginning
    at ``pos``; raises struct.error for a Bind too short to read."""
    (nfmt,) = _H.unpack_from(buf, pos)
    pos += 2 + 2 * nfmt
    (nparams,) = _H.unpack_from(buf, pos)
    pos += 2
    for _ in range(nparams):
        (length,) = _I.unpack_from(buf, pos)
        pos += 4 + max(length, 0)
    return pos


def _named(buf, start: int, end: int) -> tuple[int, bytes]:
    kind = buf[start] if start < end else 0
    stop = buf.find(0, start + 1, end)
    return kind, bytes(buf[start + 1:stop if stop >= 0 else end])


#: the other messages the server answers, and how ``Results`` is told of them
_ANSWERED = {
    _D: lambda results, buf, start, end: results.describe(*_named(buf, start, end)),
    _E: lambda results, buf, start, end: results.execute(
        bytes(buf[start:buf.find(0, start, end) if buf.find(0, start, end) >= 0 else end])),
    _C: lambda results, buf, start, end: results.close(*_named(buf, start, end)),
    _S: lambda results, buf, start, end: results.sync(),
}  # fmt: skip


def _unbound(buf: bytes, start: int, end: int, refused: set[bytes]) -> bytes | None:
    """A Bind to a refused statement, with its parameters taken out (the raising DO has
    none); None for any other Bind, or one too malformed to read (the server says so)."""
    portal_end = buf.find(0, start, end)
    name_end = buf.find(0, portal_end + 1, end)
    if portal_end < 0 or name_end < 0 or bytes(buf[portal_end + 1:name_end]) not in refused:
        return None
    try:
        pos = _after_parameters(buf, name_end + 1)
        if pos > end:
            return None
    except struct.error:
        return None
    body = bytes(buf[start:name_end + 1]) + b"\0\0\0\0" + bytes(buf[pos:end])  # no formats, no values
    return b"B" + _LEN.pack(len(body) + 4) + body


def _redirected(buf: bytes, start: int, end: int, stale: set[bytes]) -> bytes | None:
    """A Bind to a stale statement (prepared under a policy version no longer in use, one
    that would not run it so), sent to a statement that does not exist: the server answers
    26000, naming it -- and the name says why. None for any other Bind."""
    portal_end = buf.find(0, start, end)
    name_end = buf.find(0, portal_end + 1, end)
    if portal_end < 0 or name_end < 0:
        return None
    name = bytes(buf[portal_end + 1:name_end])
    if name not in stale:
        return None
    shown = name.decode("utf-8", "replace")[:40]
    why = f"{shown} (prepared under a policy version no longer in use: prepare it again)".encode()
    body = bytes(buf[start:portal_end + 1]) + why.replace(b"\0", b"") + b"\0" + bytes(buf[name_end + 1:end])
    return b"B" + _LEN.pack(len(body) + 4) + body


def _reframe(buf: bytes, old: list) -> tuple[bytes, list]:
    """The frames of ``buf`` (whole messages, as ``old`` was, with lengths changed): read
    from the length of each."""
    frames = []
    pos = 0
    for _frame in old:
        (length,) = _LEN.unpack_from(buf, pos + 1)
        frames.append((buf[pos], pos + 5, pos + 1 + length))  # (a FunctionCall became a Query)
        pos += 1 + length
    return buf, frames
