# C types for the Cython build of engine.py (an augmenting .pxd: the .py stays plain
# Python and the definition; see shadow/compiled.py).
cimport cython

cdef class _Direction:
    cdef public object src, dst, framer, process, pending, waiting
    cdef public int src_fd, dst_fd
    cdef public bint upstream, held

cdef class Link:
    cdef public object engine, relay
    cdef public _Direction up, down
    cdef public int client_fd, backend_fd
    cdef public dict _flags
    cdef public bint attached

    cpdef on_event(self, int fd, int events)
    cpdef _pump(self, _Direction d, object data)
    cpdef _send(self, _Direction d, object buf)
    cpdef _flush(self, _Direction d)
    cpdef _interest(self)
