# C types for the Cython build of mirror_protocol.py (an augmenting .pxd: the .py stays
# plain Python and the definition; see shadow/compiled.py).

cdef class MirrorSender:
    cdef public object epoch, _buffer
    cdef public long long max_buffer_bytes, latest_version, acked_version, lost_below, overflows, resyncs_sent
    cdef public long long buffered_bytes

    cpdef long long _next(self)
    cpdef bytes _keep(self, long long version, bytes wire)
    cpdef bytes data(self, session_id, direction, lsn, offset, payload)
