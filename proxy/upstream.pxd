# C types for proxy/upstream.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython


@cython.final
cdef class UpstreamConnection:
    cdef public UpstreamPool pool
    cdef public object transport
    cdef public object exchange
    cdef public object parser
    cdef public bint closed
    cdef public object tunnel
    cdef public bint writing_paused
    cdef public bint reading_paused


@cython.final
cdef class UpstreamPool:
    cdef public str name
    cdef public object host
    cdef public int port
    cdef public bytes authority
    cdef public int size
    cdef public double connect_timeout_s
    cdef public double read_timeout_s
    cdef public object loop
    cdef public object clock
    cdef public object idle
    cdef public int busy
    cdef public dict connecting
    cdef public object waiters
    cdef public long long connects_total
