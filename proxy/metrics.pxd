# C types for proxy/metrics.py (compiled by Cython at install; the .py runs as is when
# AFORO_PURE_PYTHON=1).
cimport cython


@cython.final
cdef class _Histogram:
    cdef readonly double[::1] bounds
    cdef readonly long long[::1] counts
    cdef readonly double sum

    @cython.locals(size=Py_ssize_t, index=Py_ssize_t)
    cpdef observe(self, double value)


@cython.final
cdef class ProxyMetrics:
    cdef readonly object registry
    cdef readonly object config_reload_errors_total
    cdef readonly dict request_counts
    cdef _Histogram _decision
    cdef dict _upstream
    cdef object _live

    @cython.locals(by_decision=dict)
    cpdef count_request(self, str route, str decision)
    cpdef observe_decision(self, double seconds)
    @cython.locals(histogram=_Histogram)
    cpdef observe_upstream(self, str upstream, double seconds)
