# C types for the Cython build of metrics.py (an augmenting .pxd: the .py stays plain
# Python and the definition; see shadow/compiled.py).

cdef class Histogram:
    cdef public tuple buckets
    cdef public list counts
    cdef public double total
    cdef public long long count

    cpdef observe(self, double value)
