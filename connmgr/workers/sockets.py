"""Listen addresses shared by processes with ``SO_REUSEPORT``.

The supervisor :func:`reserve`\\ s each configured address (bound, never listening: it gets
no connections, it holds the port); each worker :func:`open_shared_listeners` on exactly
the addresses reserved, and the kernel balances new connections among the listeners.
All must run as the same user (the kernel's rule for sharing a port).
"""

from __future__ import annotations

import socket

import trio

__all__ = ["format_address", "open_shared_listeners", "reserve"]


def _shared_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def reserve(host: str, port: int) -> list[socket.socket]:
    """Bind a shared socket to every address ``host`` resolves to (all on one port: with
    port 0, the first one's). Raises OSError (in use by a socket that does not share,
    cannot resolve)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen, out = set(), []
    try:
        for family, _type, _proto, _name, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = _shared_socket(family)
            out.append(sock)
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def format_address(sock: socket.socket) -> str:
    """``host:port`` of a bound socket (``[v6]:port`` for IPv6), as [server] listen takes it."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def open_shared_listeners(host: str, port: int, backlog: int = 4096) -> list[trio.SocketListener]:
    """Listeners on a reserved address (the literal IP :func:`format_address` gave)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _shared_socket(family)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
