"""A small etcd v3 client for the leader lease, over etcd's HTTP/JSON gateway (httpx on trio).

Patroni talks to etcd v3 the same way (plain HTTP to the gateway, no grpc): the gRPC
clients on PyPI need asyncio or a thread, and grpcio with protobuf is a large,
version-sensitive dependency (``labs/host_failover/FEASIBILITY.md`` tried six).
Keys and values travel base64-encoded; 64-bit integers (lease ids, revisions) as JSON
strings. The paths are etcd 3.4's (``/v3/...``).

**Every member is an endpoint.** A request goes to the member that answered last, and on
failure (connection refused, timeout, a 5xx) to the next, each attempt bounded by
``attempt_timeout``; :class:`EtcdUnavailable` only when none answered. That matters for
the partition trials: with only the link between the two hosts cut, host A's own member
may not reach the raft leader, but the witness's does, and host A keeps its key through it.

Callers bound the whole call with a cancel scope as usual; nothing here retries forever.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import httpx
import trio

log = logging.getLogger("connmgr.etcd")

__all__ = ["Etcd", "EtcdError", "EtcdUnavailable", "KeyValue"]


class EtcdError(Exception):
    """etcd answered, but with an error (the message is etcd's). Internal: the leader
    lease handles it; no client sees it."""


class EtcdUnavailable(EtcdError):
    """No member answered. Internal, like :class:`EtcdError`."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode("utf-8", "replace")


class Etcd:
    """See the module docstring. ``endpoints``: ``http://host:port`` of every member."""

    def __init__(self, endpoints: list[str], *, attempt_timeout: float = 0.5) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.attempt_timeout = attempt_timeout
        self._client = httpx.AsyncClient(timeout=None)  # the cancel scopes time out
        self._current = 0
        self.failures = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, path: str, body: dict) -> dict:
        """POST ``body`` to ``/v3/<path>`` on the first member that answers; returns the
        decoded JSON. Raises EtcdUnavailable or EtcdError."""
        errors = []
        n = len(self.endpoints)
        for i in range(n):
            at = (self._current + i) % n
            url = f"{self.endpoints[at]}/v3/{path}"
            with trio.move_on_after(self.attempt_timeout) as scope:
                try:
                    r = await self._client.post(url, json=body)
                except httpx.HTTPError as e:
                    errors.append(f"{self.endpoints[at]}: {e.__class__.__name__} {e}")
                    self.failures += 1
                    continue
            if scope.cancelled_caught:
                errors.append(f"{self.endpoints[at]}: no answer within {self.attempt_timeout:g} s")
                self.failures += 1
                continue
            if r.status_code >= 500:
                errors.append(f"{self.endpoints[at]}: HTTP {r.status_code} {r.text[:200]}")
                self.failures += 1
                continue
            self._current = at
            data = r.json()
            if r.status_code != 200 or "error" in data or ("code" in data and "message" in data):
                raise EtcdError(f"etcd {path}: {data.get('message') or data.get('error') or r.text[:200]}")
            return data
        raise EtcdUnavailable(f"no etcd member answered {path}: " + "; ".join(errors))

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease of ``ttl`` seconds: (lease id, the TTL etcd granted)."""
        d = await self.call("lease/grant", {"TTL": ttl})
        return int(d["ID"]), int(d["TTL"])

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns its TTL now (0: the lease is gone)."""
        d = await self.call("lease/keepalive", {"ID": str(lease_id)})
        return int(d.get("result", {}).get("TTL", 0) or 0)

    async def revoke(self, lease_id: int) -> None:
        """End a lease now (its keys go with it); a lease already gone is not an error."""
        try:
            await self.call("lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    # ------------------------------------------------------------------ keys

    async def get(self, key: str) -> KeyValue | None:
        d = await self.call("kv/range", {"key": _b64(key)})
        for kv in d.get("kvs", ()):
            return KeyValue(_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv.get("create_revision", 0)),
                            int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))  # fmt: skip
        return None

    async def create(self, key: str, value: str, lease_id: int) -> tuple[bool, int, KeyValue | None]:
        """Create ``key`` with ``value`` on the lease, only if it does not exist. Returns
        (created, the revision of that transaction, the holder's key when not created)."""
        k = _b64(key)
        d = await self.call("kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
            "failure": [{"request_range": {"key": k}}],
        })  # fmt: skip
        revision = int(d["header"]["revision"])
        if d.get("succeeded"):
            return True, revision, None
        holder = None
        for resp in d.get("responses", ()):
            for kv in resp.get("response_range", {}).get("kvs", ()):
                holder = KeyValue(_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv.get("create_revision", 0)),
                                  int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))  # fmt: skip
        return False, revision, holder

    async def holds(self, key: str, value: str, create_revision: int) -> bool:
        """Is ``key`` still the one created at ``create_revision`` with ``value``? A
        linearizable check (it goes through the raft leader): the fencing check."""
        k = _b64(key)
        d = await self.call("kv/txn", {
            "compare": [
                {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)},
                {"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(value)},
            ],
        })  # fmt: skip
        return bool(d.get("succeeded"))

    async def put_if_held(self, key: str, value: str, leader_key: str, create_revision: int) -> bool:
        """Set ``key`` (no lease) to ``value`` only while ``leader_key`` is the one created
        at ``create_revision``: a write only the leader can make."""
        k = _b64(leader_key)
        d = await self.call("kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })  # fmt: skip
        return bool(d.get("succeeded"))

    async def delete_if(self, key: str, create_revision: int) -> bool:
        """Delete ``key`` if it is still the one created at ``create_revision`` (resigning)."""
        k = _b64(key)
        d = await self.call("kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)}],
            "success": [{"request_delete_range": {"key": k}}],
        })  # fmt: skip
        return bool(d.get("succeeded"))

    # ------------------------------------------------------------------ cluster

    async def status(self, endpoint: str) -> dict:
        """One member's status (``leader``, ``header.member_id``), from that member only."""
        with trio.fail_after(self.attempt_timeout * 4):
            r = await self._client.post(f"{endpoint.rstrip('/')}/v3/maintenance/status", json={})
        return r.json()

    async def move_leader(self, target_member_id: str) -> None:
        """Make ``target_member_id`` the raft leader (sent to the current leader)."""
        for endpoint in self.endpoints:
            try:
                st = await self.status(endpoint)
            except (httpx.HTTPError, trio.TooSlowError):
                continue
            if st.get("leader") == st.get("header", {}).get("member_id"):
                if st["leader"] == target_member_id:
                    return
                with trio.fail_after(10):
                    r = await self._client.post(f"{endpoint}/v3/maintenance/transfer-leadership",
                                                json={"targetID": target_member_id})  # fmt: skip
                if r.status_code != 200:
                    raise EtcdError(f"moving the raft leader failed: HTTP {r.status_code} {r.text[:200]}")
                return
        raise EtcdUnavailable("no etcd member says it is the raft leader")
