"""The host-failover lab's network: five network namespaces, built with pyroute2 (issue 14).

How it works
------------
::

    client ──┐
    hosta  ──┤  bridge br0 in ``router``; host A's port (r-hosta) is also copied,
    hostb  ──┤  both directions, to host B's port (tc clsact + u32 + mirred), as a
    witness ─┘  switch's mirror port would (seed 004 [0039]-[0040])

Each host has one veth, ``eth0`` in its namespace and ``r-<host>`` on the bridge, an
address from the benchmarking range 198.18.0.0/15 and no default route: nothing the lab
sends can leave it. Host A holds the VIP at the start. Namespace names carry a prefix of
this process (``cm<pid>-``), so labs of concurrent test runs never meet.

:meth:`NetLab.kill_host` is host death as the issue defines it: the host's router port goes
down and every process in its namespace gets SIGKILL at the same instant, so its kernel
sends no FIN and no RST. :meth:`NetLab.cut` / :meth:`NetLab.heal` cut the frames between
two hosts (an nftables bridge filter in the router), for the partition trials.

Teardown (:meth:`NetLab.close`, also on any failure while building) kills what still runs
in the namespaces and removes them. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and the
``[net]`` extra; :func:`missing` says what this machine lacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

__all__ = ["ADDRESSES", "HOSTS", "NetLab", "VIP", "in_netns", "missing"]

HOSTS = ("client", "hosta", "hostb", "witness")
_LABS = itertools.count()
ADDRESSES = {"client": "198.18.0.10", "hosta": "198.18.0.1", "hostb": "198.18.0.2", "witness": "198.18.0.3"}
VIP = "198.18.0.100"
PREFIXLEN = 24
CLONE_NEWNET = 0x40000000
_TC_INGRESS, _TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3

_libc = ctypes.CDLL(None, use_errno=True)


def missing() -> list[str]:
    """What this machine lacks to build the lab (empty: nothing)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            out.append(f"{tool} (apt-get install {package})")
    for module, extra in (("pyroute2", "pyroute2"), ("scapy", "scapy")):
        try:
            __import__(module)
        except ImportError:
            out.append(f"{extra} (pip install -e '.[net]')")
    return out


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in network namespace ``name`` (this thread only; Python 3.11 has no
    os.setns). A socket keeps the namespace it was made in, so sockets made inside the
    block can be used after it, from any thread."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


class NetLab:
    """See the module docstring. Use as a context manager, or call :meth:`build` and
    :meth:`close`."""

    def __init__(self, prefix: str | None = None, *, mirror: bool = True, vip_on: str | None = "hosta") -> None:
        # a new name for every lab of a process: the kernel destroys a deleted namespace's
        # links in the background, and a lab built at once under the same names found no
        # eth0 in its namespaces (the partition table, whose labs end quickly)
        self.prefix = prefix or f"cm{os.getpid()}{next(_LABS)}"
        self.ns = {role: f"{self.prefix}-{role}" for role in ("router", *HOSTS)}
        self.mirror = mirror
        self.vip_on = vip_on
        self.mac: dict[str, str] = {}
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> NetLab:
        self.build()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ building

    def build(self) -> NetLab:
        from pyroute2 import IPRoute, NetNS, netns

        lacking = missing()
        if lacking:
            raise RuntimeError("the lab needs: " + "; ".join(lacking))
        try:
            existing = set(netns.listnetns())
            for name in self.ns.values():
                if name in existing:
                    raise RuntimeError(f"network namespace {name} exists already (a lab left behind? ip netns del {name})")
            for name in self.ns.values():
                netns.create(name)
                self._made.append(name)
            router = self.ns["router"]
            with NetNS(router) as r:
                r.link("add", ifname="br0", kind="bridge")
                r.link("set", index=r.link_lookup(ifname="br0")[0], state="up")
                r.link("set", index=r.link_lookup(ifname="lo")[0], state="up")
            with IPRoute() as ipr:
                for i, host in enumerate(HOSTS):
                    tmp = f"{self.prefix}r{i}"[-15:]
                    ipr.link("add", ifname=tmp, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.ns[host]})
                    ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], net_ns_fd=router)
            with NetNS(router) as r:
                br = r.link_lookup(ifname="br0")[0]
                for i, host in enumerate(HOSTS):
                    idx = r.link_lookup(ifname=f"{self.prefix}r{i}"[-15:])[0]
                    r.link("set", index=idx, ifname=f"r-{host}")
                    r.link("set", index=idx, master=br, state="up")
                if self.mirror:
                    self._copy_frames(r, "hosta", "hostb")
            for host in HOSTS:
                self._bring_up(host, vip=host == self.vip_on)
        except BaseException:
            self.close()
            raise
        return self

    def _bring_up(self, host: str, vip: bool = False) -> None:
        from pyroute2 import NetNS

        with NetNS(self.ns[host]) as h:
            eth = h.link_lookup(ifname="eth0")[0]
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
            h.addr("add", index=eth, address=ADDRESSES[host], prefixlen=PREFIXLEN)
            if vip:
                h.addr("add", index=eth, address=VIP, prefixlen=PREFIXLEN)
            h.link("set", index=eth, state="up")
            self.mac[host] = h.get_links(eth)[0].get_attr("IFLA_ADDRESS")

    @staticmethod
    def _copy_frames(r, src: str, dst: str) -> None:
        """Copy every frame of ``src``'s router port, both directions, to ``dst``'s port."""
        a = r.link_lookup(ifname=f"r-{src}")[0]
        b = r.link_lookup(ifname=f"r-{dst}")[0]
        r.tc("add", "clsact", a)
        for parent in (_TC_INGRESS, _TC_EGRESS):
            r.tc("add-filter", "u32", a, parent=parent, protocol=0x0003, prio=10, keys=["0x0/0x0+0"],
                 target=0x10001, action={"kind": "mirred", "direction": "egress", "action": "mirror",
                                         "ifindex": b})  # fmt: skip

    def copy_frames(self, src: str, dst: str) -> None:
        """From now on also copy ``src``'s frames to ``dst`` (the pair turned around: the
        host that took over is copied to the one that follows it)."""
        from pyroute2 import NetNS

        with NetNS(self.ns["router"]) as r:
            self._copy_frames(r, src, dst)

    def reboot_host(self, host: str, timeout: float = 10) -> None:
        """Host ``host`` comes back after :meth:`kill_host`, as after a reboot: nothing of its
        old life (its kernel's orphaned connections of the VIP would otherwise send their
        FINs to clients that moved, once its port is up). Its link is deleted (the old
        namespace may linger while orphaned sockets hold it, but has no way out), and a new
        namespace of the same name gets a new link on the bridge, its address and no VIP."""
        from pyroute2 import IPRoute, NetNS, netns

        name = self.ns[host]
        self._kill_all_in(name)
        with NetNS(name) as h:
            h.link("del", index=h.link_lookup(ifname="eth0")[0])
        netns.remove(name)
        self._made.remove(name)
        deadline = time.monotonic() + timeout
        with NetNS(self.ns["router"]) as r:
            while r.link_lookup(ifname=f"r-{host}"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the old link of {host} did not go away within {timeout:g}s")
                time.sleep(0.05)
        netns.create(name)
        self._made.append(name)
        tmp = f"{self.prefix}r{HOSTS.index(host)}"[-15:]
        with IPRoute() as ipr:
            ipr.link("add", ifname=tmp, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], net_ns_fd=self.ns["router"])
        with NetNS(self.ns["router"]) as r:
            idx = r.link_lookup(ifname=tmp)[0]
            r.link("set", index=idx, ifname=f"r-{host}")
            r.link("set", index=idx, master=r.link_lookup(ifname="br0")[0], state="up")
        self._bring_up(host)

    def close(self) -> None:
        """Kill what runs in the lab and remove its namespaces (idempotent)."""
        from pyroute2 import netns

        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self._procs.clear()
        for name in list(self._made):
            self._kill_all_in(name)
            try:
                netns.remove(name)
            except Exception as e:  # noqa: BLE001 - report, keep removing the others
                print(f"netlab: could not remove namespace {name}: {e!r}")
            self._made.remove(name)

    # ------------------------------------------------------------------ running things

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace, in its own process group (killed at
        :meth:`close`). Keyword arguments go to :class:`subprocess.Popen`."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], **kw)
        self._procs.append(p)
        return p

    def run(self, host: str, argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *argv], capture_output=True, text=True,
                              timeout=timeout, check=check)  # fmt: skip

    def socket_in(self, host: str, *args) -> socket.socket:
        """A socket made in ``host``'s namespace."""
        with in_netns(self.ns[host]):
            return socket.socket(*args)

    def pids_in(self, host: str) -> list[int]:
        return self._pids(self.ns[host])

    @staticmethod
    def _pids(name: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
        return [int(p) for p in r.stdout.split()]

    def _kill_all_in(self, name: str) -> None:
        for _ in range(50):
            pids = self._pids(name)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    # ------------------------------------------------------------------ faults

    def set_port(self, host: str, up: bool) -> None:
        """Host ``host``'s port on the router up or down."""
        from pyroute2 import NetNS

        with NetNS(self.ns["router"]) as r:
            r.link("set", index=r.link_lookup(ifname=f"r-{host}")[0], state="up" if up else "down")

    def kill_host(self, host: str) -> float:
        """Host death: its router port down and SIGKILL to every process in its namespace,
        at the same instant (no FIN, no RST leaves it). Returns the time.monotonic() of
        the kill."""
        pids = self.pids_in(host)
        for pid in pids:  # frozen first: none of them runs between the first kill and the last
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.set_port(host, False)
        at = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._kill_all_in(self.ns[host])
        return at

    def nft(self, host: str, rules: str) -> None:
        """Load nftables ``rules`` (``nft -f`` syntax) in ``host``'s namespace."""
        subprocess.run(["ip", "netns", "exec", self.ns[host], "nft", "-f", "-"], input=rules, text=True,
                       check=True, capture_output=True, timeout=10)  # fmt: skip

    def cut(self, a: str, b: str) -> None:
        """Drop every frame between hosts ``a`` and ``b`` at the bridge (both ways)."""
        table = f"cut_{a}_{b}"
        self.nft("router", f"add table bridge {table}\n"
                           f"add chain bridge {table} forward {{ type filter hook forward priority 0 ; }}\n"
                           f"add rule bridge {table} forward iifname r-{a} oifname r-{b} drop\n"
                           f"add rule bridge {table} forward iifname r-{b} oifname r-{a} drop\n")  # fmt: skip

    def heal(self, a: str, b: str) -> None:
        self.run("router", ["nft", "delete", "table", "bridge", f"cut_{a}_{b}"])

    def heal_all(self) -> None:
        """Undo every cut and bring every host's port up (a dead host's stays dead)."""
        listed = self.run("router", ["nft", "list", "tables"], check=False).stdout
        for line in listed.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "bridge" and parts[2].startswith("cut_"):
                self.run("router", ["nft", "delete", "table", "bridge", parts[2]], check=False)
        for host in HOSTS:
            self.set_port(host, True)

    def neighbour(self, host: str, address: str) -> str | None:
        """The MAC ``host`` has for ``address`` in its neighbour table (None: no entry)."""
        from pyroute2 import NetNS

        with NetNS(self.ns[host]) as n:
            for nb in n.get_neighbours(family=socket.AF_INET):
                if nb.get_attr("NDA_DST") == address:
                    return nb.get_attr("NDA_LLADDR")
        return None
