"""What a session carries beyond its open transaction, and how to rebuild it elsewhere
(sans-IO; seed 004's "session restore" before a replay on the secondary).

When a session moves to another server, the new backend must look like the old one before
any transaction is replayed: the same settings, SQL-level prepared statements, LISTEN
channels and session advisory locks. Protocol-level prepared statements are known exactly
by :class:`shadow.session.SessionState`; everything here is read from the SQL the client
sent, by its leading words, so it costs nothing for the ordinary statement (one
:func:`~shadow.sqltext.leading_words` call decides "nothing to record").

Transactional semantics follow Postgres:

* ``SET`` / ``RESET`` (session scope) and ``LISTEN`` / ``UNLISTEN`` take effect when their
  transaction commits and are undone if it rolls back; they are staged per transaction
  and applied by :meth:`SessionRecorder.end_transaction`. ``SET LOCAL`` and ``SET
  TRANSACTION`` never outlive the transaction and are not recorded. A SET inside a
  transaction that also rolled back to a savepoint cannot be judged without the server
  (was it before or after the savepoint?): the session is marked not movable.
* ``PREPARE`` / ``DEALLOCATE`` and session advisory locks are not transactional: applied
  at once.
* ``DISCARD ALL`` resets everything (settings, prepared statements, LISTEN, advisory
  locks, temp objects, held cursors); ``DISCARD TEMP`` the temp objects.

What cannot move (each is a reason in :attr:`SessionRecorder.not_movable`, so the metric
and the client's error can say which): temporary tables or other temp objects (their
contents live only in the dead server), cursors declared ``WITH HOLD`` until closed,
``pg_try_advisory_lock`` (whether it was granted is in the reply, not the request) and
advisory locks whose keys are not literals, and the savepoint case above. The restore
script (:meth:`SessionRecorder.restore_sql`) re-runs the recorded SETs in order, the SQL
PREPAREs, LISTENs and lock acquisitions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from shadow.sqltext import leading_words, quote_ident, statement_count

__all__ = ["SessionRecorder", "Staged"]

_QUERY, _PARSE = ord("Q"), ord("P")
_INTERESTING = frozenset({
    b"SET", b"RESET", b"DISCARD", b"LISTEN", b"UNLISTEN", b"PREPARE", b"DEALLOCATE",
    b"DECLARE", b"CLOSE", b"CREATE", b"SELECT", b"ROLLBACK",
})  # fmt: skip
#: the first word when nothing but blanks comes before it
_FIRST_WORD = re.compile(rb"[ \t\r\n\f\v]*([A-Za-z][A-Za-z_]*)")
_ADVISORY = re.compile(
    rb"pg_(try_)?advisory_(unlock_all|unlock|lock)(_shared)?\s*\(([^()]*)\)", re.IGNORECASE
)
_ADVISORY_HINT = re.compile(rb"advisory", re.IGNORECASE)
_INT_ARGS = re.compile(rb"^\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?$")
_SET_NAME = re.compile(rb"^\s*SET\s+(?:SESSION\s+)?(.*?)(?:\s+TO\s|\s*=|\s+FROM\s+CURRENT)", re.IGNORECASE | re.DOTALL)
_SPECIAL_SETS = {  # SET forms without TO/=: name -> the parameter they set
    b"TIME": "timezone", b"NAMES": "client_encoding", b"SCHEMA": "search_path",
    b"ROLE": "role", b"SESSION": "session_authorization", b"XML": "xmloption",
}  # fmt: skip
_WITH_HOLD = re.compile(rb"\bWITH\s+HOLD\b", re.IGNORECASE)
_CURSOR_NAME = re.compile(rb"^\s*DECLARE\s+(\"(?:[^\"]|\"\")+\"|\w+)", re.IGNORECASE)
_CLOSE_NAME = re.compile(rb"^\s*CLOSE\s+(ALL\b|\"(?:[^\"]|\"\")+\"|\w+)", re.IGNORECASE)
_PREPARE_NAME = re.compile(rb"^\s*PREPARE\s+(\"(?:[^\"]|\"\")+\"|\w+)", re.IGNORECASE)
_DEALLOCATE_NAME = re.compile(rb"^\s*DEALLOCATE\s+(?:PREPARE\s+)?(ALL\b|\"(?:[^\"]|\"\")+\"|\w+)", re.IGNORECASE)
_CHANNEL = re.compile(rb"^\s*(?:UN)?LISTEN\s+(\*|\"(?:[^\"]|\"\")+\"|\w+)", re.IGNORECASE)


def _ident(raw: bytes) -> str:
    """An identifier as Postgres folds it: quoted keeps case, unquoted goes lower."""
    text = raw.decode("utf-8", "replace")
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


@dataclass
class Staged:
    """Effects of the current transaction, applied only if it commits."""

    sets: list[tuple[str | None, str]] = field(default_factory=list)  # (name or None = RESET ALL, sql)
    listen: list[tuple[str, bool]] = field(default_factory=list)  # (channel or "*", on)
    rolled_back_to_savepoint: bool = False


class SessionRecorder:
    """Records a session's movable state from the client's SQL. Feed every Query text and
    every Parse text with :meth:`on_sql`, and every transaction end (ReadyForQuery 'I')
    with :meth:`end_transaction`. See the module docstring."""

    def __init__(self) -> None:
        #: parameter -> the SQL that set it last (in first-set order; RESET removes)
        self.settings: dict[str, str] = {}
        #: SQL-level prepared statements: name -> PREPARE statement
        self.prepared: dict[str, str] = {}
        self.channels: dict[str, None] = {}
        #: session advisory locks held: (key args, shared) -> how many times
        self.advisory: Counter[tuple[tuple[int, ...], bool]] = Counter()
        self.temp_objects = 0
        self.held_cursors: set[str] = set()
        #: reasons this session cannot move faithfully (empty: it can)
        self.blockers: set[str] = set()
        self._staged = Staged()

    # ------------------------------------------------------------------ input

    def on_sql(self, sql: bytes) -> None:
        """A statement text the client sent (Query or Parse). Multi-statement Queries are
        looked at as a whole: only their first statement is interpreted, and if a later one
        might change session state the session is marked not movable."""
        m = _FIRST_WORD.match(sql)  # the hot path stays in C: most statements are not ours
        if m is not None:
            first = m.group(1).upper()
        else:  # a comment first (or nothing): the careful scan
            words = leading_words(sql, 1)
            first = words[0] if words else b""
        if first not in _INTERESTING:
            return
        if first == b"SELECT":  # one C-speed search
            if _ADVISORY_HINT.search(sql):
                self._advisory(sql)
            return
        words = leading_words(sql, 3)
        if statement_count(sql) > 1:
            self.blockers.add("session state changed inside a multi-statement Query")
            return
        first = words[0]
        if first == b"SET":
            self._set(sql, words)
        elif first == b"RESET":
            name = "ALL" if len(words) > 1 and words[1] == b"ALL" else None
            if name == "ALL":
                self._staged.sets.append((None, "RESET ALL"))
            else:
                target = self._reset_target(sql)
                if target is not None:
                    self._staged.sets.append((target, ""))
        elif first == b"DISCARD":
            what = words[1] if len(words) > 1 else b""
            if what == b"ALL":
                self._discard_all()
            elif what in (b"TEMP", b"TEMPORARY"):
                self.temp_objects = 0
                self.blockers.discard("temporary objects")
        elif first in (b"LISTEN", b"UNLISTEN"):
            m = _CHANNEL.match(sql)
            if m:
                channel = "*" if m.group(1) == b"*" else _ident(m.group(1))
                self._staged.listen.append((channel, first == b"LISTEN"))
        elif first == b"PREPARE" and not (len(words) > 1 and words[1] == b"TRANSACTION"):
            m = _PREPARE_NAME.match(sql)
            if m:
                self.prepared[_ident(m.group(1))] = sql.decode("utf-8", "replace").strip().rstrip(";")
        elif first == b"DEALLOCATE":
            m = _DEALLOCATE_NAME.match(sql)
            if m:
                if m.group(1).upper() == b"ALL":
                    self.prepared.clear()
                else:
                    self.prepared.pop(_ident(m.group(1)), None)
        elif first == b"DECLARE":
            if _WITH_HOLD.search(sql):
                m = _CURSOR_NAME.match(sql)
                self.held_cursors.add(_ident(m.group(1)) if m else "?")
                self.blockers.add("cursors WITH HOLD")
        elif first == b"CLOSE":
            m = _CLOSE_NAME.match(sql)
            if m:
                if m.group(1).upper() == b"ALL":
                    self.held_cursors.clear()
                else:
                    self.held_cursors.discard(_ident(m.group(1)))
                if not self.held_cursors:
                    self.blockers.discard("cursors WITH HOLD")
        elif first == b"CREATE":
            if any(w.startswith(b"TEMP") for w in words[1:3]):
                self.temp_objects += 1
                self.blockers.add("temporary objects")
        elif first == b"ROLLBACK":
            if len(words) > 1 and words[1] == b"TO":
                self._staged.rolled_back_to_savepoint = True

    def on_streamed(self, tag: int, head: bytes) -> None:
        """The first bytes of a client message too long to be held whole: for a Query or
        a Parse, its text's first bytes go to :meth:`on_streamed_sql`; other types carry
        no SQL."""
        if tag == _QUERY:
            self.on_streamed_sql(head)
        elif tag == _PARSE:
            self.on_streamed_sql(head[head.find(0) + 1:])  # after the statement's name

    def on_streamed_sql(self, head: bytes) -> None:
        """The first bytes of a statement text too long to be held whole (streamed, see
        shadow/framing.py). If it starts with anything :meth:`on_sql` would record, the
        session is marked not movable: the rest of the text is never seen. A long text
        that starts otherwise (the usual INSERT or COPY data) records nothing; session
        state changed by a later statement of such a multi-statement text is not seen."""
        words = leading_words(head, 1)
        first = words[0] if words else b""
        if (first in _INTERESTING and first != b"SELECT") or _ADVISORY_HINT.search(head):
            self.blockers.add("a statement over [server] max_buffered_message that may change session state")

    def end_transaction(self, committed: bool) -> None:
        """The transaction ended (ReadyForQuery 'I'): apply its staged effects if it
        committed, drop them if not."""
        staged = self._staged
        if not (staged.sets or staged.listen or staged.rolled_back_to_savepoint):
            return  # the common case: nothing staged, nothing to make (once per transaction)
        self._staged = Staged()
        if not committed:
            return
        if staged.rolled_back_to_savepoint and staged.sets:
            self.blockers.add("SET in a transaction that rolled back to a savepoint")
        for name, sql in staged.sets:
            if name is None:
                self.settings.clear()
            elif sql:
                self.settings.pop(name, None)
                self.settings[name] = sql
            else:
                self.settings.pop(name, None)
        for channel, on in staged.listen:
            if channel == "*":
                self.channels.clear()
            elif on:
                self.channels[channel] = None
            else:
                self.channels.pop(channel, None)

    # ------------------------------------------------------------------ output

    @property
    def movable(self) -> bool:
        return not self.blockers

    @property
    def not_movable(self) -> list[str]:
        return sorted(self.blockers)

    def restore_sql(self) -> list[str]:
        """Statements that rebuild the session on a fresh backend (after the start-up with
        the same parameters), in order: settings, prepared statements, LISTEN, locks."""
        out = list(self.settings.values())
        out += self.prepared.values()
        out += [f"LISTEN {quote_ident(ch)}" for ch in self.channels]
        for (args, shared), n in self.advisory.items():  # in the order first taken
            fn = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
            out += [f"SELECT pg_catalog.{fn}({', '.join(map(str, args))})"] * n
        return out

    # ------------------------------------------------------------------ internals

    def _set(self, sql: bytes, words: list[bytes]) -> None:
        if len(words) > 1 and words[1] in (b"LOCAL", b"TRANSACTION", b"CONSTRAINTS"):
            return
        if len(words) > 2 and words[1] == b"SESSION" and words[2] == b"CHARACTERISTICS":
            self._staged.sets.append(("default_transaction_characteristics", sql.decode("utf-8", "replace")))
            return
        key = words[2] if len(words) > 2 and words[1] == b"SESSION" else (words[1] if len(words) > 1 else b"")
        name = _SPECIAL_SETS.get(key)
        if name is None:
            m = _SET_NAME.match(sql)
            if not m:
                self.blockers.add("a SET connmgr could not read")
                return
            name = m.group(1).strip().decode("utf-8", "replace").lower()
        self._staged.sets.append((name, sql.decode("utf-8", "replace").strip().rstrip(";")))

    def _reset_target(self, sql: bytes) -> str | None:
        words = leading_words(sql, 3)
        if len(words) < 2:
            return None
        name = _SPECIAL_SETS.get(words[1])
        if words[1] == b"SESSION" and len(words) > 2 and words[2] == b"AUTHORIZATION":
            return "session_authorization"
        if name is not None:
            return name
        rest = sql.decode("utf-8", "replace").strip().rstrip(";").split(None, 1)
        return rest[1].strip().lower() if len(rest) > 1 else None

    def _advisory(self, sql: bytes) -> None:
        for m in _ADVISORY.finditer(sql):
            try_, kind, shared, args = m.group(1), m.group(2).lower(), bool(m.group(3)), m.group(4)
            if kind == b"unlock_all":
                self.advisory.clear()
                continue
            if try_:
                if kind == b"lock":
                    self.blockers.add("pg_try_advisory_lock (granted or not is in the reply)")
                continue
            a = _INT_ARGS.match(args)
            if not a:
                self.blockers.add("advisory locks with keys that are not literals")
                continue
            key = (tuple(int(g) for g in a.groups() if g is not None), shared)
            if kind == b"lock":
                self.advisory[key] += 1
            elif self.advisory[key] > 0:
                self.advisory[key] -= 1
                if not self.advisory[key]:
                    del self.advisory[key]

    def _discard_all(self) -> None:
        self._staged = Staged()
        self.settings.clear()
        self.prepared.clear()
        self.channels.clear()
        self.advisory.clear()
        self.temp_objects = 0
        self.held_cursors.clear()
        self.blockers = {b for b in self.blockers if b.startswith(("SET in", "session state", "a SET"))}
