"""Resuming a session on another server (sans-IO): compare a replay with what the client
already has, complete a commit that is known to have committed, and fail a transaction that
cannot move (seed 004 [0055], [0088]-[0089]).

Three pieces, each a pure function of bytes and the session shadow:

* :class:`ReplayMatcher` -- the new server's replies to the replayed requests, checked
  message by message against the replies the client already received. Duplicates are
  swallowed; once every reply the client has is matched, what follows is live and goes to
  the client. The comparison is exact except for what legitimately differs between two
  servers holding the same data: asynchronous messages (NoticeResponse, ParameterStatus,
  NotificationResponse) and the table OID and column number in a RowDescription. Anything
  else that differs -- a row, a command tag, an error -- means the transaction cannot be
  moved faithfully (``now()``, ``random()``, a row another session changed meanwhile).
* :func:`commit_completion` -- the replies a client is still waiting for from a commit
  the secondary says committed. Because a writing marker flushes the server's output before
  the commit (``replay/markers.py``), those can only be the commit's own replies:
  ``CommandComplete COMMIT`` (when the client's request was a COMMIT) and
  ``ReadyForQuery 'I'``; for the extended protocol, the COMMIT's Parse/Bind/Describe/
  Close completions too. Anything else (a FunctionCall, results not flushed) returns None:
  connmgr does not invent replies it cannot know.
* :func:`failed_replies` -- the ErrorResponse (SQLSTATE 40001) and ReadyForQuery a client
  gets for the request it is waiting on when its transaction could not be moved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from struct import Struct

from shadow.session import PendingRequest
from shadow.sqltext import is_commit

__all__ = [
    "ReplayMatcher",
    "split_messages",
    "commit_completion",
    "failed_replies",
    "error_message",
    "MOVE_FAILED_SQLSTATE",
]

_HEAD = Struct("!cI")
_I16 = Struct("!h")
#: messages a server sends on its own schedule: not part of the comparison
_ASYNC = frozenset(b"NSA")
MOVE_FAILED_SQLSTATE = "40001"


def split_messages(data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """Complete typed messages in ``data`` as (type byte, body); raises ValueError on a
    truncated or malformed stream (the journal only ever holds whole messages)."""
    out = []
    view = memoryview(data)
    i, n = 0, len(view)
    while i < n:
        if n - i < 5:
            raise ValueError(f"truncated message header at byte {i}")
        tag, length = _HEAD.unpack_from(view, i)
        if length < 4 or i + 1 + length > n:
            raise ValueError(f"bad message length {length} at byte {i}")
        out.append((tag[0], bytes(view[i + 5:i + 1 + length])))
        i += 1 + length
    return out


def _normal_row_description(body: bytes) -> bytes:
    """A RowDescription without table OIDs and column numbers (they differ per server)."""
    (count,) = _I16.unpack_from(body, 0)
    out = bytearray(body[:2])
    i = 2
    for _ in range(count):
        end = body.index(0, i)
        out += body[i:end + 1]
        i = end + 1
        out += bytes(6)  # table oid (4) + attnum (2)
        out += body[i + 6:i + 18]  # type oid, typlen, typmod, format
        i += 18
    return bytes(out)


def _comparable(tag: int, body: bytes) -> bytes:
    if tag == 84:  # 'T'
        try:
            return _normal_row_description(body)
        except (ValueError, IndexError):
            return body
    return body


_NAMES = {
    ord("T"): "RowDescription", ord("D"): "DataRow", ord("C"): "CommandComplete", ord("E"): "ErrorResponse",
    ord("Z"): "ReadyForQuery", ord("1"): "ParseComplete", ord("2"): "BindComplete", ord("3"): "CloseComplete",
    ord("n"): "NoData", ord("t"): "ParameterDescription", ord("G"): "CopyInResponse", ord("H"): "CopyOutResponse",
    ord("d"): "CopyData", ord("c"): "CopyDone", ord("I"): "EmptyQueryResponse", ord("s"): "PortalSuspended",
    ord("V"): "FunctionCallResponse",
}  # fmt: skip


def _describe(tag: int, body: bytes) -> str:
    name = _NAMES.get(tag, repr(chr(tag)))
    if tag == ord("C"):
        text = body.rstrip(b"\0").decode("utf-8", "replace")
        return f"{name} {text!r}"
    if tag == ord("E"):
        return f"{name} {error_message(body)!r}"
    if tag == ord("D"):
        return f"{name} {_row_text(body)}"
    return name


def _row_text(body: bytes, limit: int = 80) -> str:
    """A DataRow's values as text (for the 40001 detail): (v1, v2, ...)."""
    try:
        (count,) = _I16.unpack_from(body, 0)
        values, i = [], 2
        for _ in range(count):
            n = int.from_bytes(body[i:i + 4], "big", signed=True)
            i += 4
            if n < 0:
                values.append("NULL")
            else:
                values.append(body[i:i + n].decode("utf-8", "replace"))
                i += n
        text = "(" + ", ".join(values) + ")"
    except (ValueError, IndexError):
        return "(unreadable)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ReplayMatcher:
    """Feed the new server's replies (:meth:`feed`); see the module docstring.

    ``expected`` is what the client already received since its transaction began. After
    each feed, :attr:`difference` (a sentence) is set if the replay differed, and once
    :attr:`matched` is true, :meth:`feed` returns the live bytes that follow the last
    matched reply (they belong to the client)."""

    def __init__(self, expected: bytes | bytearray) -> None:
        self._expected = [(t, _comparable(t, b)) for t, b in split_messages(expected) if t not in _ASYNC]
        self._next = 0
        self.difference: str | None = None
        self.matched = not self._expected
        self.compared = 0

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Compare complete messages ``data``; returns the bytes to pass on to the client."""
        if self.difference is not None:
            return b""
        if self.matched:
            return bytes(data)
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            tag, length = _HEAD.unpack_from(view, i)
            tag = tag[0]
            end = i + 1 + length
            if tag not in _ASYNC:
                body = bytes(view[i + 5:end])
                want_tag, want = self._expected[self._next]
                if tag != want_tag or _comparable(tag, body) != want:
                    self.difference = (
                        f"reply {self._next + 1} of the replay is {_describe(tag, body)}"
                        f" where the client received {_describe(want_tag, want)}"
                    )
                    return b""
                self._next += 1
                self.compared += 1
                if self._next == len(self._expected):
                    self.matched = True
                    return bytes(view[end:])
            i = end
        return b""


def error_message(body: bytes) -> str:
    """The 'M' field of an ErrorResponse/NoticeResponse body."""
    for field in bytes(body).split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode("utf-8", "replace")
    return ""


def _msg(tag: bytes, body: bytes = b"") -> bytes:
    return _HEAD.pack(tag, len(body) + 4) + body


def _last_request_replied(replies: bytes | bytearray) -> list[int]:
    """Type bytes of the replies after the last ReadyForQuery in ``replies``."""
    tags: list[int] = []
    for tag, _body in split_messages(replies):
        if tag == ord("Z"):
            tags = []
        elif tag not in _ASYNC:
            tags.append(tag)
    return tags


def commit_completion(group: Sequence[PendingRequest], replies: bytes | bytearray,
                      statement_sql) -> bytes | None:  # fmt: skip
    """The replies the client still waits for from the sync group ``group`` (the shadow's
    pending requests up to and including the Query or Sync that ends the transaction),
    given that the transaction committed; ``replies`` is what the client received of its
    transaction; ``statement_sql(req)`` gives the SQL a request runs. None if they cannot
    be known."""
    if not group:
        return None
    last = group[-1]
    if last.kind == "Q":
        if len(group) != 1:
            return None
        seen = _last_request_replied(replies)
        if last.sql is not None and is_commit(last.sql.encode("utf-8", "replace")) and ord("C") not in seen:
            return _msg(b"C", b"COMMIT\0") + _msg(b"Z", b"I")
        return _msg(b"Z", b"I")  # an autocommit write: its results were flushed before the commit
    if last.kind != "S":
        return None
    out = bytearray()
    for req in group[:-1]:
        kind = req.kind
        if kind == "P":
            out += _msg(b"1")
        elif kind == "B":
            out += _msg(b"2")
        elif kind == "C":
            out += _msg(b"3")
        elif kind == "D":
            if req.statement is not None:
                out += _msg(b"t", b"\0\0")
            out += _msg(b"n")
        elif kind == "E":
            sql = statement_sql(req)
            if sql is None or not is_commit(sql.encode("utf-8", "replace")):
                return None  # results of a statement connmgr has not seen
            out += _msg(b"C", b"COMMIT\0")
        else:
            return None
    return bytes(out + _msg(b"Z", b"I"))


def move_error_body(reason: str) -> bytes:
    """The ErrorResponse body for a transaction that could not move."""
    fields = [
        b"SERROR", b"VERROR", b"C" + MOVE_FAILED_SQLSTATE.encode(),
        b"Mconnmgr: the database server failed and this transaction could not be moved to the new"
        b" server; it was rolled back",
        ("D" + reason).encode("utf-8", "replace"),
        b"HRetry the transaction; the session itself is intact on the new server.",
    ]  # fmt: skip
    return b"\0".join(fields) + b"\0\0"


def failed_replies(reason: str, status: bytes) -> bytes:
    """ErrorResponse 40001 + ReadyForQuery(``status``) for the request the client waits on."""
    return _msg(b"E", move_error_body(reason)) + _msg(b"Z", status)


def sync_groups(pending: Iterable[PendingRequest]) -> list[list[PendingRequest]]:
    """The shadow's pending requests cut after each Query, Sync or FunctionCall."""
    groups: list[list[PendingRequest]] = []
    current: list[PendingRequest] = []
    for req in pending:
        current.append(req)
        if req.kind in ("Q", "S", "F"):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups
