"""``[server] workers = N`` (connmgr/workers/): the control framing and channel, worker
bits in virtual pids, the supervisor's merged SHOW and metrics, the worker configuration."""

from __future__ import annotations

import dataclasses
import math
import struct
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from connmgr import config as config_mod
from connmgr.errors import ConfigError
from connmgr.metrics import ConnStats, Metrics
from connmgr.ops.admin import local_show, merge_fleet
from connmgr.ops.prometheus import merge_workers
from connmgr.proxy.registry import WORKER_SHIFT, Registry
from connmgr.workers import WORKER_COLUMNS
from connmgr.workers.control import MAX_FRAME, Channel, ControlError, Decoder, encode
from connmgr.workers.supervisor import worker_config, worker_share

# ---------------------------------------------------------------------- framing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
json_objects = st.lists(st.dictionaries(st.text(max_size=4), json_values, max_size=3), max_size=4)


@given(json_objects, st.data())
def test_any_chunking_decodes_the_objects_sent(objects, data) -> None:
    stream = b"".join(encode(o) for o in objects)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    decoder = Decoder()
    assert [o for chunk in chunks for o in decoder.feed(chunk)] == objects
    assert decoder.pending == 0
    bytewise = Decoder()
    assert [o for i in range(len(stream)) for o in bytewise.feed(stream[i:i + 1])] == objects
    assert bytewise.pending == 0


def test_a_frame_over_max_frame_is_refused_naming_the_limit() -> None:
    with pytest.raises(ControlError, match=str(MAX_FRAME)):
        Decoder().feed(struct.pack(">I", MAX_FRAME + 1))
    at_limit = Decoder()  # exactly MAX_FRAME is allowed: it waits for the body
    assert at_limit.feed(struct.pack(">I", MAX_FRAME) + b"{") == []
    assert at_limit.pending == 5


@pytest.mark.parametrize(("body", "words"), [
    (b"not json", "not JSON"), (b"\x80\x81", "not JSON"), (b"{", "not JSON"),
    (b"[1, 2]", "not an object"), (b'"text"', "not an object"), (b"3", "not an object"),
])  # fmt: skip
def test_a_body_that_is_not_a_json_object_is_refused(body: bytes, words: str) -> None:
    with pytest.raises(ControlError, match=words):
        Decoder().feed(struct.pack(">I", len(body)) + body)


def test_pending_counts_the_bytes_of_an_incomplete_frame() -> None:
    first, second = encode({"op": "ready", "listen": [["127.0.0.1", 6432]]}), encode({"re": 1})
    for k in range(len(second)):
        decoder = Decoder()
        assert decoder.feed(first + second[:k]) == [{"op": "ready", "listen": [["127.0.0.1", 6432]]}]
        assert decoder.pending == k
        assert decoder.feed(second[k:]) == [{"re": 1}]
        assert decoder.pending == 0


# ---------------------------------------------------------------------- channel

async def _ignore(frame):
    raise AssertionError(f"unexpected frame {frame!r}")


async def test_call_gets_the_handler_reply_and_an_error_as_control_error(autojump_clock) -> None:
    a, b = trio.testing.memory_stream_pair()
    worker, supervisor = Channel(a, "worker 1"), Channel(b, "supervisor")

    async def handler(frame):
        if frame["op"] == "fail":
            raise ValueError("the disk is on fire")
        return {"sum": frame["x"] + frame["y"]}

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run, handler)
            nursery.start_soon(worker.run, _ignore)
            reply = await worker.call("add", x=2, y=40)
            assert reply["sum"] == 42
            assert reply["re"] == 1
            with pytest.raises(ControlError, match="the disk is on fire") as err:
                await worker.call("fail")
            assert "ValueError" in str(err.value)
            assert (await worker.call("add", x=1, y=1))["sum"] == 2  # the channel goes on
            nursery.cancel_scope.cancel()


async def test_notify_reaches_the_handler_and_gets_no_reply(autojump_clock) -> None:
    a, b = trio.testing.memory_stream_pair()
    sender, receiver = Channel(a, "worker 0"), Channel(b, "supervisor")
    seen: list[dict] = []

    async def handler(frame):
        seen.append(frame)
        return {"answered": frame["op"]}  # a notification must not be answered all the same

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run, handler)
        await sender.notify("cancel", worker=2, pid=33_554_433, secret=7)
        back = b""
        with trio.move_on_after(2):  # virtual seconds: the handler has long run
            back += await a.receive_some(65536)  # ``sender`` is not running: read its end
        nursery.cancel_scope.cancel()
    assert seen == [{"op": "cancel", "worker": 2, "pid": 33_554_433, "secret": 7}]
    assert back == b""


async def test_inline_ops_take_effect_in_the_order_sent_and_requests_get_their_reply(autojump_clock) -> None:
    """The fleet's failover events must apply in order: trio runs tasks started together
    in no fixed order, so inline ops are handled in the reading task itself."""
    a, b = trio.testing.memory_stream_pair()
    sender, receiver = Channel(a, "supervisor"), Channel(b, "worker 0")
    seen: list[int] = []

    def event(frame):
        seen.append(frame["n"])

    def gather(frame):
        return {"seen": list(seen)}

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.run, _ignore, {"event": event, "gather": gather})
            nursery.start_soon(sender.run, _ignore)
            for n in range(200):
                await sender.notify("event", n=n)
            reply = await sender.call("gather")
            nursery.cancel_scope.cancel()
    assert seen == list(range(200)) and reply["seen"] == list(range(200))


@pytest.mark.parametrize("key", ["id", "re"])  # (op is the first parameter: Python refuses it twice)
async def test_an_argument_named_like_a_frame_key_is_refused(key, autojump_clock) -> None:
    a, _b = trio.testing.memory_stream_pair()
    channel = Channel(a, "worker 0")
    with pytest.raises(ValueError, match=f"{key} is a key of the frame itself"):
        await channel.call("order.turn", **{key: 5})
    with pytest.raises(ValueError, match=f"{key} is a key of the frame itself"):
        await channel.notify("order.settled", **{key: 5})


async def test_a_pending_call_fails_when_the_other_end_closes(autojump_clock) -> None:
    a, raw = trio.testing.memory_stream_pair()
    channel = Channel(a, "worker 2")
    failures: list[Exception] = []

    async def ask():
        try:
            await channel.call("metrics")
        except ControlError as e:
            failures.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run, _ignore)
            nursery.start_soon(ask)
            assert Decoder().feed(await raw.receive_some(65536)) == [{"id": 1, "op": "metrics"}]
            await raw.aclose()
    assert len(failures) == 1 and "closed" in str(failures[0])
    assert channel.closed
    with trio.fail_after(5), pytest.raises(ControlError, match="closed"):
        await channel.call("metrics")


# ---------------------------------------------------------------------- registry


def _conn(i: int):
    return SimpleNamespace(id=i, key=None, backend=None, stats=ConnStats())


def test_a_worker_hands_out_pids_carrying_its_number() -> None:
    registry = Registry(Metrics(), worker=3, workers=4)
    pids = []
    for i in range(500):
        registry.add(conn := _conn(i))
        pids.append(registry.register_key(conn)[0])
    registry._next_pid = registry._pid_limit - 2  # across the wrap of the low bits
    pids += [registry.register_key(_conn(1000 + i))[0] for i in range(5)]
    assert len(set(pids)) == len(pids)
    assert {p >> WORKER_SHIFT for p in pids} == {3}
    assert all(0 < p < 2**31 for p in pids)


def test_a_single_process_keeps_the_old_pid_range() -> None:
    registry = Registry(Metrics())
    assert all(10_000 <= registry.register_key(_conn(i))[0] < 2**31 for i in range(500))


async def test_cancel_goes_to_the_worker_named_by_the_pid() -> None:
    forwarded: list[tuple[int, int, int]] = []

    async def forward(worker: int, pid: int, secret: int) -> None:
        forwarded.append((worker, pid, secret))

    metrics = Metrics()
    registry = Registry(metrics, worker=3, workers=4, forward=forward)
    other = 1 << WORKER_SHIFT | 12_345
    await registry.cancel(other, 987_654)
    assert forwarded == [(1, other, 987_654)]
    assert metrics.cancels_forwarded == 1

    registry.add(conn := _conn(1))
    pid, secret = registry.register_key(conn)
    await registry.cancel(pid, secret)  # its own key: looked up here (no backend: ignored)
    await registry.cancel(4 << WORKER_SHIFT | 12_345, 5)  # worker 4 of 0-3: nobody's
    assert forwarded == [(1, other, 987_654)]
    assert metrics.cancels_forwarded == 1
    assert metrics.cancels == 0


# ---------------------------------------------------------------------- SHOW across workers

_EMPTY = SimpleNamespace(metrics=Metrics(), registry=Registry(Metrics()))


@pytest.mark.parametrize("what", ["CLIENTS", "SERVERS"])
def test_merge_fleet_lists_rows_by_worker(what: str) -> None:
    cols, _ = local_show(_EMPTY, what)
    row = lambda tag: [f"{tag}{i}" for i in range(len(cols))]  # noqa: E731
    answers = [[2, cols, [row("c")]], [0, cols, [row("a"), row("b")]], [1, cols, []], [3, cols, [row("d")]]]
    merged_cols, rows = merge_fleet(what, answers)
    assert merged_cols == ["worker", *cols]
    assert rows == [["0", *row("a")], ["0", *row("b")], ["2", *row("c")], ["3", *row("d")]]


def test_merge_fleet_stats_adds_up_under_an_all_row() -> None:
    cols, (local,) = local_show(_EMPTY, "STATS")
    assert all(isinstance(v, str) for v in local)
    per_worker = {
        1: dict.fromkeys(cols, "3") | {"requests": "30", "avg_latency_us": "200", "p99_latency_us_le": "900",
                                        "uptime_s": "50", "bytes_in": "1000"},
        0: dict.fromkeys(cols, "2") | {"requests": "10", "avg_latency_us": "100", "p99_latency_us_le": "4000",
                                        "uptime_s": "70", "bytes_in": "24"},
    }  # fmt: skip
    answers = [[i, cols, [[v[c] for c in cols]]] for i, v in per_worker.items()]
    merged_cols, rows = merge_fleet("STATS", answers)
    assert merged_cols == ["worker", *cols]
    assert [r[0] for r in rows] == ["all", "0", "1"]
    total = dict(zip(merged_cols, rows[0], strict=True))
    assert total["requests"] == "40"
    assert total["bytes_in"] == "1024"
    assert total["clients_active"] == "5"
    assert total["avg_latency_us"] == "175"  # (10 * 100 + 30 * 200) / 40
    assert total["p99_latency_us_le"] == "4000"
    assert total["uptime_s"] == "70"
    assert rows[1] == ["0", *(per_worker[0][c] for c in cols)]


def test_merge_fleet_passes_the_supervisors_workers_table_through() -> None:
    rows = [["0", "4242", "3", "12", "0"], ["1", None, None, None, "2"]]
    assert merge_fleet("WORKERS", [[-1, WORKER_COLUMNS, rows]]) == (WORKER_COLUMNS, rows)


# ---------------------------------------------------------------------- metrics across workers


def _exposition(n: int) -> str:
    r = CollectorRegistry()
    Counter("connmgr_requests", "requests relayed", registry=r).inc(n)
    Counter("connmgr_rejected", "clients refused", ["reason"], registry=r).labels("full").inc(n)
    Gauge("connmgr_clients", "clients connected", registry=r).set(10 * n)
    Histogram("connmgr_latency_seconds", "latency", buckets=(0.1, 1.0), registry=r).observe(0.5)
    return generate_latest(r).decode()


def test_merge_workers_labels_every_sample_and_keeps_each_family_once() -> None:
    extra = GaugeMetricFamily("connmgr_workers", "worker processes configured", value=2)
    text = merge_workers({5: _exposition(2), 0: _exposition(1)}, [extra])
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))
    assert helps[-1] == "connmgr_workers"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = lambda name: {(s.labels.get("worker"), s.labels.get("reason")): s.value  # noqa: E731
                           for s in families[name].samples if s.name == name + "_total" or s.name == name}
    assert values("connmgr_requests") == {("0", None): 1.0, ("5", None): 2.0}
    assert values("connmgr_rejected") == {("0", "full"): 1.0, ("5", "full"): 2.0}
    assert values("connmgr_clients") == {("0", None): 10.0, ("5", None): 20.0}
    buckets = [s for s in families["connmgr_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert {(s.labels["worker"], s.labels["le"], s.value) for s in buckets} == {
        (w, le, v) for w in ("0", "5") for le, v in (("0.1", 0.0), ("1.0", 1.0), ("+Inf", 1.0))}
    for family in families.values():
        if family.name != "connmgr_workers":
            assert all(s.labels.get("worker") in ("0", "5") for s in family.samples), family.name
    assert [(s.labels, s.value) for s in families["connmgr_workers"].samples] == [({}, 2.0)]


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("max_clients", "workers"), [(1000, 4), (10, 3), (7, 7), (4, 3)])
def test_worker_config_round_trips_with_a_share_of_max_clients(max_clients: int, workers: int) -> None:
    original = config_mod.load(None, server={"workers": workers, "max_clients": max_clients},
                               metrics={"listen": "127.0.0.1:9187"})  # fmt: skip
    addresses = ["127.0.0.1:40001", "[::1]:40002"]
    config = worker_share(config_mod.load(None, **worker_config(original, addresses)))
    assert config.server.listen == tuple(addresses)
    assert config.metrics.listen == ""
    assert config.server.max_clients == math.ceil(max_clients / workers)
    assert config.server.workers == workers
    assert dataclasses.replace(config, server=original.server, metrics=original.metrics) == original
    assert dataclasses.replace(config.server, listen=original.server.listen,
                               max_clients=original.server.max_clients) == original.server  # fmt: skip
    assert dataclasses.replace(config.metrics, listen=original.metrics.listen) == original.metrics


@pytest.mark.parametrize("workers", [0, 65, -1])
def test_workers_out_of_range_are_refused(workers: int) -> None:
    with pytest.raises(ConfigError, match=r"\[server\] workers"):
        config_mod.load(None, server={"workers": workers})


def test_workers_of_a_secondary_connmgr_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.load(None, server={"workers": 2}, mirror={"listen": "127.0.0.1:0"})
    assert "[mirror] listen" in str(err.value) and "workers = 1" in str(err.value)


def test_workers_of_a_pair_primary_with_failover_are_taken() -> None:
    config = config_mod.load(None, server={"workers": 2}, mirror={"peer": "127.0.0.1:6433"},
                             failover={"secondary": "127.0.0.1:5433"})  # fmt: skip
    assert config.server.workers == 2 and config.failover.secondary == "127.0.0.1:5433"


def test_more_workers_than_max_clients_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[server\] workers.*max_clients = 4"):
        config_mod.load(None, server={"workers": 5, "max_clients": 4})
    assert config_mod.load(None, server={"workers": 4, "max_clients": 4}).server.workers == 4
    assert config_mod.load(None, server={"workers": 64}).server.workers == 64
