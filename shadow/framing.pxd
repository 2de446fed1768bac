# C types for the Cython build of framing.py (an augmenting .pxd: the .py stays plain
# Python and the definition; see shadow/compiled.py).
cimport cython

@cython.locals(length=cython.Py_ssize_t, end=cython.Py_ssize_t, tag=cython.uchar)
cpdef Py_ssize_t _complete_messages(bytes data, Py_ssize_t pos, Py_ssize_t n, list limits, list frames) except -1
