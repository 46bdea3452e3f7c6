# C types for proxy/connection.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython


@cython.final
cdef class ClientConnection:
    cdef public object app
    cdef public object transport
    cdef public object parser
    cdef public bytes peer_ip
    cdef public bint peer_trusted
    cdef public object exchanges
    cdef public object parsing
    cdef public bint closing
    cdef public object refusal
    cdef public bint writing_paused
    cdef public int reading_paused_by
    cdef public double deadline
    cdef public bint idle
    cdef public object tunnel
    cdef public object upgrading
    cdef public bint corked
    cdef public bint lingering
    cdef public list out


@cython.final
cdef class Exchange:
    cdef public ClientConnection client
    cdef public object app
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
    cdef public object route
    cdef public object customer
    cdef public object decision
    cdef public object upstream
    cdef public bint upstream_reused
    cdef public double upstream_deadline
    cdef public double upstream_sent_at
    cdef public bint forwarding
    cdef public bint response_started
    cdef public int response_status
    cdef public bytes response_status_phrase
    cdef public list response_headers
    cdef public bint response_chunked_out
    cdef public bint response_close_delimited
    cdef public long long response_bytes
    cdef public bint response_keep_alive
    cdef public bint finished
    cdef public bint retried
