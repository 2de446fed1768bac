"""The WAL side of connmgr: redo monitor, replication stream, poster queue, import queue,
purge and (later) replay.

Theory of operation (normal operation of the pair, seed 004 Fig. 2, 6, 8)
-------------------------------------------------------------------------
Two connection managers run as a pair: the *primary* in front of the primary database, the
*secondary* in front of the secondary database.

* **Redo monitor.** The primary connmgr follows the primary's WAL insert position
  (``pg_current_wal_insert_lsn()``) on a connection of its own and publishes it in a single
  variable. Every message the relay forwards is tagged with the value published at that
  moment: an attribute read, no round trip on the client's path. The tag is a *lower bound*
  of the true position when the message passed (the value was read before), and monotonic.
  That is the right direction for the range ``[tag of the first message, tag of the
  acknowledgement]``: any WAL a transaction writes lies after its first message passed, so
  its records are >= the first tag. The upper end is only a hint (a stale tag can be below
  the commit record), which is one reason ranges are not used for the decision.

* **Mirror stream** (``replay/mirror_protocol.py``, ``connmgr/pair/mirror.py``). The primary
  connmgr sends the secondary every client message and every backend response, per
  session, in order, as versioned records (seed 003): each record has a version number one
  above the previous, the session id, the LSN tag and the byte offset of its first byte
  within its direction of the client's TCP stream. The secondary acknowledges versions;
  a gap makes it ask for the delta; heartbeats carry the latest version so a silent loss
  at the end is noticed too. One-phase mode forwards to the client at once; two-phase
  holds a writing transaction's commit acknowledgement until the secondary acknowledged
  the mirrored acknowledgement (an AckRequest makes that ack immediate). The written
  policy for a slow or gone secondary: a hold older than ``two_phase_timeout`` degrades
  the link to one-phase (WARNING, ``connmgr_mirror_two_phase_active 0``), and two-phase
  returns once the secondary has caught up.

* **Replication system** (``replay/pgoutput.py``, ``connmgr/pg/replication.py``,
  ``connmgr/embedded/cluster_pair.py``). Postgres's own logical replication (publication FOR ALL TABLES,
  subscription on the secondary, synchronous_standby_names naming the subscription)
  *applies* the changes: it is the mature, type-complete applier, and in synchronous mode
  a commit is not acknowledged by the primary before the subscriber has it. Our own
  stream reader decodes a second, connmgr-owned slot with pgoutput (``messages 'true'``)
  into the *poster queue*: one :class:`~replay.pgoutput.PosterRecord` per committed
  transaction with its xid, change LSNs, commit LSN and the logical messages it carried.
  DDL, which logical decoding does not carry, is captured by connmgr as a transactional
  logical message in the statement's own transaction (``replay/markers.py``) and replayed
  on the secondary from the poster record, i.e. at the transaction's commit point
  (``connmgr/pair/ddl_apply.py``); sequences are kept ahead of the primary's with a lead
  (``connmgr/pair/sequence_sync.py``; logical replication in Postgres 15 does not carry them).

* **Import queue and exact purge** (``replay/import_queue.py``). The secondary connmgr
  groups each session's mirrored messages into transactions (delimited by ReadyForQuery)
  with their LSN range. Concurrent sessions' ranges overlap (seed 004's own example has
  O1 = 10 and O2 = 17 inside P1's range 5-18 while other sessions write in parallel), so a
  range match is ambiguous. The match is made exact by a *marker*: in every transaction
  that may have written, the primary connmgr runs ``connmgr.mark(origin, session, n)``
  -- before an explicit COMMIT in the same network write, appended to an autocommit
  statement inside its own implicit transaction, or as Parse/Bind/Execute before the Sync
  of an extended-protocol implicit transaction. The function upserts the session's row of
  ``connmgr.markers`` only if the transaction has an xid, so read-only transactions stay
  read-only. The marker is part of the transaction's own WAL *and data*: the poster record
  names the transaction it belongs to even if the primary died before any reply left it,
  and -- the reason it is a row and not a logical message -- the subscriber applies it, so
  at failover the secondary database itself answers "did transaction n of this session
  commit?" (its row says seq >= n). The marker's replies are swallowed by connmgr; the
  mirror hears of it (a Marker record) only when it wrote. Read-only and rolled-back
  transactions leave the queue at their acknowledgement; the queue holds only what is in
  flight. Not marked, but counted until answered (``Injector.unmarked``), so a failover
  with one in flight ends the session with 08006 instead of replaying what may have
  committed: a multi-statement Query that may commit, a Query or a Sync segment that may
  write or commit sent while another request is in flight (pipeline mode), a COMMIT behind
  other requests inside one Sync segment, BEGIN ... COMMIT in one segment, DDL in an
  extended-protocol implicit transaction, a FunctionCall, a statement too long to be held
  whole. Neither marked nor counted (a documented gap): a SELECT that writes through a
  function in autocommit mode.

Failover (issue 4): the plan these pieces are shaped for
--------------------------------------------------------
When the primary *database* dies and the connection managers live, the client sockets are
still held by the primary connmgr, so it runs the move; the secondary connmgr holds the
knowledge (import queue) and the secondary database holds the truth (applied rows and
marker rows). In order:

1. **Detect** (monitor: broken backend connections, a health check of the primary, the
   mirror heartbeats): freeze every session -- client bytes are read and kept, nothing is
   forwarded.
2. **Point of failure.** The subscriber has applied whatever it received before the
   primary died (its apply is streaming); wait until its origin progress is stable and
   disable the subscription, so a restarted old primary cannot feed it again.
3. **Per session**, ask the secondary connmgr (over the mirror link, after the primary's
   mirror buffer is fully acknowledged) for the session's held transactions and pipelined
   requests; open a backend on the secondary database with the session's start-up
   parameters and rebuild its state (``replay/session_recorder.py``: SETs, SQL prepared
   statements, LISTEN, advisory locks; protocol prepared statements from the shadow). A
   session with something that cannot move (temp objects, WITH HOLD cursors, ...) gets a
   clear 40001/57P01-class error instead, counted by reason.
4. **Interrupted commits** (a commit request sent, its acknowledgement not received):
   ``SELECT seq FROM connmgr.markers WHERE origin = $o AND session = $s`` on the secondary.
   ``seq >= n``: it committed -- send the client the acknowledgement it was waiting for,
   replay nothing. Otherwise it did not (its marker row would be there: the marker is in
   the transaction itself) -- replay it. Exactly one of the two, always.
5. **Replay** the open transactions' requests on the new backend, compare each reply with
   the one already sent to the client (rows, tags, errors), swallow them, then switch the
   session to live relaying. A difference rolls the transaction back and gives the client
   40001 with the reason.
"""

# Before any module of this package loads: shadow's import makes the compiled-or-source
# choice (shadow/compiled.py) for the compiled modules here too, whichever package a
# program imports first.
import shadow  # noqa: E402, F401
