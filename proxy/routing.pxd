# C types for proxy/routing.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython
from decision_core.state cimport RequestFacts


@cython.final
cdef class Route:
    cdef readonly str name
    cdef readonly str upstream
    cdef readonly object host
    cdef readonly bytes path_prefix
    cdef readonly object methods
    cdef readonly RequestFacts facts
    cdef readonly tuple quota_metrics
    cdef readonly bint fail_closed
    cdef readonly bint quota_unknown_closed
    cdef readonly object metered_call
    cdef readonly bytes api_key_header
    cdef readonly bint key_bearer
    cdef readonly Py_ssize_t key_slot


@cython.final
cdef class Router:
    cdef readonly tuple routes
    cdef readonly tuple key_fields
    cdef dict _by_host
    cdef tuple _any_host
    cdef dict _host_cache

    cpdef Route match(self, bytes host, bytes path, bytes method)


@cython.locals(size=Py_ssize_t, ends_in_slash=bint, route=Route)
cdef Route _first_match(tuple candidates, bytes path, bytes method)


@cython.locals(route=Route, fields=list)
cdef tuple _key_fields(tuple routes)
