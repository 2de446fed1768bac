# C types for the Cython build of relay.py (an augmenting .pxd: the .py stays plain Python
# and the definition; see shadow/compiled.py).
cimport cython

cdef int _Q, _S, _F, _X, _D, _Z, _E, _d, _A, _N, _I, _P, _B, _T, _CC, _c, _f

cdef class Upstream:
    cdef public object relay, stats, starts, mirror, sid, session, injector, journal, recorder, guard
    cdef public bint terminated, markers
    cdef public long long offset
    cdef public int last_tag

    @cython.locals(tag=cython.int, start=cython.Py_ssize_t, end=cython.Py_ssize_t, k=cython.Py_ssize_t,
                   shown=cython.Py_ssize_t, markers=cython.bint, last=cython.int)
    cpdef process(self, buf, list frames)
    cpdef _show(self, buf, list frames, Py_ssize_t lo, Py_ssize_t hi)

cdef class Downstream:
    cdef public object relay, session, stats, starts, latency, mirror, sid, journal, recorder, injector, results
    cdef public long long offset
    cdef public int last_tag

    @cython.locals(tag=cython.int, start=cython.Py_ssize_t, end=cython.Py_ssize_t, track=cython.bint,
                   notified=cython.bint, hold=cython.bint)
    cpdef process(self, buf, list frames)
