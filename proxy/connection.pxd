# C types for proxy/connection.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython
from decision_core.decide cimport Decision, decide, quota_refusal
from decision_core.state cimport CustomerState, RequestFacts
from proxy.app cimport ProxyApp
from proxy.edge_snapshot cimport EdgeSnapshot
from proxy.headers cimport chunk_frame, connection_tokens, field_kind, join_parts
from proxy.paths cimport normal_target
from proxy.problem cimport status_line
from proxy.meter_event cimport new_event_id
from proxy.routing cimport Route
from proxy.upstream cimport ResponseSink, UpstreamConnection, UpstreamPool


cdef class Exchange

# Field kinds (from proxy.headers), as C numbers here.
cdef int FIELD_OTHER, FIELD_HOST, FIELD_CONTENT_LENGTH, FIELD_TRANSFER_ENCODING, FIELD_CONNECTION, FIELD_UPGRADE
cdef int FIELD_FORWARDED_FOR, FIELD_FORWARDED_PROTO, FIELD_FORWARDED_HOST, FIELD_DROPPED


@cython.locals(end=Py_ssize_t)
cdef str _line_version(bytes data)


@cython.final
cdef class ClientConnection:
    cdef public ProxyApp app
    cdef public object transport
    cdef public object parser
    cdef public bytes peer_ip
    cdef public bint peer_trusted
    cdef public object exchanges
    cdef public Exchange parsing
    cdef public bint closing
    cdef public object refusal
    cdef public bint writing_paused
    cdef public int reading_paused_by
    cdef public double deadline
    cdef public double filed_at
    cdef public bint idle
    cdef public object tunnel
    cdef public double tunnel_active_at
    cdef public object upgrading
    cdef public bint corked
    cdef public bint lingering
    cdef public list out
    cdef public str line_version

    cpdef eof_received(self)
    cpdef connection_made(self, transport)
    cpdef data_received(self, data)
    cpdef _head_grew(self, exchange, size)
    cpdef _failed(self, error)
    cpdef connection_lost(self, exc)
    cpdef pause_writing(self)
    cpdef resume_writing(self)
    cpdef on_message_begin(self)
    cpdef on_url(self, url)
    cpdef on_header(self, name, value)
    cpdef on_headers_complete(self)
    cpdef on_body(self, body)
    cpdef on_message_complete(self)
    cpdef pause_reading(self, reason)
    cpdef resume_reading(self, reason)
    cpdef write(self, data)
    cpdef cork(self)
    cpdef uncork(self)
    cpdef flush(self)
    cpdef _close(self)
    cpdef refuse(self, status, title, detail, reason=*)
    cpdef _linger(self)
    cpdef exchange_done(self, exchange, keep_alive)
    cpdef set_deadline(self, double at)
    cpdef due_at(self, double at)
    cpdef check_deadline(self, now)
    cpdef _deadline_passed(self, double now)
    cpdef tunnel_moved(self)
    cpdef close_when_idle(self)
    cpdef start_tunnel(self, upstream_conn)
    cpdef upstream_full(self)
    cpdef upstream_drained(self)
    cpdef _check_tunnel(self, double now)


@cython.final
cdef class Exchange(ResponseSink):
    cdef public ClientConnection client
    cdef public ProxyApp app
    cdef public double started_at
    cdef public bytes url
    cdef public bytes method
    cdef public bint http_11
    cdef public bint keep_alive
    cdef public list headers
    cdef public long long header_bytes
    cdef public long long header_fields
    cdef public long long head_bytes
    cdef public object host
    cdef public object content_length
    cdef public object transfer_encoding
    cdef public object connection
    cdef public object upgrade
    cdef public list key_values
    cdef public object api_key
    cdef public object client_forwarded_for
    cdef public object client_forwarded_proto
    cdef public object client_forwarded_host
    cdef public bint headers_done
    cdef public bint request_complete
    cdef public long long request_bytes
    cdef public list pending_body
    cdef public long long pending_bytes
    cdef public bytes upgrade_tail
    cdef public Route route
    cdef public CustomerState customer
    cdef public Decision decision
    cdef public UpstreamConnection upstream
    cdef public bint upstream_reused
    cdef public double upstream_deadline
    cdef public double upstream_sent_at
    cdef public bint forwarding
    cdef public bint response_started
    cdef public int response_status
    cdef public bytes response_status_phrase
    cdef public list response_headers
    cdef public object response_named
    cdef public object response_length
    cdef public bint response_chunked_in
    cdef public bint response_chunked_out
    cdef public bint response_close_delimited
    cdef public long long response_bytes
    cdef public bint response_keep_alive
    cdef public bint finished
    cdef public bint retried
    cdef public object metered
    cdef public bint awaiting_body
    cdef public list reserved
    cdef public double body_started_at

    @cython.locals(app=ProxyApp, kind=int, key_fields=tuple, slot=Py_ssize_t)
    cpdef request_header(self, name, value)
    cpdef _key_field(self, Py_ssize_t slot, bytes name, value)
    cpdef request_headers_complete(self, method, version)
    cpdef _absolute_form(self)
    cpdef request_body(self, body)
    cpdef double _rate_deadline(self)
    cpdef bint body_too_slow(self, double now)
    cpdef body_forgiven(self, double now)
    cpdef bint _body_held(self)
    cpdef upgrade_data(self, data)
    cpdef request_completed(self)
    @cython.locals(pool=UpstreamPool, route=Route, customer=CustomerState, decision=Decision, snapshot=EdgeSnapshot)
    cpdef start(self)
    cpdef lease_settled(self, bint ok)
    cpdef _refuse(self, Decision decision)
    cpdef _forward(self)
    @cython.locals(customer=CustomerState)
    cpdef bint _reserve(self, reservations) except -1
    @cython.locals(customer=CustomerState)
    cpdef _refund(self)
    @cython.locals(customer=CustomerState, used=cython.longlong)
    cpdef _settle(self, events)
    cpdef _send_body(self, body)
    cpdef upstream_due(self, double at)
    cpdef check_deadline(self, now)
    cpdef list _response_fields(self)
    @cython.locals(route=Route)
    cpdef _meter(self)
    cpdef client_gone(self)
    cpdef _abort_client(self, why)
    cpdef pause_upstream_reading(self)
    cpdef resume_upstream_reading(self)
