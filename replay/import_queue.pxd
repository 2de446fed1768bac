# C types for the Cython build of import_queue.py (an augmenting .pxd: the .py stays plain
# Python and the definition; see shadow/compiled.py). The secondary runs these per mirrored
# message: the session and unit records as extension types, their fields typed, so the
# queue's bookkeeping reads and writes C struct fields instead of looking attributes up.
cimport cython

cdef class _Unit:
    cdef public object txn, end_tag
    cdef public list buffer
    cdef public long long nbytes
    cdef public bint terminated, begins, commits, error
    cdef public int terminator

cdef class _Session:
    cdef public object id, phase, current, copy_unit, units
    cdef public dict held
    cdef public set early_marks
    cdef public list setup
    cdef public long long next_seq, messages, nbytes

cdef class ImportQueue:
    cdef public object origin, stats, on_transaction_end, _not_replayable, _closed, _early, _early_per_session
    cdef public object max_sessions, max_messages_per_session, max_bytes_per_session, max_total_bytes
    cdef public object max_early_records, max_closed_remembered, range_check
    cdef public dict _sessions
    cdef public long long _messages, _bytes

    @cython.locals(s=_Session)
    cpdef on_client_message(self, msg)
    @cython.locals(s=_Session)
    cpdef list on_backend_message(self, msg)
    @cython.locals(n=cython.longlong)
    cpdef long long _account(self, _Session s, msg) except? -1
    cpdef _leave(self, _Session s, txn)
    @cython.locals(tag=cython.int, unit=_Unit, last=_Unit)
    cpdef _client(self, _Session s, msg)
    @cython.locals(n=cython.longlong)
    cpdef _add(self, _Session s, _Unit unit, msg)
    cpdef _assign(self, _Session s, _Unit unit)
    cpdef _sent(self, _Unit unit)
    @cython.locals(tag=cython.int, unit=_Unit, n=cython.longlong)
    cpdef list _backend(self, _Session s, msg)
    @cython.locals(status=cython.int, left=list)
    cpdef list _ready(self, _Session s, _Unit unit, txn, msg)
