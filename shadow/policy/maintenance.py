"""Objects under maintenance (seed 004 [0099]-[0101]): statements that touch one wait
until it is over, or until a limit, then fail with 55P03 naming it. No I/O.

:class:`Maintenance` is the list of entries (``connmgr maintenance begin|end OBJECT``, the
admin console's ``MAINTENANCE BEGIN|END``); :meth:`Maintenance.blocking` says which
entries a statement must wait for:

* a statement touches an entry's object when a table, view or function it names (views and
  SQL functions looked through, when the catalog is known) matches the entry's pattern
  (``schema.table``, globs, ``function:name``, as the policy's objects);
* the maintenance job's own sessions never wait: those whose ``application_name`` matches
  the entry's ``by`` (default ``connmgr-maintenance*``);
* a transaction that began before the entry goes on: it may hold the very locks the job
  waits for, and holding it would deadlock the two until the limit.

The waiting itself (a session's next request held, the others going on) is the relay's
(connmgr/proxy/relay.py, connmgr/proxy/engine.py), the limit the runtime's
(connmgr/proxy/policy.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from shadow.policy.rules import ObjectPattern, PolicyError
from shadow.sqltext import raising_do

__all__ = ["DEFAULT_BY", "Entry", "Maintenance", "touches", "wait_sql"]

DEFAULT_BY = "connmgr-maintenance*"


@dataclass(frozen=True, slots=True)
class Entry:
    pattern: ObjectPattern
    #: the maintenance job's application_name (a glob): its sessions never wait
    by: str
    #: Maintenance.version when it began (a transaction begun before it goes on)
    version: int
    #: when it began (for SHOW MAINTENANCE), in the caller's clock
    since: float

    @property
    def text(self) -> str:
        return self.pattern.text


class Maintenance:
    """The entries now; ``version`` counts every change."""

    __slots__ = ("entries", "version")

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.version = 0

    def begin(self, text: str, by: str = DEFAULT_BY, now: float = 0.0) -> Entry:
        """Raises PolicyError for text that is not an object."""
        pattern = ObjectPattern.parse(text, "maintenance")
        if not by.strip():
            raise PolicyError("maintenance: by: the application_name (a glob) of the maintenance job's sessions")
        self.version += 1
        entry = Entry(pattern, by, self.version, now)
        self.entries[pattern.text.strip().lower()] = entry
        return entry

    def end(self, text: str) -> Entry | None:
        entry = self.entries.pop(text.strip().lower(), None)
        if entry is not None:
            self.version += 1
        return entry

    def blocking(self, tables, functions, application_name: str, tx_version: int | None) -> tuple[Entry, ...]:
        """The entries a statement naming ``tables`` and ``functions`` ((schema or None,
        name) each) must wait for; ``tx_version``: the version when the session's open
        transaction began (None: not in one)."""
        out = []
        for entry in self.entries.values():
            if tx_version is not None and entry.version > tx_version:
                continue  # its transaction began first: it goes on
            if fnmatch.fnmatchcase(application_name, entry.by):
                continue  # the job itself
            if touches(entry, tables, functions):
                out.append(entry)
        return tuple(out)


def touches(entry: Entry, tables, functions) -> bool:
    """Does a statement naming ``tables`` and ``functions`` touch ``entry``'s object?"""
    kind = entry.pattern.kind
    return any(entry.pattern.matches(kind, schema, name) for schema, name in (tables if kind == "table" else functions))


def wait_sql(entries: tuple[Entry, ...], waited: float) -> str:
    """A statement that makes the server raise 55P03 (lock_not_available) for a statement
    that waited ``waited`` seconds for ``entries`` to end."""
    names = ", ".join(e.text for e in entries)
    message = f"{names} is under maintenance (connmgr): the statement waited {waited:g} s, the limit"
    detail = ("connmgr held the statement while the object was under maintenance ([policy] maintenance_wait);"
              " nothing of it ran. Retry it when the maintenance is over.")  # fmt: skip
    return raising_do("55P03", message, detail, "connmgr_maintenance")
