# C types for the Cython build of mirror.py (an augmenting .pxd: the .py stays plain Python
# and the definition; see shadow/compiled.py). The relay calls the link per batch it
# forwards (session_data, flush_soon): as an extension type its fields are C struct
# members. The sender stays an object: a cimport of another compiled module would make this
# one fail to import whenever that one runs from its source (CONNMGR_PURE_PYTHON is per
# process, but a stale build is per module: shadow/compiled.py).

cdef class MirrorLink:
    cdef public object host, port, _clock, _lost_reason, node, lsn, _sock, _wake, _holds, sender, on_activity
    cdef public list _outbox
    cdef public long long _outbox_bytes, _failed_attempts, peer_silent, connects, bytes_sent, delta_requests
    cdef public long long holds_total, degradations
    cdef public double _last_flush, _last_heard, flush_delay, heartbeat_interval, peer_timeout
    cdef public double two_phase_timeout, _last_ack
    cdef public bint eager, running, connected, two_phase_configured, two_phase

    cpdef session_data(self, session_id, direction, offset, payload)
    cpdef session_marker(self, session_id, seq)
    cpdef session_unmarked(self, session_id, count)
    cpdef _out(self, wire)
    cpdef flush_soon(self)
    cpdef flush_nowait(self)
