# C types for proxy/metrics.py (compiled by Cython at install; the .py runs as is when
# AFORO_PURE_PYTHON=1).
cimport cython


@cython.final
cdef class _Histogram:
    cdef readonly tuple bounds
    cdef readonly list counts
    cdef readonly double sum

    cpdef observe(self, double value)
