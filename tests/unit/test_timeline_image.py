"""connmgr/embedded/timeline_image.py: the failover drawn as an image. The plan is data
(lanes, spans, marks) and is checked as data; the PNG is checked to be one."""

from __future__ import annotations

import pytest

from connmgr.embedded.timeline_image import (
    Mark,
    database_failover,
    host_takeover,
    label_positions,
    render,
)

NOTES = [(-0.5, "following hosta"), (2.17, "leader key won (fencing token 5)"), (2.172, "primary record: hostb"),
         (2.19, "point of failure reached (1 subscription(s) stopped)"), (2.19, "this host's database stands alone"),
         (2.192, "10 connection(s) rebuilt in repair mode, 0 cannot be"), (2.313, "VIP 198.18.0.100 added"),
         (2.483, "gratuitous ARP sent, 10 connection(s) live again"),
         (2.484, "0 session(s) with a commit in flight move first, 10 other(s) then"),
         (2.484, "serving as the primary (fencing token 5)"),
         (2.522, "every open transaction is back where its client saw it; requests in flight go on"),
         (3.0, "serving as the primary (fencing token 6)")]  # fmt: skip
#: per client, in lane order: (last answer before the kill, first answer after it)
STALLS = {"transfer 0": (-0.02, 2.24), "transfer 1": (-0.01, 2.25), "writer 0": (-0.005, 2.23),
          "idle 0": (0.0, 2.57), "idle 1": (0.0, 2.58)}  # fmt: skip


def test_host_takeover_lanes_hosts_then_one_per_connection_in_order():
    t = host_takeover(NOTES, STALLS)
    assert t.lanes == ("host A", "etcd lease", "host B", *STALLS)
    assert list(STALLS) == ["transfer 0", "transfer 1", "writer 0", "idle 0", "idle 1"]
    assert t.hosts == 3


def test_each_connection_stalls_from_the_kill_to_its_first_answer():
    t = host_takeover(NOTES, STALLS)
    for name, (last, first) in STALLS.items():
        kinds = {s.kind: s for s in t.spans_on(name)}
        assert (kinds["stall"].start, kinds["stall"].end) == (0.0, first)
        assert kinds["stall"].label == f"{first:.2f} s"
        assert (kinds["after"].start, kinds["after"].end) == (first, t.end)
        if last < 0:  # busy up to the kill: its last answer shows
            assert (kinds["before"].start, kinds["before"].end) == (last, 0.0)
        else:
            assert "before" not in kinds


def test_the_steps_are_marked_once_each_in_time_order_and_other_notes_left_out():
    t = host_takeover(NOTES, STALLS)
    assert [(m.at, m.label, m.lane) for m in t.marks] == [
        (0.0, "host A killed", "host A"),
        (2.17, "leader key won", "host B"),
        (2.19, "database stands alone", "host B"),
        (2.192, "connections rebuilt (repair mode)", "host B"),
        (2.23, "first answer to a client", "writer 0"),
        (2.313, "VIP added", "host B"),
        (2.483, "ARP sent, sockets live", "host B"),
        (2.484, "replays start", "host B"),
        (2.484, "serving", "host B"),  # the first time only: not again at 3.0
        (2.522, "replays done", "host B"),
    ]


def test_host_lanes_show_the_lease_running_out_and_the_takeover():
    t = host_takeover(NOTES, STALLS)
    assert [(s.start, s.end, s.kind) for s in t.spans_on("host A")] == [(0.0, t.end, "dead")]
    assert [(s.start, s.end, s.kind) for s in t.spans_on("etcd lease")] == [(0.0, 2.17, "lease")]
    assert [(s.start, s.end, s.kind) for s in t.spans_on("host B")] == [(2.17, 2.484, "takeover"),
                                                                        (2.484, t.end, "serving")]  # fmt: skip
    assert t.start < 0 and max(first for _last, first in STALLS.values()) < t.end  # fmt: skip
    lo, hi = t.zoom  # the steps, from the key to the last answer, get a wide panel
    assert lo < 2.17 and 2.58 < hi < 3.0


def test_no_takeover_leaves_host_b_empty_and_the_lease_running_to_the_end():
    t = host_takeover([(-1.0, "following hosta")], {})
    assert t.lanes == ("host A", "etcd lease", "host B")
    assert t.spans_on("host B") == [] and t.spans_on("etcd lease")[0].end == t.end
    assert [m.label for m in t.marks] == ["host A killed"] and t.zoom is None


def test_database_failover_lanes_and_steps():
    journal = [(0.05, "primary suspected: connection lost"), (0.30, "primary does not answer: failing over to the"
               " secondary"), (0.42, "point of failure reached (1 subscription(s) stopped)"),
               (0.45, "secondary is the primary now; sessions move"), (0.5, "marker rows of app: 3 session(s)")]  # fmt: skip
    stalls = {"client 0": (-0.01, 0.55), "client 1": (-0.002, 0.6)}
    t = database_failover(journal, stalls)
    assert t.lanes == ("primary database", "connmgr", "client 0", "client 1")
    assert [m.label for m in t.marks] == ["primary database killed", "primary suspected", "primary dead: failing over",
                                          "point of failure reached", "secondary ready, sessions move",
                                          "first answer to a client"]  # fmt: skip
    assert [(s.start, s.end, s.kind) for s in t.spans_on("connmgr")] == [
        (0.0, 0.05, "lease"), (0.05, 0.45, "takeover"), (0.45, t.end, "serving")]  # fmt: skip
    assert t.spans_on("client 1")[1].end == 0.6 and t.spans_on("client 1")[1].label == "600 ms"


def test_labels_keep_their_distance_and_stay_inside():
    xs = [0.1, 0.5, 0.5, 0.51, 0.98, 0.99]
    out = label_positions(xs, 0.05)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(out, out[1:], strict=False))
    assert out[-1] <= 1.0 and out[0] == 0.1
    assert label_positions([0.2, 0.6], 0.05) == [0.2, 0.6]  # room enough: where the marks are


def test_render_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    t = host_takeover(NOTES, STALLS)
    path = render(t, tmp_path / "takeover.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # a plan without a zoom draws too
    t = database_failover([], {"client 0": (0.0, 0.4)})
    assert t.zoom is None and t.marks == (Mark(0.0, "primary database killed", "primary database"),
                                          Mark(0.4, "first answer to a client", "client 0"))  # fmt: skip
    assert render(t, tmp_path / "db.png").read_bytes()[:4] == b"\x89PNG"
