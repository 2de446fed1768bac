"""What the secondary connmgr spends per mirrored transaction, without the network: a
repeatable measure of its import path (the figures of a live pair move with how many
records each ``recv`` happens to bring).

A mirror stream is made once with the primary's own encoder (``MirrorSender``): 8 sessions
opened and logged in, then pgbench-like transactions spread over them:

* ``simple``, ``extended``: select-only, a client batch and its reply batch each -- Query;
  RowDescription, DataRow, CommandComplete, ReadyForQuery (or Parse, Bind, Describe,
  Execute, Sync and the replies pgbench -M extended gets). Each is purged at its
  ReadyForQuery 'I' (read only).
* ``tpcb``: pgbench's tpcb-like transaction, seven Queries (BEGIN, three UPDATEs, a SELECT,
  an INSERT, END) each with its replies, the Marker record the primary sends once the
  marker it put into the COMMIT is confirmed, and the poster's side: the pgoutput messages
  of the commit (Begin, the marker row's Insert into ``connmgr.markers``, Commit) through
  the real ``TransactionAssembler`` into ``ImportProcess.on_poster_record``, after the
  commit's reply. Each is purged by its poster record.

The measured loop is the secondary's own: the stream in chunks of ``--per-recv`` records
through ``MirrorDecoder.feed``, ``MirrorReceiver.on_record`` and ``ImportProcess.on_records``
(framing, the session recorder, the import queue), as ``connmgr/pair/mirror.py``'s
``serve_mirror`` runs them, and the poster's messages as ``follow_poster`` takes them (the
replication connection's own reading is not in it). Prints the best of ``--repeat`` runs in µs per transaction, and
with ``--callgrind`` the instructions per transaction (the script runs itself under
``valgrind --tool=callgrind``; deterministic):

    python labs/secondary_import.py                       # compiled build, both modes
    CONNMGR_PURE_PYTHON=1 python labs/secondary_import.py # the Python source
    python labs/secondary_import.py --callgrind
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connmgr.pair.import_process import ImportProcess  # noqa: E402
from replay.mirror_protocol import Hello, MirrorDecoder, MirrorReceiver, MirrorSender  # noqa: E402
from replay.pgoutput import TransactionAssembler, XLogData  # noqa: E402
from shadow.compiled import hot_path  # noqa: E402

SESSIONS = 8


def msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def login_replies() -> bytes:
    """The server's log-in replies (trust). The client's start-up packet is not in the
    mirrored stream: SessionOpened carries its parameters."""
    return (msg(b"R", struct.pack("!I", 0)) + msg(b"S", b"server_version\x0016.4\0")
            + msg(b"K", struct.pack("!II", 4242, 99)) + ready())  # fmt: skip


def select_pair(mode: str, aid: int) -> tuple[bytes, bytes]:
    """One pgbench select-only transaction: the client's batch and the server's."""
    row_desc = msg(b"T", struct.pack("!H", 1) + b"abalance\0" + struct.pack("!IhIhih", 16397, 3, 23, 4, -1, 0))
    value = str(aid % 1000).encode()
    data_row = msg(b"D", struct.pack("!HI", 1, len(value)) + value)
    done = msg(b"C", b"SELECT 1\0")
    if mode == "simple":
        sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};".encode()
        return msg(b"Q", sql + b"\0"), row_desc + data_row + done + ready()
    sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    param = str(aid).encode()
    client = (msg(b"P", b"\0" + sql + b"\0" + struct.pack("!H", 0))
              + msg(b"B", b"\0\0" + struct.pack("!HHI", 0, 1, len(param)) + param + struct.pack("!H", 0))
              + msg(b"D", b"P\0") + msg(b"E", b"\0" + struct.pack("!I", 0)) + msg(b"S", b""))  # fmt: skip
    return client, msg(b"1", b"") + msg(b"2", b"") + row_desc + data_row + done + ready()


def tpcb_pairs(aid: int, delta: int) -> list[tuple[bytes, bytes]]:
    """pgbench's tpcb-like transaction, statement by statement: (Query, its replies)."""
    def query(sql: str) -> bytes:
        return msg(b"Q", sql.encode() + b"\0")

    def done(tag: bytes, status: bytes = b"T") -> bytes:
        return msg(b"C", tag + b"\0") + ready(status)

    tid, bid = 1 + aid % 100, 1 + aid % 10
    balance = str(delta).encode()
    select_replies = (msg(b"T", struct.pack("!H", 1) + b"abalance\0" + struct.pack("!IhIhih", 16397, 3, 23, 4, -1, 0))
                      + msg(b"D", struct.pack("!HI", 1, len(balance)) + balance) + done(b"SELECT 1"))  # fmt: skip
    return [
        (query("BEGIN;"), done(b"BEGIN")),
        (query(f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"), done(b"UPDATE 1")),
        (query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"), select_replies),
        (query(f"UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};"), done(b"UPDATE 1")),
        (query(f"UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};"), done(b"UPDATE 1")),
        (query("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)"
               f" VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"), done(b"INSERT 0 1")),
        (query("END;"), done(b"COMMIT", b"I")),
    ]


MARKERS_OID = 90001


def poster_messages(xid: int, lsn: int, session_id: int, seq: int) -> list[XLogData]:
    """What the poster slot sends for one marked commit: Begin, the marker row, Commit."""
    def text(v: int) -> bytes:
        b = str(v).encode()
        return b"t" + struct.pack("!i", len(b)) + b

    row = b"I" + struct.pack("!I", MARKERS_OID) + b"N" + struct.pack("!h", 3) + text(7) + text(session_id) + text(seq)
    return [
        XLogData(lsn, lsn, 0, b"B" + struct.pack("!QqI", lsn + 64, 0, xid)),
        XLogData(lsn + 8, lsn + 8, 0, row),
        XLogData(lsn + 64, lsn + 64, 0, b"C" + struct.pack("!BQQq", 0, lsn + 64, lsn + 96, 0)),
    ]


def markers_relation() -> XLogData:
    cols = b"".join(struct.pack("!B", 1) + name + b"\0" + struct.pack("!Ii", 20, -1)
                    for name in (b"origin", b"session", b"seq"))  # fmt: skip
    return XLogData(0, 0, 0, b"R" + struct.pack("!I", MARKERS_OID) + b"connmgr\0markers\0d" + struct.pack("!h", 3) + cols)


def stream(mode: str, transactions: int) -> tuple[bytes, list[int], dict[int, list[XLogData]]]:
    """The mirror stream (after Hello), each record's length in it, and the poster's
    messages to feed after a record (by its index)."""
    sender = MirrorSender(7)
    records: list[bytes] = []
    poster: dict[int, list[XLogData]] = {0: [markers_relation()]}
    offsets = {}
    lsn = 0x1000000
    for sid in range(1, SESSIONS + 1):
        records.append(sender.session_opened(sid, {"user": "postgres", "database": "postgres"}))
        replies = login_replies()
        records.append(sender.data(sid, "b", lsn, 0, replies))
        offsets[sid] = [0, len(replies), 0]  # client offset, server offset, transactions
    for i in range(transactions):
        sid = 1 + i % SESSIONS
        aid = 1 + (i * 7919) % 100_000
        off = offsets[sid]
        pairs = tpcb_pairs(aid, i % 5000 - 2500) if mode == "tpcb" else [select_pair(mode, aid)]
        off[2] += 1
        for k, (client, server) in enumerate(pairs):
            records.append(sender.data(sid, "c", lsn, off[0], client))
            if mode == "tpcb" and k == len(pairs) - 1:  # the relay mirrors the confirmed marker before the reply
                records.append(sender.marker(sid, off[2]))
            records.append(sender.data(sid, "b", lsn, off[1], server))
            off[0] += len(client)
            off[1] += len(server)
        if mode == "tpcb":
            poster[len(records) - 1] = poster_messages(1000 + i, lsn, sid, off[2])
            lsn += 128
    return b"".join(records), [len(r) for r in records], poster


def split(wire: bytes, sizes: list[int], poster: dict[int, list[XLogData]],
          per_recv: int) -> list[tuple[bytes, list[XLogData]]]:  # fmt: skip
    """The stream as received: ``per_recv`` records per chunk, and the poster's messages
    that follow each chunk."""
    chunks = []
    pos = 0
    for k in range(0, len(sizes), per_recv):
        n = sum(sizes[k:k + per_recv])
        after = [x for j in range(k, min(k + per_recv, len(sizes))) for x in poster.get(j, ())]
        chunks.append((wire[pos:pos + n], after))
        pos += n
    return chunks


def run(chunks: list[tuple[bytes, list[XLogData]]]) -> tuple[float, ImportProcess]:
    """One pass of the secondary's loop over the stream; returns (seconds, the import)."""
    imports = ImportProcess(database="postgres")
    receiver = MirrorReceiver()
    receiver.on_hello(Hello(7, "primary"))
    decoder = MirrorDecoder()
    assembler = TransactionAssembler()
    t0 = time.perf_counter()
    for chunk, xlogs in chunks:  # as serve_mirror's handler does per receive_some
        delivered: list = []
        for rec in decoder.feed(chunk):
            out, _back = receiver.on_record(rec)
            delivered.extend(out)
        if delivered:
            imports.on_records(delivered)
        for xlog in xlogs:  # the poster's messages, as follow_poster takes them
            for rec in assembler.feed(xlog):
                imports.on_poster_record(rec)
    return time.perf_counter() - t0, imports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="simple,extended,tpcb")
    ap.add_argument("--transactions", type=int, default=20_000)
    ap.add_argument("--per-recv", type=int, default=4, help="mirror records per receive (default 4)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--callgrind", action="store_true", help="count instructions per transaction instead")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the run under callgrind
    args = ap.parse_args()
    for mode in args.modes.split(","):
        chunks = split(*stream(mode, args.transactions), args.per_recv)
        if args.one:  # under callgrind: a warm pass, then one pass counted
            run(chunks)
            subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
            run(chunks)
            subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True, capture_output=True)
            continue
        if args.callgrind:
            print(f"{mode:9s} {hot_path():14s} instructions/tx {count(mode, args) / args.transactions:10,.0f}", flush=True)
            continue
        best = float("inf")
        for _ in range(args.repeat):
            seconds, imports = run(chunks)
            best = min(best, seconds)
        q = imports.queue
        purged = q.stats.purged if mode == "tpcb" else q.stats.read_only_purges
        if purged != args.transactions or q.stats.desyncs or q.transactions:  # the stream is not what it should be
            raise SystemExit(f"{mode}: not every transaction was purged: {q.stats}")
        print(f"{mode:9s} {hot_path():14s} {1e6 * best / args.transactions:6.2f} µs per transaction"
              f"  ({args.transactions} transactions, {args.per_recv} records per receive, best of {args.repeat})",
              flush=True)  # fmt: skip


def count(mode: str, args) -> int:
    """Run this script under callgrind for one mode; the instructions of its counted pass."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                        sys.executable, __file__, "--modes", mode, "--transactions", str(args.transactions),
                        "--per-recv", str(args.per_recv), "--one", "1"],
                       check=True, capture_output=True, env=os.environ)  # fmt: skip
        text = out.read_text(errors="replace")
        m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)", text, re.M)
        return int(m.group(1)) if m else 0


if __name__ == "__main__":
    main()
