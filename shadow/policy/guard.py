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
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache

from shadow.policy.analysis import Statement
from shadow.policy.catalog import Catalog
from shadow.policy.decision import Refusal, refusal_sql, rewrite_query_by_shape
from shadow.policy.rules import ClientClass

__all__ = ["Guard", "decide"]

_Q, _P, _B, _F = ord("Q"), ord("P"), ord("B"), ord("F")
_LEN = struct.Struct("!I")
_H = struct.Struct("!h")
_I = struct.Struct("!i")


@lru_cache(maxsize=8192)
def decide(cls: ClientClass, catalog: Catalog | None, text: bytes) -> tuple[bytes | None, Refusal | None]:
    """(the statement text to send instead, the refusal) or (None, None)."""
    sql = text.decode("utf-8", "surrogateescape")  # (bytes of another client_encoding come back unchanged)
    new, refusal = rewrite_query_by_shape(sql, cls, catalog)
    return (None, None) if new is None else (new.encode("utf-8", "surrogateescape"), refusal)


class Guard:
    """``on_refusal(refusal)`` is told of every refused statement (logs, metrics)."""

    __slots__ = ("cls", "on_refusal", "refused", "catalog")

    def __init__(self, cls: ClientClass, on_refusal: Callable[[Refusal], None],
                 catalog: Callable[[], Catalog | None] = lambda: None) -> None:  # fmt: skip
        self.cls = cls
        self.on_refusal = on_refusal
        #: the database's catalog as it is now (refreshed by connmgr/proxy/policy.py)
        self.catalog = catalog
        #: names of prepared statements replaced by a refusal (b"" the unnamed one)
        self.refused: set[bytes] = set()

    def filter(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """``frames`` ((tag, start, end) of ``buf``) with refused statements replaced; the
        same objects when nothing is."""
        out: list[bytes] | None = None
        done = 0
        for tag, start, end in frames:
            if tag == _Q:
                new, refusal = decide(self.cls, self.catalog(), bytes(buf[start:end - 1]))
                if new is None:
                    continue
                message = b"Q" + _LEN.pack(len(new) + 5) + new + b"\0"
            elif tag == _P:
                name_end = buf.find(0, start, end)
                text_end = buf.find(0, name_end + 1, end)
                if name_end < 0 or text_end < 0:
                    continue  # malformed: the server refuses it (08P01)
                name = bytes(buf[start:name_end])
                new, refusal = decide(self.cls, self.catalog(), bytes(buf[name_end + 1:text_end]))
                if new is None:
                    self.refused.discard(name)  # (the name now holds an allowed statement)
                    continue
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
            elif tag == _B and self.refused:
                message = _unbound(buf, start, end, self.refused)
                if message is None:
                    continue
                refusal = None
            else:
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


def _unbound(buf: bytes, start: int, end: int, refused: set[bytes]) -> bytes | None:
    """A Bind to a refused statement, with its parameters taken out (the raising DO has
    none); None for any other Bind, or one too malformed to read (the server says so)."""
    portal_end = buf.find(0, start, end)
    name_end = buf.find(0, portal_end + 1, end)
    if portal_end < 0 or name_end < 0 or bytes(buf[portal_end + 1:name_end]) not in refused:
        return None
    try:
        pos = name_end + 1
        (nfmt,) = _H.unpack_from(buf, pos)
        pos += 2 + 2 * nfmt
        (nparams,) = _H.unpack_from(buf, pos)
        pos += 2
        for _ in range(nparams):
            (length,) = _I.unpack_from(buf, pos)
            pos += 4 + max(length, 0)
        if pos > end:
            return None
    except struct.error:
        return None
    body = bytes(buf[start:name_end + 1]) + b"\0\0\0\0" + bytes(buf[pos:end])  # no formats, no values
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
