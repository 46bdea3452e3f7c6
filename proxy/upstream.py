# Upstream side: one keep-alive connection pool per upstream, and the protocol that
# parses an upstream's responses with httptools and hands them to the exchange that
# owns the connection. A pool never holds more than `size` connections (idle, busy or
# connecting); requests beyond that wait in order. Only idle connections are reused.
import collections
import ssl

import httptools

# How long past the connect timeout the loop would end a TLS handshake itself.
TLS_HANDSHAKE_BACKSTOP_S = 1.0


class ResponseSink:
    """What an upstream connection hands its responses to: the exchange that owns it.
    (A base class so that, compiled, these are direct C calls.)"""

    def upstream_ready(self, conn, reused):
        """`conn` is this exchange's now (`reused`: it served requests before)."""
        raise NotImplementedError

    def upstream_failed(self, status, detail):
        """No connection could be had: 502 (refused, unreachable) or 504 (timed out)."""
        raise NotImplementedError

    def upstream_lost(self):
        """The connection closed under this exchange."""
        raise NotImplementedError

    def upstream_broken(self, detail):
        """The upstream sent something that is not HTTP."""
        raise NotImplementedError

    def response_header(self, name, value):
        raise NotImplementedError

    def response_headers_complete(self, status, upstream_keep_alive):
        raise NotImplementedError

    def response_body(self, body):
        raise NotImplementedError

    def response_complete(self):
        raise NotImplementedError

    def upstream_switched_protocols(self, tail):
        """101 and its tunnel: `tail` is what followed the response head in the same read."""
        raise NotImplementedError

    def cork_client(self):
        """Hold what is written to the client until uncork_client() (one read's output)."""
        raise NotImplementedError

    def uncork_client(self):
        raise NotImplementedError

    def upstream_full(self):
        """The upstream takes no more request bytes for now: stop reading the client."""
        raise NotImplementedError

    def upstream_drained(self):
        raise NotImplementedError


class UpstreamConnection:
    """A connection to an upstream, owned by at most one exchange at a time."""

    def __init__(self, pool):
        self.pool = pool
        self.transport = None
        self.exchange = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.tunnel = None          # the client connection once a 101 switched protocols
        self.writing_paused = False
        self.reading_paused = False  # while the owning exchange's client cannot take more

    # -- asyncio protocol (duck-typed: a compiled class cannot derive asyncio.Protocol) --
    def connection_made(self, transport):
        # uvloop sets TCP_NODELAY on every TCP transport: request heads leave at once.
        self.transport = transport

    def data_received(self, data):
        if self.tunnel is not None:
            self.tunnel.tunnel_moved()
            self.tunnel.transport.write(data)
            return
        exchange = self.exchange
        if exchange is None:
            # Bytes from an idle upstream are a protocol error: never reuse it.
            self.close()
            return
        # Everything this read produces for the client leaves in one write.
        exchange.cork_client()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            tail = data[upgrade.args[0]:] if upgrade.args else b""
            exchange.upstream_switched_protocols(tail)
        except httptools.HttpParserError as error:
            if self.exchange is exchange:
                exchange.upstream_broken(f"invalid response from upstream: {error}")
            else:
                # Bytes after the end of the response, in the same read: they answer no
                # request, so nothing that comes on this connection can be trusted.
                self.abort()
        finally:
            exchange.uncork_client()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.transport.close()
        exchange, self.exchange = self.exchange, None
        self.pool.forget(self)
        if exchange is not None:
            exchange.upstream_lost()

    def pause_writing(self):
        self.writing_paused = True
        if self.tunnel is not None:
            self.tunnel.upstream_full()
        elif self.exchange is not None:
            self.exchange.upstream_full()

    def resume_writing(self):
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.upstream_drained()
        elif self.exchange is not None:
            self.exchange.upstream_drained()

    # -- httptools callbacks: forwarded to the owning exchange ---------------------
    def on_status(self, status):
        self.exchange.response_status_phrase += status

    def on_header(self, name, value):
        self.exchange.response_header(name, value)

    def on_headers_complete(self):
        self.exchange.response_headers_complete(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body):
        self.exchange.response_body(body)

    def on_message_complete(self):
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete()

    # -- used by the exchange -------------------------------------------------------
    def pause_reading(self):
        """Stop reading the response while the client's socket is full."""
        if not self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self):
        if self.reading_paused:
            self.reading_paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def reset_parser(self):
        """A fresh parser for the next response (after a HEAD response, whose body the
        parser cannot know is absent)."""
        self.parser = httptools.HttpResponseParser(self)

    def close(self):
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self):
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream (host, port), at most `size` at a time.

    acquire(exchange) hands a connection to exchange.upstream_ready(conn, reused) —
    at once when one is idle, after connecting when there is room, or in FIFO order
    when the pool is full; a failure calls exchange.upstream_failed(status, detail)
    (502 refused/unreachable, 504 connect timeout). Waiting exchanges are timed out by
    sweep(now) after connect_timeout_s.
    """

    def __init__(self, name, host, port, size, connect_timeout_s, read_timeout_s, loop, clock, tls=None):
        self.name = name
        self.host = host
        self.port = port
        self.tls = tls                # an ssl.SSLContext for an https upstream, else None
        # The Host of requests that came without one (HTTP/1.0).
        self.authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.loop = loop
        self.clock = clock
        self.idle = collections.deque()
        self.busy = 0
        self.connecting = {}          # connect task -> (exchange, deadline)
        self.waiters = collections.deque()   # (exchange, deadline)
        self.connects_total = 0

    @property
    def open_count(self):
        return len(self.idle) + self.busy + len(self.connecting)

    def acquire(self, exchange):
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self.busy += 1
                conn.exchange = exchange
                exchange.upstream_ready(conn, True)
                return
        if self.open_count < self.size:
            self._connect(exchange)
        else:
            self.waiters.append((exchange, self.clock() + self.connect_timeout_s))

    def cancel(self, exchange):
        """Withdraw a waiting or connecting exchange (its client went away)."""
        for entry in list(self.waiters):
            if entry[0] is exchange:
                self.waiters.remove(entry)
        for task, (owner, _) in list(self.connecting.items()):
            if owner is exchange:
                self.connecting[task] = (None, self.connecting[task][1])

    def release(self, conn, reusable):
        """Give back `conn` after its exchange; reusable only when both the request and
        the response were complete and the upstream agreed to keep it alive."""
        self.busy -= 1
        conn.exchange = None
        if reusable and not conn.closed:
            # A response can end in the very read whose relay filled the client's socket:
            # the pause was for that client only, and an idle connection must be read to
            # notice the upstream closing it.
            conn.resume_reading()
            if self.waiters:
                exchange, _ = self.waiters.popleft()
                self.busy += 1
                conn.exchange = exchange
                exchange.upstream_ready(conn, True)
                return
            self.idle.append(conn)
            return
        conn.abort() if not reusable else conn.close()
        self._serve_waiter()

    def forget(self, conn):
        """A connection closed: drop it from the idle list (busy ones are released by
        their exchange)."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now):
        """Time out exchanges waiting for a connection longer than connect_timeout_s."""
        while self.waiters and self.waiters[0][1] <= now:
            exchange, _ = self.waiters.popleft()
            exchange.upstream_failed(504, f"no connection to upstream {self.name!r} became free in time")
        for task, (exchange, deadline) in list(self.connecting.items()):
            if deadline <= now:
                task.cancel()

    def close(self):
        """Close idle connections (at shutdown); busy ones close with their exchange."""
        while self.idle:
            self.idle.pop().close()
        for exchange, _ in self.waiters:
            exchange.upstream_failed(502, "the proxy is shutting down")
        self.waiters.clear()

    def _serve_waiter(self):
        if self.waiters and self.open_count < self.size:
            exchange, _ = self.waiters.popleft()
            self._connect(exchange)

    def _connect(self, exchange):
        self.connects_total += 1
        if self.tls is None:
            connecting = self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
        else:
            # The handshake is bounded by the connect timeout (the sweep cancels it, 504);
            # the loop's own bound is only a backstop behind it.
            connecting = self.loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port, ssl=self.tls, server_hostname=self.host,
                ssl_handshake_timeout=self.connect_timeout_s + TLS_HANDSHAKE_BACKSTOP_S)
        task = self.loop.create_task(connecting)
        self.connecting[task] = (exchange, self.clock() + self.connect_timeout_s)
        task.add_done_callback(self._connected)

    def _failure(self, error):
        # What a 502 says of a connection that could not be had.
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS handshake with upstream {self.name!r} failed: certificate verify failed: {error.verify_message}"
        if isinstance(error, ssl.SSLError):
            return f"TLS handshake with upstream {self.name!r} failed: {error.reason or error}"
        if self.tls is not None and isinstance(error, (ConnectionResetError, ConnectionAbortedError)):
            return f"TLS handshake with upstream {self.name!r} failed: {error}"
        if isinstance(error, OSError):
            return f"upstream {self.name!r} is unreachable: {error.strerror or error}"
        return f"upstream {self.name!r} failed: {error}"

    def _connected(self, task):
        exchange, _ = self.connecting.pop(task)
        if task.cancelled():
            if exchange is not None:
                exchange.upstream_failed(504, f"connecting to upstream {self.name!r} timed out")
            self._serve_waiter()
            return
        error = task.exception()
        if error is not None:
            if exchange is not None:
                exchange.upstream_failed(502, self._failure(error))
            self._serve_waiter()
            return
        _, conn = task.result()
        if exchange is None:
            # Its client left while connecting: keep the connection for the next one.
            if self.waiters:
                exchange, _ = self.waiters.popleft()
            else:
                self.idle.append(conn)
                return
        self.busy += 1
        conn.exchange = exchange
        exchange.upstream_ready(conn, False)
