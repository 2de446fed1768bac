"""connmgr/embedded/host_campaign.timeline_picture: the takeover drawn on a time axis; and
step_times, host B's steps read from its log."""

from __future__ import annotations

import time

from connmgr.embedded.host_campaign import step_times, timeline_picture

EVENTS = [(-0.5, "following hosta"), (1.0, "leader key won (fencing token 5)"), (1.0, "primary record: hostb"),
          (1.01, "this host's database stands alone"), (1.01, "9 connection(s) rebuilt in repair mode, 0 cannot be"),
          (1.2, "VIP 198.18.0.100 added"), (1.5, "gratuitous ARP sent, 9 connection(s) live again"),
          (1.5, "serving as the primary (fencing token 5)")]  # fmt: skip


def lane(picture: str, name: str) -> str:
    line = next(line for line in picture.splitlines() if line.startswith(f"  {name}"))
    return line[13:]


def test_each_step_lands_where_it_happened_in_order():
    pic = timeline_picture(EVENTS, [1.6, 1.7, 2.0], width=41)
    b = lane(pic, "host B")
    assert b.replace(" ", "") == "KPRVAS"  # nothing before the kill, collisions pushed right
    end = 2.0 * 1.08
    assert b.index("K") == int(1.0 / end * 40) and b.index("V") == int(1.2 / end * 40)
    assert lane(pic, "etcd lease") == "=" * b.index("K")  # host A's lease runs out until the key is won
    clients = lane(pic, "clients")
    assert clients.index("+") == int(1.6 / end * 40) and clients.endswith(">") and set(clients[:clients.index("+")]) == {"~"}
    assert lane(pic, "host A").startswith("X.")


def test_no_takeover_draws_no_steps():
    pic = timeline_picture([], [], width=30)
    assert lane(pic, "host B").strip() == "" and lane(pic, "clients").strip() == ""


def test_step_times_read_host_bs_log_from_the_kill_on():
    kill = time.mktime(time.strptime("2026-12-04 00:12:41", "%Y-%m-%d %H:%M:%S"))
    log = "\n".join([
        "2026-12-04 00:12:40,100 connmgr.host WARNING host takeover: serving as the primary (fencing token 2)",
        "2026-12-04 00:12:43,192 connmgr.host WARNING host takeover: leader key won (fencing token 5)",
        "2026-12-04 00:12:43,200 connmgr.mirror INFO VIP in another logger's line",
        "2026-12-04 00:12:43,543 connmgr.host WARNING host takeover: 15 connection(s) rebuilt in repair mode, 0 cannot be",
        "2026-12-04 00:12:43,552 connmgr.host WARNING host takeover: VIP 198.18.0.100 added",
        "2026-12-04 00:12:43,580 connmgr.host WARNING host takeover: serving as the primary (fencing token 5)",
        "2026-12-04 00:12:44,000 connmgr.host WARNING host takeover: serving as the primary (fencing token 6)",
    ])  # fmt: skip
    steps = {name: round(t, 3) for name, t in step_times(log, kill).items()}
    # the serving line before the kill is not this takeover's; the first after it counts
    assert steps == {"leader key": 2.192, "repair": 2.543, "VIP": 2.552, "serving": 2.58}
