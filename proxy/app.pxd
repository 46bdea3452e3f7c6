# C types for proxy/app.py (compiled by Cython at install; the .py runs as is when
# AFORO_PURE_PYTHON=1).
cimport cython
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from proxy.headers cimport starts_ignoring_case
from proxy.metering cimport MeterBuffer
from proxy.metrics cimport ProxyMetrics
from proxy.routing cimport Router


@cython.final
cdef class ProxyApp:
    cdef public object settings
    cdef public object limits
    cdef public long long max_request_line_bytes
    cdef public long long max_header_bytes
    cdef public long long max_headers
    cdef public long long max_body_bytes
    cdef public double header_timeout_s
    cdef public double body_timeout_s
    cdef public double body_s_per_byte
    cdef public long long buffered_body_bytes
    cdef public Router router
    cdef public object edge_state
    cdef public MeterBuffer meter_buffer
    cdef public ProxyMetrics metrics
    cdef public object loop
    cdef readonly object clock
    cdef readonly object wall_clock
    cdef readonly bint system_clock
    cdef readonly bint system_wall_clock
    cdef public dict upstream_fields
    cdef public tuple trusted_networks
    cdef public bint shadow_to_client
    cdef public dict pools
    cdef public set connections
    cdef public object deadlines
    cdef public object wake_timer
    cdef public double wake_timer_at
    cdef public bint closing
    cdef public object sweeper
    cdef public object leases
    cdef public object throttles
    cdef public object edge_state_age
    cdef public double staleness_budget_s
    cdef public bytes stale_retry_after
    cdef public bint stale
    cdef public double staleness_checked_at

    cpdef admit_connection(self, connection)
    cpdef forget_connection(self, connection)
    @cython.locals(start=Py_ssize_t, end=Py_ssize_t)
    cpdef api_key(self, bytes raw, bint bearer)
    cpdef count_refusal(self, status)
    cpdef log_error(self, message, error)
    cpdef sweep(self, now=*)
    @cython.locals(reading=timespec)
    cpdef double now(self)
    @cython.locals(reading=timespec)
    cpdef double wall_now(self)
    cpdef _wake_at(self, double at)
    cpdef _woken(self)
    cpdef stop_sweeps(self)
    cpdef begin_shutdown(self)
