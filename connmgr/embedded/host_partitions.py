"""Partitions in the host-failover lab (issue 14, "decide without split brain"): each
scenario cuts part of the network of a fresh :class:`~connmgr.embedded.host_lab.HostLab`
and watches, from the client namespace, what a client would see:

* **who answers ARP for the VIP** (:class:`ArpWatch`): a who-has every 50 ms and the MACs
  that answered it. The host that answers is the one clients reach, whatever addresses
  the hosts believe they hold; two answers to one request is a split brain on the wire.
* **which connmgr accepts connections on the VIP** (:class:`AcceptWatch`): every 50 ms a
  TCP connection to VIP:5432 from inside host A's and host B's namespaces, from the VIP
  itself (so it can only reach that host's own listener), closed at once. Two hosts
  accepting at one moment would be two connmgrs serving new clients.
* **a client session** (:class:`Probe`): one connection through the VIP asking every
  100 ms which database answers it (``inet_server_addr()``), its errors and its longest
  wait.
* **the leader key** at the end (host B's connmgr log says whether it won it).

:func:`run_scenario` runs one; ``labs/host_failover/partitions.py`` prints the table.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from connmgr.embedded import netlab
from connmgr.embedded.host_lab import PORT, HostLab

__all__ = ["SCENARIOS", "AcceptWatch", "ArpWatch", "Probe", "Scenario", "ScenarioResult", "run_scenario"]

ETH_P_ARP = 0x0806


class ArpWatch:
    """Asks for the VIP's MAC every ``interval`` from the client namespace and records
    ``(time.monotonic(), the hosts whose MAC answered)``."""

    def __init__(self, lab: HostLab, interval: float = 0.05) -> None:
        from scapy.layers.l2 import ARP, Ether

        net = lab.net
        self.interval = interval
        self.by_mac = {mac.lower(): host for host, mac in net.mac.items()}
        client_mac = net.mac["client"]
        self.request = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=client_mac)
                             / ARP(op=1, hwsrc=client_mac, psrc=netlab.ADDRESSES["client"], pdst=netlab.VIP))  # fmt: skip
        self.sock = net.socket_in("client", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.bind(("eth0", ETH_P_ARP))
        self.sock.settimeout(interval)
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        vip = socket.inet_aton(netlab.VIP)
        while not self._stop.is_set():
            sent = time.monotonic()
            self.sock.send(self.request)
            seen: set[str] = set()
            while (left := sent + self.interval - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    frame = self.sock.recv(2048)
                except (TimeoutError, BlockingIOError):
                    break
                # an ARP reply (op 2) whose sender address is the VIP: its sender MAC
                if len(frame) >= 42 and frame[20:22] == b"\0\2" and frame[28:32] == vip:
                    mac = frame[22:28].hex(":")
                    seen.add(self.by_mac.get(mac, mac))
            self.samples.append((sent, tuple(sorted(seen))))

    def __enter__(self) -> ArpWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    @property
    def overlaps(self) -> list[tuple[float, tuple[str, ...]]]:
        """The requests two hosts answered."""
        return [(t, h) for t, h in self.samples if len(h) > 1]

    def story(self, since: float) -> str:
        """Who answered, as runs: ``hosta 2.9s -> none 0.4s -> hostb 3.1s``."""
        return _runs(self.samples, since, self.interval)


def _runs(samples: list[tuple[float, tuple[str, ...]]], since: float, interval: float) -> str:
    """Samples ``(time, hosts)`` from ``since`` on as runs: ``hosta 2.9s -> none 0.4s -> hostb 3.1s``."""
    runs: list[list] = []
    for t, h in samples:
        if t < since:
            continue
        name = "+".join(h) or "none"
        if runs and runs[-1][0] == name:
            runs[-1][2] = t
        else:
            runs.append([name, t, t])
    return " -> ".join(f"{name} {end - start + interval:.1f}s" for name, start, end in runs) or "-"


class AcceptWatch:
    """Every ``interval``, from inside each of ``hosts``' namespaces, tries a TCP connection
    to VIP:PORT bound to the VIP as its source address, and records ``(time.monotonic(),
    the hosts that accepted)``.

    Bound to the VIP, the attempt stays on the host: a host that does not hold the VIP
    cannot bind it (EADDRNOTAVAIL), so it never reaches the other host's listener over the
    wire; a host that holds it connects over loopback to its own listener, or is refused.
    Accepted means the kernel completed the handshake: that host's connmgr has a listener
    on the VIP (a frozen process's listener still would). The connection is closed at once,
    before any startup packet, which connmgr treats as a client that left during its
    handshake (no error counted, no backend opened). Any error, a timeout included, is
    "not accepting" (a killed host's namespace refuses or has lost the address)."""

    def __init__(self, lab: HostLab, hosts: tuple[str, ...] = ("hosta", "hostb"), interval: float = 0.05,
                 timeout: float = 0.2) -> None:  # fmt: skip
        self.net = lab.net
        self.hosts = hosts
        self.interval = interval
        self.timeout = timeout
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def accepts(self, host: str) -> bool:
        """One attempt from inside ``host``: did a listener on the VIP accept it?"""
        try:
            s = self.net.socket_in(host, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return False
        try:
            s.settimeout(self.timeout)
            s.bind((netlab.VIP, 0))
            s.connect((netlab.VIP, PORT))
            return True
        except OSError:  # refused, timed out, the VIP not here
            return False
        finally:
            s.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            self.samples.append((sent, tuple(h for h in self.hosts if self.accepts(h))))
            self._stop.wait(max(0.0, sent + self.interval - time.monotonic()))

    def __enter__(self) -> AcceptWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def overlaps(self) -> list[tuple[float, tuple[str, ...]]]:
        """The moments two hosts accepted."""
        return [(t, h) for t, h in self.samples if len(h) > 1]

    def story(self, since: float) -> str:
        """Who accepted, as runs: ``hosta 2.9s -> none 0.4s -> hostb 3.1s``."""
        return _runs(self.samples, since, self.interval)

    def span(self, host: str, since: float) -> tuple[float | None, float | None]:
        """Seconds from ``since`` to the first and to the last sample ``host`` accepted
        (None, None if it never did)."""
        times = [t - since for t, h in self.samples if t >= since and host in h]
        return (times[0], times[-1]) if times else (None, None)


class Probe:
    """One client session asking which database answers it, every ``interval``."""

    def __init__(self, lab: HostLab, interval: float = 0.1) -> None:
        self.conn = lab.connect(autocommit=True)
        self.interval = interval
        self.answers: list[tuple[float, str]] = []  # (time, database address or the error's SQLSTATE)
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        names = {netlab.ADDRESSES["hosta"]: "A", netlab.ADDRESSES["hostb"]: "B"}
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                (address,) = self.conn.execute("SELECT host(inet_server_addr())").fetchone()
                self.answers.append((sent, f"db {names.get(address, address)}"))
            except psycopg.Error as e:
                self.answers.append((sent, f"error {e.sqlstate or type(e).__name__}"))
                return
            self.longest = max(self.longest, time.monotonic() - sent)
            time.sleep(self.interval)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.conn.close()

    def story(self) -> str:
        runs: list[list] = []
        for _t, a in self.answers:
            if runs and runs[-1][0] == a:
                runs[-1][1] += 1
            else:
                runs.append([a, 1])
        return " -> ".join(f"{a} ×{n}" for a, n in runs) or "-"


@dataclass(frozen=True)
class Scenario:
    name: str
    #: what the lab does to the network (the lab, then undone by the lab's teardown)
    cut: Callable[[HostLab], None]
    #: must host B take over?
    takeover: bool
    #: the expectation, in words, for the table
    expected: str


def _cut_a_b(lab: HostLab) -> None:
    lab.net.cut("hosta", "hostb")


def _cut_a_witness(lab: HostLab) -> None:
    lab.net.cut("hosta", "witness")


def _isolate_b(lab: HostLab) -> None:
    lab.net.set_port("hostb", False)


def _witness_down(lab: HostLab) -> None:
    lab.net.set_port("witness", False)


def _a_off_etcd(lab: HostLab) -> None:
    lab.net.cut("hosta", "hostb")
    lab.net.cut("hosta", "witness")


def _kill_a(lab: HostLab) -> None:
    lab.kill_host_a()


SCENARIOS = [
    Scenario("A <-> B link cut", _cut_a_b, False, "A keeps the key through the witness; nothing moves"),
    Scenario("A <-> witness cut", _cut_a_witness, False, "A keeps the key through B's member; nothing moves"),
    Scenario("host B isolated", _isolate_b, False, "A keeps the key with the witness; nothing moves"),
    Scenario("witness down", _witness_down, False, "A keeps the key with B's member; nothing moves"),
    Scenario("A cut from B and witness, clients still reach A", _a_off_etcd, True,
             "A steps down before its lease can expire, then B takes over; never two ARP answers"),
    Scenario("host A killed", _kill_a, True, "B takes over; the session goes on"),
]


@dataclass
class ScenarioResult:
    scenario: Scenario
    took_over: bool = False
    a_stepped_down: bool = False
    arp: str = ""
    overlaps: int = 0
    #: which connmgr accepted connections on the VIP, as runs from just before the cut
    accepting: str = ""
    #: moments two connmgrs accepted
    accept_overlaps: int = 0
    #: per host: seconds from the cut to its first and last accepted sample (None: never)
    accept_spans: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    #: the hosts that accepted in the last sample
    accepting_at_end: tuple[str, ...] = ()
    probe: str = ""
    longest_wait: float = 0.0
    session_kept: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.took_over == self.scenario.takeover and self.overlaps == 0 and self.session_kept
                and self.accept_overlaps == 0 and self.accepting_at_end == (self.expected_acceptor,))  # fmt: skip

    @property
    def expected_acceptor(self) -> str:
        """The host whose connmgr should accept connections at the end."""
        return "hostb" if self.scenario.takeover else "hosta"

    def accepting_summary(self) -> str:
        """``A until +2.31 s, B from +2.45 s`` (seconds from the cut)."""
        out = []
        for host, name in (("hosta", "A"), ("hostb", "B")):
            first, last = self.accept_spans.get(host, (None, None))
            if first is None:
                out.append(f"{name} never")
            elif host in self.accepting_at_end:
                out.append(f"{name} from {first:+.2f} s on" if first > 0.1 else f"{name} throughout")
            else:
                out.append(f"{name} until {last:+.2f} s" if first <= 0.1 else f"{name} {first:+.2f} to {last:+.2f} s")
        return ", ".join(out)


def run_scenario(base: Path, scenario: Scenario, *, bindir: Path | None = None, after: float = 6.0) -> ScenarioResult:
    """Build a lab, watch ARP and a session, apply the cut, watch ``after`` seconds."""
    result = ScenarioResult(scenario)
    with HostLab(base, bindir=bindir) as lab:
        with ArpWatch(lab) as arp, AcceptWatch(lab) as accepting, Probe(lab) as probe:
            time.sleep(1.0)
            at = time.monotonic()
            scenario.cut(lab)
            time.sleep(after)
        result.arp = arp.story(at - 0.5)
        result.overlaps = len(arp.overlaps)
        result.accepting = accepting.story(at - 0.5)
        result.accept_overlaps = len(accepting.overlaps)
        result.accept_spans = {host: accepting.span(host, at) for host in accepting.hosts}
        result.accepting_at_end = accepting.samples[-1][1] if accepting.samples else ()
        result.probe = probe.story()
        result.longest_wait = probe.longest
        last = probe.answers[-1][1] if probe.answers else ""
        result.session_kept = last.startswith("db ")
        b_log, a_log = lab.log("hostb"), lab.log("hosta")
        result.took_over = "serving as the primary" in b_log
        result.a_stepped_down = "stepping down" in a_log
        lab.net.heal_all()  # the teardown drops the subscriptions: the databases must meet
        if result.overlaps:
            result.notes.append(f"{result.overlaps} ARP request(s) answered by two hosts")
        if result.accept_overlaps:
            first = accepting.overlaps[0][0] - at
            result.notes.append(f"{result.accept_overlaps} moment(s) two connmgrs accepted connections, the first"
                                f" {first:+.2f} s from the cut")  # fmt: skip
    return result
