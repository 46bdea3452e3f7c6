# C types for proxy/upstream.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython


cdef class UpstreamPool
cdef class UpstreamConnection


cdef class ResponseSink:
    cpdef upstream_ready(self, UpstreamConnection conn, bint reused)
    cpdef upstream_failed(self, status, detail)
    cpdef upstream_lost(self)
    cpdef upstream_broken(self, detail)
    cpdef response_header(self, bytes name, bytes value)
    cpdef response_headers_complete(self, int status, bint upstream_keep_alive)
    cpdef response_body(self, bytes body)
    cpdef response_complete(self)
    cpdef upstream_switched_protocols(self, tail)
    cpdef cork_client(self)
    cpdef uncork_client(self)
    cpdef upstream_full(self)
    cpdef upstream_drained(self)


@cython.final
cdef class UpstreamConnection:
    cdef public UpstreamPool pool
    cdef public object transport
    cdef public ResponseSink exchange
    cdef public object parser
    cdef public bint closed
    cdef public object tunnel
    cdef public bint writing_paused
    cdef public bint reading_paused

    cpdef connection_made(self, transport)
    cpdef data_received(self, data)
    cpdef eof_received(self)
    cpdef connection_lost(self, exc)
    cpdef pause_writing(self)
    cpdef resume_writing(self)
    cpdef on_status(self, status)
    cpdef on_header(self, name, value)
    cpdef on_headers_complete(self)
    cpdef on_body(self, body)
    cpdef on_message_complete(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef reset_parser(self)
    cpdef close(self)
    cpdef abort(self)


@cython.final
cdef class UpstreamPool:
    cdef public str name
    cdef public object host
    cdef public int port
    cdef public bytes authority
    cdef public object tls
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

    cpdef acquire(self, ResponseSink exchange)
    cpdef cancel(self, exchange)
    cpdef release(self, conn, reusable)
    cpdef forget(self, conn)
    cpdef sweep(self, now)
    cpdef close(self)
    cpdef _serve_waiter(self)
    cpdef _connected(self, task)
