# C types for the Cython build of framing.py (an augmenting .pxd: the .py stays plain
# Python and the definition; see shadow/compiled.py).
cimport cython

@cython.locals(length=cython.Py_ssize_t, end=cython.Py_ssize_t, tag=cython.uchar)
cpdef Py_ssize_t _complete_messages(bytes data, Py_ssize_t pos, Py_ssize_t n, list limits, list frames) except -1

cdef class Framer:
    cdef public Py_ssize_t max_message_size, max_startup_size, _need, stream_over, _stream_left
    cdef public bint frontend, _typed
    cdef public list _limits
    cdef public object _pending, _stream_types
    cdef public int _stream_tag

    @cython.locals(pos=cython.Py_ssize_t, n=cython.Py_ssize_t, need=cython.Py_ssize_t, length=cython.Py_ssize_t,
                   end=cython.Py_ssize_t, stream_over=cython.Py_ssize_t)
    cpdef tuple feed(self, data)
