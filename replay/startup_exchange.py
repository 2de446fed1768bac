"""The start of a connection as host B saw it in the copied frames (issue 14): the
SCRAM exchange between the client and host A's connmgr, so that host B can recover the
client's ClientKey and log the session in again on its own database (SCRAM pass-through
needs it; host B never had the client's password). The mirror does not carry the
start-up, and no secret travels on it: host B derives the key itself, from the frames
and the verifier it holds (:func:`connmgr.auth.scram.recover_client_key`).

Sans-IO: bytes in (the first bytes of each stream, :meth:`TrackedConnection.head`), the
exchange's three messages out, or None when the start was not plain SCRAM (TLS, GSS,
another method, cut short).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SaslExchange", "sasl_exchange", "whole_messages"]

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104
_R, _P = ord("R"), ord("p")
SASL, SASL_CONTINUE = 10, 11


@dataclass(frozen=True, slots=True)
class SaslExchange:
    mechanism: str
    client_first: bytes
    server_first: bytes
    client_final: bytes


def whole_messages(data: bytes, start: int = 0) -> list[tuple[int, bytes]]:
    """The whole typed messages of ``data`` from ``start`` on, as (type byte, body); a
    partial one at the end, or a bad length, ends the list."""
    out, i, n = [], start, len(data)
    while n - i >= 5:
        length = int.from_bytes(data[i + 1:i + 5], "big")
        if length < 4 or i + 1 + length > n:
            break
        out.append((data[i], data[i + 5:i + 1 + length]))
        i += 1 + length
    return out


def sasl_exchange(client: bytes, server: bytes) -> SaslExchange | None:
    """The SCRAM exchange at the start of the streams ``client`` and ``server``."""
    i = s = 0
    while True:  # SSLRequest / GSSENCRequest answered 'N', then the StartupMessage
        if len(client) - i < 8:
            return None
        length = int.from_bytes(client[i:i + 4], "big")
        code = int.from_bytes(client[i + 4:i + 8], "big")
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            if server[s:s + 1] != b"N":  # encrypted: nothing to read here
                return None
            i, s = i + 8, s + 1
            continue
        if code >> 16 != 3 or length < 8 or i + length > len(client):
            return None
        i += length
        break
    responses = [body for tag, body in whole_messages(client, i) if tag == _P]
    continues = [body for tag, body in whole_messages(server, s) if tag == _R]
    if len(responses) < 2 or not continues or int.from_bytes(continues[0][:4], "big") != SASL:
        return None
    server = [b[4:] for b in continues if int.from_bytes(b[:4], "big") == SASL_CONTINUE]
    initial = responses[0]
    end = initial.find(0)
    if end < 0 or len(initial) < end + 5:
        return None
    mechanism = initial[:end].decode("ascii", "replace")
    size = int.from_bytes(initial[end + 1:end + 5], "big", signed=True)
    if size < 0:  # the client-first message comes in the next SASLResponse, asked for by
        # an empty SASLContinue
        if len(responses) < 3 or len(server) < 2:
            return None
        client_first, server_first, client_final = responses[1], server[1], responses[2]
    else:
        if not server:
            return None
        client_first, server_first, client_final = initial[end + 5:end + 5 + size], server[0], responses[1]
    return SaslExchange(mechanism, bytes(client_first), bytes(server_first), bytes(client_final))
