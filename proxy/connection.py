# Client side of the proxy: one ClientConnection per accepted socket, one Exchange per
# request. The protocol callbacks only feed httptools and hand facts to the exchange;
# nothing raises out of data_received. Requests are answered strictly in order: a
# pipelined request waits (its bytes buffered, reading paused) until the one before it
# has been answered. Anything malformed is refused with 400/501, after the answers to
# the requests before it, and the connection is closed: a malformed request is never
# forwarded whole (a body found bad midway is cut off upstream too).
import collections

import cython
import httptools

from decision_core.decide import (
    ALLOW_THROTTLED,
    REASON_FEATURE_NOT_ENTITLED,
    REASON_QUOTA_EXCEEDED,
    REASON_THROTTLED,
    REJECT,
    TITLES,
    decide,
    quota_refusal,
    ratelimit_fields,
)
from decision_core.state import RequestFacts
from proxy.headers import (
    FIELD_CONNECTION,
    FIELD_CONTENT_LENGTH,
    FIELD_DROPPED,
    FIELD_FORWARDED_FOR,
    FIELD_FORWARDED_HOST,
    FIELD_FORWARDED_PROTO,
    FIELD_HOST,
    FIELD_OTHER,
    FIELD_TRANSFER_ENCODING,
    FIELD_UPGRADE,
    HOP_BY_HOP,
    IDEMPOTENT_METHODS,
    chunk_frame,
    connection_tokens,
    field_kind,
    field_value,
    join_parts,
    without_fields,
)
from proxy.errors import UnsafePathError
from proxy.meter_event import MeterEvent, new_event_id
from proxy.metrics import DECISION_TOO_MANY_CONNECTIONS
from proxy.paths import normal_target
from proxy.problem import problem_response, status_line
from proxy.upstream import ResponseSink

# Bytes of request body held while waiting for an upstream connection before the
# client is paused.
PENDING_BODY_HIGH_WATER = 256 * 1024
_CHUNKED_END = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_EXPECT = frozenset((b"expect",))
_NO_BODY_STATUSES = frozenset((204, 304))
_NEVER = float("inf")
# A deadline a check left due (nothing could act on it yet) is checked again this much later.
_RECHECK_S = 0.01
# After refusing a request whose bytes were not all read, the proxy half-closes and
# reads (and drops) what the client still sends for up to this long: closing a socket
# with unread input sends a reset, which can destroy the refusal before it is read.
LINGER_S = 2.0
# What a Host value may hold (RFC 3986 host and port: reg-name, IP literal, pct-encoding).
_HOST_CHARACTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:[]"
_HTTP_VERSIONS = frozenset(("1.0", "1.1"))
# Host values already found valid (a few per deployment), so each is checked once.
VALID_HOSTS_REMEMBERED = 1024
_VALID_HOSTS = set()


class ClientConnection:
    """One client socket: parses requests, runs each through an Exchange in order."""

    def __init__(self, app):
        self.app = app
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = b""
        self.peer_trusted = False
        self.exchanges = collections.deque()   # [0] is being answered; the rest wait
        self.parsing = None                     # the exchange whose request is being parsed
        self.closing = False
        self.refusal = None                     # a refusal waiting for the requests before it
        self.writing_paused = False
        self.reading_paused_by = 0              # reasons reading is paused (bit set)
        self.deadline = _NEVER                  # header / body / idle / linger / tunnel timeout
        self.filed_at = _NEVER                  # when app.deadlines checks this connection next
        self.idle = True
        self.tunnel = None                      # the upstream connection once a 101 switched protocols
        self.tunnel_active_at = 0.0             # when a byte last crossed the tunnel
        self.upgrading = None                   # the exchange waiting for 101, if any
        self.corked = False                     # hold writes until the current read is done
        self.lingering = False                  # refused and half-closed: draining input
        self.out = []                           # what was written while corked
        self.line_version = None                # see _line_version

    # -- asyncio protocol (duck-typed: a compiled class cannot derive asyncio.Protocol) --
    def eof_received(self):
        # The client half-closed: close our side too (as asyncio.Protocol's default).
        return None

    def connection_made(self, transport):
        self.transport = transport
        app = self.app
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0].encode()
            self.peer_trusted = app.is_trusted(peer[0])
        # (uvloop sets TCP_NODELAY on every TCP transport: small writes leave at once.)
        # A new connection owes its first request's headers within the header timeout.
        self.set_deadline(app.now() + app.header_timeout_s)
        if not app.admit_connection(self):
            app.metrics.count_request("", DECISION_TOO_MANY_CONNECTIONS)
            transport.write(problem_response(503, "Service Unavailable", "too many connections", close=True))
            transport.close()

    def data_received(self, data):
        if self.lingering:
            return
        if self.tunnel is not None:
            self.tunnel_moved()
            self.tunnel.transport.write(data)
            return
        if self.upgrading is not None:
            # Bytes after an upgrade request, before the upstream switched protocols.
            self.upgrading.upgrade_data(data)
            return
        if self.closing or self.refusal is not None:
            return
        parsing = self.parsing
        if parsing is None:
            self.line_version = _line_version(data)
        self.corked = True
        try:
            self.parser.feed_data(data)
            if parsing is not None and parsing is self.parsing and not parsing.headers_done:
                self._head_grew(parsing, len(data))
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.exchanges[-1] if self.exchanges else None
            if exchange is not None and exchange.upgrade is not None:
                self.upgrading = exchange
                exchange.upgrade_data(data[upgrade.args[0]:] if upgrade.args else b"")
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, _Refusal):
                self.refuse(cause.status, cause.title, cause.detail)
            else:
                self._failed(cause or error)
        except httptools.HttpParserError as error:
            self.refuse(400, "Bad Request", f"malformed request: {error}")
        except Exception as error:
            self._failed(error)
        finally:
            self.uncork()

    def _head_grew(self, exchange, size):
        # A whole read went into a request head begun earlier. httptools holds a header
        # value until it ends, so the head's size is bounded here as it arrives.
        exchange.head_bytes += size
        app = self.app
        if exchange.head_bytes > app.max_request_line_bytes + app.max_header_bytes:
            self.refuse(431, "Request Header Fields Too Large", "the request headers are larger than the proxy accepts")

    def _failed(self, error):
        # A bug must never leave the socket half-handled.
        self.app.log_error("request handling failed", error)
        self.refuse(500, "Internal Server Error", "the proxy failed to handle this request")

    def connection_lost(self, exc):
        self.closing = True
        self.app.forget_connection(self)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.abort()
        for exchange in self.exchanges:
            exchange.client_gone()
        self.exchanges.clear()

    def pause_writing(self):
        self.writing_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_reading()
        elif self.exchanges:
            self.exchanges[0].pause_upstream_reading()

    def resume_writing(self):
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        elif self.exchanges:
            self.exchanges[0].resume_upstream_reading()

    # -- httptools callbacks ------------------------------------------------------
    def on_message_begin(self):
        self.idle = False
        exchange = Exchange(self)
        self.parsing = exchange
        self.exchanges.append(exchange)
        self.set_deadline(exchange.started_at + self.app.header_timeout_s)
        if len(self.exchanges) > 1:
            # Pipelined: answer in order; stop reading until the earlier ones are done.
            self.pause_reading(_PIPELINE)

    def on_url(self, url):
        exchange = self.parsing
        exchange.url += url
        if len(exchange.url) > self.app.max_request_line_bytes:
            raise _Refusal(414, "URI Too Long", "the request line is longer than the proxy accepts")

    def on_header(self, name, value):
        self.parsing.request_header(name, value)

    def on_headers_complete(self):
        exchange = self.parsing
        version = self.line_version
        if version is None:
            version = self.parser.get_http_version()
        else:
            self.line_version = None     # it was the first request's of that read
        exchange.request_headers_complete(self.parser.get_method(), version)
        if exchange is self.exchanges[0]:
            exchange.start()

    def on_body(self, body):
        self.parsing.request_body(body)

    def on_message_complete(self):
        exchange = self.parsing
        self.parsing = None
        exchange.request_completed()

    # -- flow control ---------------------------------------------------------------
    def pause_reading(self, reason):
        if not self.reading_paused_by and self.transport is not None:
            self.transport.pause_reading()
        self.reading_paused_by |= reason

    def resume_reading(self, reason):
        if self.reading_paused_by & reason:
            self.reading_paused_by &= ~reason
            if not self.reading_paused_by and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    # -- used by exchanges and the sweeper --------------------------------------------
    def write(self, data):
        """Send `data` to the client; while corked (inside one read from the upstream
        or the client) it is held and sent with the rest of that read's output in one
        write, so a response head and a small body leave in one system call."""
        if self.corked:
            self.out.append(data)
        else:
            self.transport.write(data)

    def cork(self):
        self.corked = True

    def uncork(self):
        """Send what was written while corked, in one write."""
        self.corked = False
        self.flush()

    def flush(self):
        out = self.out
        if out:
            self.out = []
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(out[0] if len(out) == 1 else join_parts(out))

    def _close(self):
        # Close after sending whatever is held back.
        self.flush()
        self.transport.close()

    def refuse(self, status, title, detail, reason=""):
        """Answer with a problem response and close; used for malformed input, where
        nothing after this point on the connection can be trusted. Requests read whole
        before it are still answered first, in order; the refusal follows the last."""
        if self.closing or self.refusal is not None:
            return
        refused = self.parsing
        if self.exchanges and self.exchanges[0] is not refused:
            if refused is not None and refused in self.exchanges:
                self.exchanges.remove(refused)
                refused.client_gone()
            self.parsing = None
            self.refusal = problem_response(status, title, detail, reason=reason, close=True)
            self.app.count_refusal(status)
            return
        self.closing = True
        started = self.exchanges and self.exchanges[0].response_started
        self.flush()
        if not started:
            self.transport.write(problem_response(status, title, detail, reason=reason, close=True))
            self.app.count_refusal(status)
        for exchange in self.exchanges:
            exchange.client_gone()
        self.exchanges.clear()
        if started:
            self.transport.abort()
        else:
            self._linger()

    def _linger(self):
        # Send everything, half-close, and drain input until the client closes or
        # LINGER_S passes (the sweep then closes), so the answer is read, not reset.
        self.flush()
        self.closing = True
        self.lingering = True
        self.set_deadline(self.app.now() + LINGER_S)
        transport = self.transport
        try:
            transport.resume_reading()
            if transport.can_write_eof():
                transport.write_eof()
                return
        except Exception:
            pass
        transport.close()

    def exchange_done(self, exchange, keep_alive):
        """The head exchange was answered; start the next or wait idle / close."""
        if self.exchanges and self.exchanges[0] is exchange:
            self.exchanges.popleft()
        if not keep_alive or self.app.closing:
            self.closing = True
            self.exchanges.clear()
            if self.transport is not None:
                if exchange.request_complete:
                    self._close()
                else:
                    self._linger()      # its body is still arriving
            return
        if self.refusal is not None and not self.exchanges:
            # Everything read before the malformed request is answered: refuse it now.
            self.closing = True
            self.write(self.refusal)
            self._linger()
            return
        self.resume_reading(_PIPELINE)
        if self.exchanges:
            head = self.exchanges[0]
            if head.headers_done:
                head.start()
        else:
            self.idle = True
            self.set_deadline(self.app.now() + self.app.limits.keepalive_timeout_s)

    def set_deadline(self, at):
        """The connection's own timeout (header, body, idle keep-alive, linger or
        tunnel, by its state) is now at `at`."""
        self.deadline = at
        self.due_at(at)

    def due_at(self, at):
        """Check this connection's timeouts at `at` at the latest (an exchange's
        upstream read timeout)."""
        if at < self.filed_at:
            self.app.deadlines.file(self, at)

    def check_deadline(self, now):
        """Called by app.deadlines once a timeout may be due: the header (408) or
        body (408) timeout of a request still being received, idle keep-alive close,
        the linger and tunnel timeouts, and the upstream read timeout of the exchange
        being answered; then filed again for the next one."""
        if self.transport is None or self.transport.is_closing() and not self.lingering:
            return
        if self.lingering:
            if now >= self.deadline:
                self.transport.close()
            else:
                self.due_at(self.deadline)
            return
        if self.tunnel is not None:
            self._check_tunnel(now)
            return
        if self.exchanges:
            self.exchanges[0].check_deadline(now)
        if not self.closing and now >= self.deadline:
            self._deadline_passed(now)
        if self.closing and not self.lingering:
            return
        at = self.deadline
        if self.exchanges:
            head = self.exchanges[0]
            if head.upstream is not None and not head.finished and head.upstream_deadline < at:
                at = head.upstream_deadline
        if at < _NEVER:
            # Never filed for a time already checked: that would be checked again at once.
            self.due_at(at if at > now else now + _RECHECK_S)

    def _deadline_passed(self, now):
        # The connection's own timeout is due: what it means depends on its state.
        parsing = self.parsing
        if self.idle:
            self.closing = True
            self._close()
        elif parsing is None:
            return
        elif not parsing.headers_done:
            self.refuse(408, "Request Timeout", "the request headers did not arrive in time")
        elif not parsing.request_complete:
            if self.reading_paused_by:
                # The proxy is not reading (the upstream or an earlier request is
                # behind): that time does not count against the client's body.
                parsing.body_forgiven(now)
            elif parsing.body_too_slow(now):
                self.refuse(408, "Request Timeout", "the request body arrived slower than the proxy accepts "
                            f"(at least {self.app.limits.min_body_bytes_per_s} bytes/s)")
            else:
                self.refuse(408, "Request Timeout", "the request body did not arrive in time")

    def close_when_idle(self):
        """At shutdown: close at once when idle, else after the current response."""
        if self.idle and not self.exchanges and self.transport is not None:
            self.closing = True
            self._close()

    def start_tunnel(self, upstream_conn):
        """After `101 Switching Protocols`: relay raw bytes both ways until either side
        closes, or until no byte has crossed either way for the upstream's read timeout.
        Each side is read only while the other takes what it is sent."""
        self.upgrading = None
        self.tunnel = upstream_conn
        upstream_conn.tunnel = self
        self.tunnel_active_at = self.app.now()
        self.set_deadline(self.tunnel_active_at + upstream_conn.pool.read_timeout_s)
        if upstream_conn.writing_paused:
            self.upstream_full()
        if self.writing_paused:
            upstream_conn.pause_reading()

    def upstream_full(self):
        """The upstream (an exchange's or the tunnel's) takes no more for now: stop
        reading the client."""
        self.pause_reading(_UPSTREAM_FULL)

    def upstream_drained(self):
        self.resume_reading(_UPSTREAM_FULL)

    def tunnel_moved(self):
        """A byte crossed the tunnel (either way): its idle clock starts over."""
        self.tunnel_active_at = self.app.now()

    def _check_tunnel(self, now):
        # Idle for the upstream's read timeout -> closed; else checked again when it would be.
        deadline = self.tunnel_active_at + self.tunnel.pool.read_timeout_s
        if now < deadline:
            self.set_deadline(deadline)
        elif not self.closing:
            self.closing = True
            if self.writing_paused:
                self.transport.abort()   # what is held cannot be delivered: nothing moves
            else:
                self.transport.close()   # connection_lost then aborts the upstream side


def _line_version(data):
    # The HTTP version of a request line at the very start of `data` ("1.1" or "1.0"),
    # read from the bytes the parser is about to parse, when the line is whole and ends
    # in CRLF; otherwise None, and the parser is asked (a costlier call).
    end = data.find(b"\n")
    # The version must follow a space: `GET /pathHTTP/1.1` is a path, and the parser
    # reads that line as HTTP/0.9.
    if end >= 11 and data[end - 1] == 13 and data[end - 10] == 32:
        version = data[end - 9:end - 1]
        if version == b"HTTP/1.1":
            return "1.1"
        if version == b"HTTP/1.0":
            return "1.0"
    return None


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and refuse the request."""

    def __init__(self, status, title, detail):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


# Reasons the client socket's reading is paused.
_PIPELINE = 1
_UPSTREAM_FULL = 2
_PENDING_BODY = 4


class Exchange(ResponseSink):
    """One request and its response: decide, forward, stream back, meter."""

    def __init__(self, client):
        self.client = client
        self.app = client.app
        self.started_at = self.app.now()
        self.url = b""
        self.method = b""
        self.http_11 = True
        self.keep_alive = True
        self.headers = []              # fields to forward, as wire parts (headers.FIELD_PARTS)
        self.header_bytes = 0
        self.header_fields = 0       # every field line, forwarded or not
        self.head_bytes = 0          # raw bytes of the head read after its first read
        self.host = None
        self.content_length = None
        self.transfer_encoding = None
        self.connection = frozenset()
        self.upgrade = None
        self.key_values = None         # the value of each of the router's key_fields, once read
        self.api_key = None            # the customer's key, as the route reads it
        self.client_forwarded_for = None
        self.client_forwarded_proto = None
        self.client_forwarded_host = None
        self.headers_done = False
        self.request_complete = False
        self.request_bytes = 0
        self.pending_body = []
        self.pending_bytes = 0
        self.upgrade_tail = b""
        self.route = None
        self.customer = None
        self.decision = None
        self.upstream = None
        self.upstream_reused = False
        self.upstream_deadline = 0.0
        self.upstream_sent_at = 0.0
        self.forwarding = False
        self.response_started = False
        self.response_status = 0
        self.response_status_phrase = b""
        self.response_headers = []     # the upstream's end-to-end fields, as wire parts
        self.response_named = None           # fields the upstream's Connection named
        self.response_length = None          # the upstream's Content-Length value
        self.response_chunked_in = False     # the upstream's body is chunked
        self.response_chunked_out = False
        self.response_close_delimited = False
        self.response_bytes = 0
        self.response_keep_alive = True
        self.finished = False
        self.retried = False
        self.metered = None              # an AiCall or McpCall on a route that meters calls
        self.awaiting_body = False       # admitted; forwarded once the whole body is in
        self.body_started_at = 0.0       # when the request head was in (the body's clock)
        self.reserved = None             # (metric, units) counted before forwarding, settled after

    # -- request, from the parser -------------------------------------------------------
    def request_header(self, name, value):
        app = self.app
        self.header_bytes += len(name) + len(value) + 4
        self.header_fields += 1
        if self.header_bytes > app.max_header_bytes or self.header_fields > app.max_headers:
            raise _Refusal(431, "Request Header Fields Too Large", "the request headers are larger than the proxy accepts")
        if self.headers_done:
            # A trailer field after a chunked body: dropped, it can change nothing already sent.
            return
        kind = field_kind(name)
        if kind == FIELD_OTHER:
            lower = name.lower()
            key_fields = app.router.key_fields
            for slot in range(len(key_fields)):
                if lower == key_fields[slot]:
                    # The customer's key: held for the decision, never forwarded.
                    self._key_field(slot, lower, value)
                    return
            headers = self.headers
            headers.append(lower)
            headers.append(b": ")
            headers.append(value)
            headers.append(b"\r\n")
        elif kind == FIELD_HOST:
            if self.host is not None:
                raise _Refusal(400, "Bad Request", "more than one Host header")
            if value not in _VALID_HOSTS:
                if value.translate(None, _HOST_CHARACTERS):
                    raise _Refusal(400, "Bad Request", "the Host header is not a valid host")
                if len(_VALID_HOSTS) < VALID_HOSTS_REMEMBERED:
                    _VALID_HOSTS.add(value)
            self.host = value
            headers = self.headers
            headers.append(b"host")
            headers.append(b": ")
            headers.append(value)
            headers.append(b"\r\n")
        elif kind == FIELD_CONTENT_LENGTH:
            self.content_length = int(value)
        elif kind == FIELD_TRANSFER_ENCODING:
            # Repeated fields are one list: `gzip` then `chunked` is `gzip, chunked`.
            self.transfer_encoding = (value if self.transfer_encoding is None
                                      else self.transfer_encoding + b", " + value)
        elif kind == FIELD_CONNECTION:
            # Repeated Connection fields are one list (RFC 9110 5.3): each names more to drop.
            self.connection = self.connection.union(connection_tokens(value))
        elif kind == FIELD_UPGRADE:
            self.upgrade = value
        elif kind == FIELD_FORWARDED_FOR:
            # Repeated fields are one list: keep every hop a trusted proxy reported.
            self.client_forwarded_for = (value if self.client_forwarded_for is None
                                         else self.client_forwarded_for + b", " + value)
        elif kind == FIELD_FORWARDED_PROTO:
            self.client_forwarded_proto = value
        elif kind == FIELD_FORWARDED_HOST:
            self.client_forwarded_host = value
        # FIELD_FORWARDED (set by the proxy), FIELD_DROPPED and FIELD_UNDERSCORED: never forwarded.

    def _key_field(self, slot, name, value):
        # One key per request: with two, the proxy and the upstream could each read another.
        values = self.key_values
        if values is None:
            values = self.key_values = [None] * len(self.app.router.key_fields)
        elif values[slot] is not None:
            raise _Refusal(400, "Bad Request", f"more than one {name.decode()} header: a request carries one API key")
        values[slot] = value

    def request_headers_complete(self, method, version):
        self.headers_done = True
        self.method = method
        self.http_11 = version == "1.1"
        # As llhttp decides it: HTTP/1.1 unless `close`, HTTP/1.0 only with `keep-alive`.
        self.keep_alive = b"close" not in self.connection if self.http_11 else b"keep-alive" in self.connection
        if version not in _HTTP_VERSIONS:
            raise _Refusal(400, "Bad Request", "only HTTP/1.0 and HTTP/1.1 requests are accepted")
        if method == b"CONNECT":
            raise _Refusal(501, "Not Implemented", "CONNECT is not supported by this proxy")
        if self.http_11 and self.host is None:
            raise _Refusal(400, "Bad Request", "HTTP/1.1 requests need a Host header")
        if self.transfer_encoding is not None:
            if not self.http_11:
                raise _Refusal(400, "Bad Request", "Transfer-Encoding is not allowed in HTTP/1.0 requests")
            if self.transfer_encoding.strip().lower() != b"chunked":
                raise _Refusal(501, "Not Implemented", "only `Transfer-Encoding: chunked` is supported")
        if self.content_length is not None and self.content_length > self.app.max_body_bytes:
            raise _Refusal(413, "Content Too Large", "the request body is larger than the proxy accepts")
        if not self.url.startswith(b"/"):
            self._absolute_form()
        try:
            # Routed on and forwarded with the normal path: one route for every spelling.
            self.url = normal_target(self.url)
        except UnsafePathError as unsafe:
            raise _Refusal(400, "Bad Request", f"the request path cannot be routed safely: {unsafe}") from None
        if self.connection:
            self.headers = without_fields(self.headers, self.connection)
        if self.upgrade is not None and (b"upgrade" not in self.connection
                                         or self.upgrade.strip().lower() != b"websocket"):
            # Only WebSocket is relayed: behind any other switch (h2c) later requests
            # would bypass every decision. The request goes on as plain HTTP/1.1.
            self.upgrade = None
        if (self.content_length is not None and self.content_length > 0) or self.transfer_encoding is not None:
            # The body is owed: each piece within the body timeout, and all of it at
            # the minimum rate (see request_body).
            self.body_started_at = self.app.now()
            self.client.set_deadline(self.body_started_at + self.app.body_timeout_s)
        else:
            self.client.deadline = _NEVER

    def _absolute_form(self):
        # `GET http://host/path HTTP/1.1`: the target's authority replaces Host.
        if self.url == b"*" and self.method == b"OPTIONS":
            return
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise _Refusal(400, "Bad Request", "the request target is not a valid URL") from None
        if parsed.schema not in (b"http", b"https") or not parsed.host or parsed.userinfo:
            raise _Refusal(400, "Bad Request", "the request target must be a path or an http URL without user info")
        self.host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        self.headers = [b"host", b": ", self.host, b"\r\n"] + without_fields(self.headers, (b"host",))
        self.url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")

    def request_body(self, body):
        app = self.app
        self.request_bytes += len(body)
        if self.request_bytes > app.max_body_bytes:
            raise _Refusal(413, "Content Too Large", "the request body is larger than the proxy accepts")
        # Moves only later (both terms grow): filed already.
        silence_deadline = app.now() + app.body_timeout_s
        rate_deadline = self._rate_deadline()
        self.client.deadline = silence_deadline if silence_deadline < rate_deadline else rate_deadline
        if self.finished:
            return
        if self.forwarding and self.upstream is not None:
            self._send_body(body)
        else:
            self.pending_body.append(body)
            self.pending_bytes += len(body)
            if self.awaiting_body:
                # Read whole before any upstream connection is taken: a metered call
                # (bounded by max_body_bytes), or a body small enough to hold; a
                # chunked one that outgrows that is forwarded, the rest streamed.
                if self.pending_bytes > app.buffered_body_bytes and self.route.metered_call is None:
                    self.awaiting_body = False
                    self._forward()
            elif self.pending_bytes > PENDING_BODY_HIGH_WATER and self.route is not None:
                self.client.pause_reading(_PENDING_BODY)

    def _rate_deadline(self):
        # When the body read so far would fall below the minimum rate: the body
        # timeout, plus a second for every min_body_bytes_per_s bytes received.
        app = self.app
        return self.body_started_at + app.body_timeout_s + self.request_bytes * app.body_s_per_byte

    def body_too_slow(self, now):
        """Whether the body's timeout at `now` is for its rate (not for silence)."""
        return self._rate_deadline() <= now

    def body_forgiven(self, now):
        """The proxy was not reading this body until `now`: its timeouts start over."""
        self.body_started_at = now - self.request_bytes * self.app.body_s_per_byte
        self.client.set_deadline(now + self.app.body_timeout_s)

    def upgrade_data(self, data):
        """Raw bytes that followed an upgrade request: held until the tunnel opens."""
        if not data:
            return
        if self.upstream is not None and self.forwarding:
            self.upstream.transport.write(data)
        else:
            self.upgrade_tail += data

    def request_completed(self):
        self.request_complete = True
        if self.finished:
            return
        self.client.deadline = _NEVER       # the body is in: nothing more is owed
        if self.awaiting_body:
            self.awaiting_body = False
            self._forward()
        elif self.forwarding and self.upstream is not None:
            if self.transfer_encoding is not None:
                self.upstream.transport.write(_CHUNKED_END)
            # The request is sent: the upstream's silence counts from now.
            self.upstream_due(self.app.now() + self.upstream.pool.read_timeout_s)

    # -- decision -----------------------------------------------------------------------
    def start(self):
        """Route, identify and decide; then forward or answer from the edge."""
        app = self.app
        route = app.router.match(self.host, self.url, self.method)
        if route is None:
            self.answer(404, "Not Found", "no route matches this request", "unrouted")
            return
        self.route = route
        if app.stale and route.fail_closed:
            self.answer(503, "Service Unavailable", "the proxy's edge state is older than its staleness budget; "
                        "this route fails closed until it is fresh again", "state_stale",
                        ((b"retry-after", app.stale_retry_after),))
            return
        values = self.key_values
        key = self.api_key = app.api_key(None if values is None else values[route.key_slot], route.key_bearer)
        snapshot = app.edge_state.snapshot
        customer = snapshot.customer_for_key(key) if key else None
        if customer is None:
            self.answer(401, "Unauthorized", "a valid API key is required" if key else "an API key is required",
                        "unauthorized", ((b"www-authenticate", b"Bearer"),))
            return
        self.customer = customer
        started = app.now()
        decision = decide(customer, route.facts, app.wall_now())
        app.metrics.observe_decision(app.now() - started)
        self.decision = decision
        if decision.outcome == REJECT:
            if app.leases is not None and (
                    decision.reason == REASON_QUOTA_EXCEEDED and app.leases.wait(self, customer, route.facts)
                    or decision.reason == REASON_THROTTLED and app.throttles.wait(self, customer, decision)):
                return                  # decided again when the lease or token comes (lease_settled)
            self._refuse(decision)
            return
        customer.add_usage(route.facts.metric, route.facts.units)
        if app.leases is not None:
            app.leases.admitted(customer, route.facts)
            if decision.outcome == ALLOW_THROTTLED:
                app.throttles.admitted(customer, decision)
        if not self.request_complete and (route.metered_call is not None or self._body_held()):
            # Read whole first (request_completed), holding no upstream connection.
            self.awaiting_body = True
            expect = field_value(self.headers, b"expect")
            if expect is not None and expect.strip().lower() == b"100-continue":
                self.headers = without_fields(self.headers, _EXPECT)
                if self.http_11:
                    self.client.write(_CONTINUE)    # the body is asked for here, not by the upstream
            return
        self._forward()

    def _body_held(self):
        # Whether the request has a body the proxy reads before taking an upstream
        # connection: one of at most buffered_body_bytes, or a chunked one (until it
        # outgrows that).
        if self.transfer_encoding is not None:
            return self.app.buffered_body_bytes > 0
        return self.content_length is not None and 0 < self.content_length <= self.app.buffered_body_bytes

    def _refuse(self, decision):
        """Answer a refusing Decision from the edge, with its Retry-After (and, as
        every answer after a decision, the quota fields)."""
        headers = ((b"retry-after", b"%d" % decision.retry_after_s),) if decision.retry_after_s else ()
        self.answer(decision.status, decision.title, decision.detail, decision.reason, headers)

    def _quota_fields(self):
        """(RateLimit-Policy, RateLimit) values for this response: "" when the
        request was not decided, was refused for its subscription or features, or its
        metrics have no quota in the customer's plan. A route metering more metrics
        (LLM tokens) speaks of each, and any answer after an admission counts what
        the customer has used now; a plain refusal says what decide() found."""
        decision = self.decision
        if decision is None or decision.status == 403:
            return "", ""
        route = self.route
        if decision.outcome == REJECT and not route.facts.other_metrics:
            return decision.quota_policy, decision.quota_status
        customer = self.app.edge_state.counting(self.customer, self.api_key)
        return ratelimit_fields(customer, route.quota_metrics, self.app.wall_now())

    def _forward(self):
        """Send the admitted request upstream (a metered call's body and fields as
        its AiCall or McpCall says, once what it reserves fits the quotas)."""
        route = self.route
        if route.metered_call is not None:
            metered = route.metered_call()
            body, headers = metered.forwarded(b"".join(self.pending_body), self.headers, self.decision.model_map)
            missing = metered.missing_feature(self.customer.features)
            if missing is not None:
                self._refund()
                self.answer(403, TITLES[REASON_FEATURE_NOT_ENTITLED], missing, REASON_FEATURE_NOT_ENTITLED)
                return
            if not self._reserve(metered.reservations()):
                return
            self.metered = metered
            self.headers = without_fields(headers, _EXPECT)
            self.pending_body = [body] if body else []
            self.pending_bytes = len(body)
            self.content_length = len(body) if body or self.content_length is not None else None
            self.transfer_encoding = None            # the whole body is here: sent with its length
        self.forwarding = True
        pool = self.app.pools[route.upstream]
        pool.acquire(self)

    def _reserve(self, reservations):
        """Count a metered call's (metric, units) reservations against the customer's
        quotas (those its plan sets); True when all fit. Otherwise nothing stays
        counted for the request and it is refused 429, or waits for a lease of the
        hard quota it lacks (decided again in lease_settled)."""
        app = self.app
        # The state in force now: the body may have taken a while, and a snapshot
        # rebuilt meanwhile carried this request's units into it.
        customer = self.customer = app.edge_state.counting(self.customer, self.api_key)
        now = app.wall_now()
        for metric, units in reservations:
            if customer.quotas.slot(metric) < 0:
                continue
            refusal = quota_refusal(customer, metric, units, now)
            if refusal is not None:
                self._refund()
                if app.leases is not None and app.leases.wait(self, customer, RequestFacts((), metric, units)):
                    return False
                self._refuse(refusal)
                return False
            customer.add_usage(metric, units)
            if self.reserved is None:
                self.reserved = []
            self.reserved.append((metric, units))
            if app.leases is not None:
                app.leases.admitted(customer, RequestFacts((), metric, units))
        return True

    def _refund(self):
        """The request will not be served: give back every unit counted for it."""
        app = self.app
        customer = app.edge_state.counting(self.customer, self.api_key)
        customer.add_usage(self.route.facts.metric, -self.route.facts.units)
        if self.reserved:
            for metric, units in self.reserved:
                customer.add_usage(metric, -units)
            self.reserved = None

    def _settle(self, events):
        """The call was served and metered as `events`: bring each reservation to
        the units metered."""
        app = self.app
        customer = app.edge_state.counting(self.customer, self.api_key)
        for metric, units in self.reserved:
            used = 0
            for event in events:
                if event.metric == metric:
                    used += event.quantity
            customer.add_usage(metric, used - units)
        self.reserved = None

    def lease_settled(self, ok):
        """The quota lease or throttle token this request waited for is settled (ok:
        granted, refused, or decided from the last state): decide again; else (an
        unexpected failure) answer 503."""
        if self.finished:
            return
        if ok:
            self.start()
        else:
            self.answer(503, "Service Unavailable", "the hard quota cannot be checked right now; retry shortly",
                        "quota_unavailable", ((b"retry-after", b"1"),))

    def answer(self, status, title, detail, reason, headers=()):
        """Answer from the edge (never forwarded). The connection stays open only when
        the request had no body left unread."""
        self.finished = True
        self.app.metrics.count_request(self.route.name if self.route is not None else "", reason)
        policy, status_field = self._quota_fields()
        if policy:
            headers = (*headers, (b"ratelimit-policy", policy.encode()), (b"ratelimit", status_field.encode()))
        body_pending = not self.request_complete and (self.content_length or self.transfer_encoding is not None)
        keep_alive = self.keep_alive and not body_pending and not self.client.closing
        self.client.write(problem_response(status, title, detail, reason=reason, headers=headers, close=not keep_alive))
        self.client.exchange_done(self, keep_alive)

    # -- upstream -------------------------------------------------------------------------
    def upstream_ready(self, conn, reused):
        if self.finished:
            conn.pool.release(conn, True)
            return
        self.upstream = conn
        self.upstream_reused = reused
        app = self.app
        # One list of parts, joined once (appending is far cheaper than concatenating).
        head = [self.method, b" ", self.url, b" HTTP/1.1\r\n"]
        set_fields = app.upstream_fields.get(self.route.upstream) if app.upstream_fields else None
        if set_fields is None:
            head.extend(self.headers)
        else:
            # The fields the upstream is sent from the settings (a provider key) replace the client's.
            head.extend(without_fields(self.headers, set_fields[0]))
            head.append(set_fields[1])
        client = self.client
        trusted = client.peer_trusted
        head.append(b"x-forwarded-for: ")
        if trusted and self.client_forwarded_for:
            head.append(self.client_forwarded_for)
            head.append(b", ")
        head.append(client.peer_ip)
        head.append(b"\r\nx-forwarded-proto: ")
        head.append(self.client_forwarded_proto if trusted and self.client_forwarded_proto else b"http")
        forwarded_host = self.client_forwarded_host if trusted and self.client_forwarded_host else self.host
        if forwarded_host:
            head.append(b"\r\nx-forwarded-host: ")
            head.append(forwarded_host)
        if self.host is None and (set_fields is None or b"host" not in set_fields[0]):
            # An HTTP/1.0 request may lack Host; what is forwarded is HTTP/1.1, which needs one.
            head.append(b"\r\nhost: ")
            head.append(conn.pool.authority)
        head.append(b"\r\nx-aforo-customer: ")
        head.append(self.customer.customer_id.encode())
        decision = self.decision
        if decision.outcome != 0:
            # Level 2: the application may switch to a cheaper path.
            head.append(b"\r\nx-aforo-throttle: true\r\nx-aforo-guard-level: 2\r\nx-aforo-guard: ")
            head.append(decision.guard_id.encode())
        if decision.shadow:
            head.append(b"\r\nx-aforo-shadow: ")
            head.append(decision.shadow.encode())
        if self.upgrade is not None:
            head.append(b"\r\nconnection: upgrade\r\nupgrade: ")
            head.append(self.upgrade)
        elif self.transfer_encoding is not None:
            head.append(b"\r\ntransfer-encoding: chunked")
        elif self.content_length is not None:
            head.append(b"\r\ncontent-length: %d" % self.content_length)
        head.append(b"\r\n\r\n")
        if self.pending_body and self.transfer_encoding is None:
            # The body read so far leaves with the head: one system call, and the
            # upstream is woken once for both.
            conn.transport.writelines([join_parts(head)] + self.pending_body)
        else:
            conn.transport.write(join_parts(head))
            for body in self.pending_body:
                self._send_body(body)
        self.upstream_sent_at = app.now()
        if self.request_complete:
            self.upstream_due(self.upstream_sent_at + conn.pool.read_timeout_s)
        else:
            self.upstream_deadline = _NEVER     # from when the body is sent (request_completed)
        if self.pending_body:
            self.pending_body = []
            self.pending_bytes = 0
            self.client.resume_reading(_PENDING_BODY)
        if self.request_complete and self.transfer_encoding is not None:
            conn.transport.write(_CHUNKED_END)
        if self.upgrade_tail:
            conn.transport.write(self.upgrade_tail)
            self.upgrade_tail = b""
        if self.client.writing_paused:
            # The client has not taken the response before this one yet (pipelining):
            # this one waits upstream, not in the proxy's memory.
            conn.pause_reading()

    def _send_body(self, body):
        if self.transfer_encoding is not None:
            self.upstream.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.upstream.transport.write(body)

    def upstream_failed(self, status, detail):
        """No connection could be had (502 refused / 504 timed out)."""
        if self.finished:
            return
        self._refund()
        self.answer(status, "Bad Gateway" if status == 502 else "Gateway Timeout", detail,
                    "error_502" if status == 502 else "error_504")

    def upstream_lost(self):
        """The upstream connection closed under this exchange."""
        if self.finished:
            return
        conn = self.upstream
        self.upstream = None
        conn.pool.release(conn, False)
        if self.response_started:
            if self.response_close_delimited:
                self.response_complete()
                return
            # Mid-response: the client must see a broken response, never a clean end.
            self._abort_client("upstream closed the connection mid-response")
            return
        if (self.upstream_reused and not self.retried and self.method in IDEMPOTENT_METHODS
                and self.request_bytes == 0 and self.upgrade is None):
            # A reused keep-alive connection the upstream had just closed: safe to send again.
            self.retried = True
            conn.pool.acquire(self)
            return
        self._refund()
        self.answer(502, "Bad Gateway", "upstream closed the connection before responding", "error_502")

    def upstream_broken(self, detail):
        conn = self.upstream
        if conn is not None:
            conn.abort()
        if not self.response_started and not self.finished:
            self.upstream = None
            if conn is not None:
                conn.pool.release(conn, False)
            self._refund()
            self.answer(502, "Bad Gateway", detail, "error_502")

    def upstream_due(self, at):
        """The upstream read timeout is now at `at`."""
        self.upstream_deadline = at
        self.client.due_at(at)

    def check_deadline(self, now):
        """Upstream read timeout: 504 before the response starts, abort after."""
        if self.upstream is None or self.finished or now < self.upstream_deadline:
            return
        conn = self.upstream
        self.upstream = None
        conn.abort()
        conn.pool.release(conn, False)
        if self.response_started:
            self._abort_client("upstream stopped sending mid-response")
        else:
            # Like every 502/504: the customer is not charged for a response never given.
            self._refund()
            self.answer(504, "Gateway Timeout", "upstream did not respond in time", "error_504")

    # -- response, from the upstream parser ----------------------------------------------
    def response_header(self, name, value):
        # Framing and hop-by-hop fields are taken out as they arrive; the fields the
        # upstream's Connection names are dropped once the head is complete.
        kind: cython.int = field_kind(name)
        if kind == FIELD_CONTENT_LENGTH:
            self.response_length = value
        elif kind == FIELD_TRANSFER_ENCODING:
            self.response_chunked_in = True
        elif kind == FIELD_CONNECTION:
            tokens = connection_tokens(value)
            if not tokens <= HOP_BY_HOP:
                self.response_named = tokens if self.response_named is None else self.response_named | tokens
        elif kind != FIELD_DROPPED and kind != FIELD_UPGRADE:
            headers = self.response_headers
            headers.append(name.lower())
            headers.append(b": ")
            headers.append(value)
            headers.append(b"\r\n")

    def _response_fields(self):
        """The upstream's end-to-end fields as wire parts, without those its Connection named."""
        named = self.response_named
        return self.response_headers if named is None else without_fields(self.response_headers, named)

    def response_headers_complete(self, status, upstream_keep_alive):
        now = self.app.now()
        self.upstream_due(now + self.upstream.pool.read_timeout_s)
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): relay it with its fields,
            # the real one follows. An HTTP/1.0 client would take it for the answer.
            if self.http_11:
                head = [status_line(status, self.response_status_phrase or None)]
                head.extend(self._response_fields())
                head.append(b"\r\n")
                self.client.write(join_parts(head))
            self.response_headers = []
            self.response_named = None
            self.response_length = None
            self.response_chunked_in = False
            self.response_status_phrase = b""
            return
        self.response_started = True
        self.response_status = status
        self.app.metrics.observe_upstream(self.upstream.pool.name, now - self.upstream_sent_at)
        self.response_keep_alive = upstream_keep_alive
        length = self.response_length
        chunked = self.response_chunked_in
        client_keep_alive = self.keep_alive and not self.client.closing and not self.app.closing
        if self.upgrade is not None and status != 101:
            # The client is waiting to switch protocols; after a refusal its connection
            # cannot be trusted to carry HTTP again, nor can the upstream's.
            client_keep_alive = False
            self.response_keep_alive = False
        head = [status_line(status, self.response_status_phrase or None)]
        head.extend(self._response_fields())
        decision = self.decision
        if self.route.facts.other_metrics:
            policy, quota_status = self._quota_fields()     # tokens too, as reserved now
        else:
            policy, quota_status = decision.quota_policy, decision.quota_status
        if policy:
            head.append(b"ratelimit-policy: ")
            head.append(policy.encode())
            head.append(b"\r\nratelimit: ")
            head.append(quota_status.encode())
            head.append(b"\r\n")
        if decision.outcome != 0:
            head.append(b"x-aforo-throttle: true\r\n")
        if decision.shadow and self.app.shadow_to_client:
            head.append(b"x-aforo-shadow: ")
            head.append(decision.shadow.encode())
            head.append(b"\r\n")
        if self.metered is not None:
            head.extend(self.metered.response_fields())
        no_body = self.method == b"HEAD" or status in _NO_BODY_STATUSES or status == 101
        if status == 101:
            head.append(b"connection: upgrade\r\nupgrade: ")
            head.append(self.upgrade or b"")
            head.append(b"\r\n")
        elif no_body or (length is not None and not chunked):
            if length is not None:
                head.append(b"content-length: ")
                head.append(length)
                head.append(b"\r\n")
        elif self.http_11:
            self.response_chunked_out = True
            head.append(b"transfer-encoding: chunked\r\n")
        else:
            client_keep_alive = False   # HTTP/1.0 client: the end of the body is the close
        if not chunked and length is None and not no_body:
            self.response_close_delimited = True
        if not client_keep_alive and status != 101:
            head.append(b"connection: close\r\n")
        elif not self.http_11 and status != 101:
            # An HTTP/1.0 client keeps the connection only when the response says so.
            head.append(b"connection: keep-alive\r\n")
        self.keep_alive = client_keep_alive
        head.append(b"\r\n")
        self.client.write(join_parts(head))
        if self.metered is not None:
            self.metered.response_started(status, self.response_headers)
        if self.method == b"HEAD" and status != 101:
            self.upstream.reset_parser()
            self.response_complete()

    def response_body(self, body):
        self.upstream_deadline = self.app.now() + self.upstream.pool.read_timeout_s
        self.response_bytes += len(body)
        if self.metered is not None:
            self.metered.response_chunk(body)
        if self.response_chunked_out:
            self.client.write(chunk_frame(body))
        else:
            self.client.write(body)

    def response_complete(self):
        if self.finished or not self.response_started or self.response_status == 101:
            # Already done, an interim 1xx, or a 101 whose tunnel the parser opens next.
            return
        self.finished = True
        if self.response_chunked_out:
            self.client.write(_CHUNKED_END)
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            reusable = (self.response_keep_alive and self.request_complete and not self.response_close_delimited
                        and not conn.closed)
            conn.pool.release(conn, reusable)
        app = self.app
        app.metrics.count_request(self.route.name, self.decision.reason)
        self._meter()
        self.client.exchange_done(self, self.keep_alive)

    def upstream_switched_protocols(self, tail):
        """101 from the upstream: the head was relayed; tunnel raw bytes from now on."""
        conn = self.upstream
        if self.response_status != 101 or conn is None:
            self.upstream_broken("upstream switched protocols without 101")
            return
        self.finished = True
        self.upstream = None
        conn.pool.busy -= 1          # a tunnel never returns to the pool
        conn.exchange = None
        if tail:
            self.client.write(tail)
        app = self.app
        app.metrics.count_request(self.route.name, self.decision.reason)
        self._meter()
        client = self.client
        if client.exchanges and client.exchanges[0] is self:
            client.exchanges.popleft()
        client.start_tunnel(conn)
        if self.upgrade_tail:
            conn.transport.write(self.upgrade_tail)
            self.upgrade_tail = b""

    def _meter(self):
        """Record this forwarded exchange's meter events (never blocks)."""
        app = self.app
        route = self.route
        facts = route.facts
        now = app.wall_now()
        latency_ms = (app.now() - self.started_at) * 1000.0
        customer_id = self.customer.customer_id
        dimensions = None
        if self.metered is not None:
            dimensions, events = self.metered.finish(customer_id, now, route.name, self.response_status,
                                                     self.request_bytes, self.response_bytes, latency_ms)
            for event in events:
                app.meter_buffer.record(event)
            if self.reserved:
                self._settle(events)
        app.meter_buffer.record(MeterEvent(
            new_event_id(), customer_id, facts.metric, facts.units, now, route.name,
            self.response_status, self.request_bytes, self.response_bytes, latency_ms, dimensions,
        ))

    def cork_client(self):
        self.client.cork()

    def uncork_client(self):
        self.client.uncork()

    def upstream_full(self):
        self.client.upstream_full()
        if not self.request_complete and not self.response_started:
            # The upstream takes no more of the body: its silence counts from now.
            self.upstream_due(self.app.now() + self.upstream.pool.read_timeout_s)

    def upstream_drained(self):
        self.client.upstream_drained()
        if not self.request_complete and not self.response_started:
            self.upstream_deadline = _NEVER

    # -- teardown ---------------------------------------------------------------------------
    def client_gone(self):
        """The client connection closed: stop the upstream side of this exchange."""
        if self.finished:
            return
        self.finished = True
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
            conn.pool.release(conn, False)
            if self.response_started:
                self._meter()
        elif self.forwarding and self.route is not None:
            self.app.pools[self.route.upstream].cancel(self)
        if (self.forwarding or self.awaiting_body) and not self.response_started:
            # No response, no meter event: the quota is not charged either (nor for a
            # metered call admitted while its body was still being read).
            self._refund()

    def _abort_client(self, why):
        self.finished = True
        self.app.metrics.count_request(self.route.name, "error_502")
        self._meter()
        client = self.client
        client.closing = True
        client.exchanges.clear()
        if client.transport is not None:
            client.transport.abort()

    def pause_upstream_reading(self):
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_upstream_reading(self):
        if self.upstream is not None:
            self.upstream.resume_reading()
