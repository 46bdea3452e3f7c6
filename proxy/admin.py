# The admin endpoint, on its own port: GET /metrics (Prometheus text), /healthz (the
# process runs), /readyz (the proxy's ready() callback). One request per connection,
# answered and closed; a known path with another method is 405, an unknown path 404.
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.metrics import ProxyMetrics

log = logging.getLogger("aforo.admin")

ADMIN_REQUEST_TIMEOUT_S = 10.0        # a connection that has not sent a whole request by then is closed
ADMIN_MAX_REQUEST_BYTES = 16 * 1024   # admin requests are a request line and a few headers
# After answering, the server half-closes and waits this long for the client to close:
# closing at once with request bytes still arriving would reset the connection and
# could destroy the answer before the client read it (e.g. a 431 to an oversized request).
ADMIN_LINGER_S = 2.0
TEXT_PLAIN = "text/plain; charset=utf-8"

# (ready, reason): readiness and the text /readyz answers with.
ReadyCheck = Callable[[], tuple[bool, str]]

_REASON_PHRASES = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


def admin_response(status: int, body: bytes, content_type: str = TEXT_PLAIN, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection: status line, headers
    (`extra_headers` as ready-made "Name: value\\r\\n" lines) and `body`."""
    head = (f"HTTP/1.1 {status} {_REASON_PHRASES[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            f"{extra_headers}"
            "Connection: close\r\n\r\n")
    return head.encode("latin-1") + body


_HEALTHY = admin_response(200, b"ok\n")
_NOT_FOUND = admin_response(404, b"not found\n")
_NOT_ALLOWED = admin_response(405, b"method not allowed\n", extra_headers="Allow: GET\r\n")
_BAD_REQUEST = admin_response(400, b"bad request\n")
_TOO_LARGE = admin_response(431, b"request too large\n")
_TIMED_OUT = admin_response(408, b"request timeout\n")
_FAILED = admin_response(500, b"internal error\n")
_PATHS = (b"/metrics", b"/healthz", b"/readyz")


class AdminEndpoint:
    """What the admin port answers, without any I/O: `respond(method, target)`
    returns the whole response for one request."""

    def __init__(self, metrics: ProxyMetrics, ready: ReadyCheck):
        self.metrics = metrics
        self.ready = ready

    def respond(self, method: bytes, target: bytes) -> bytes:
        """The response to `method` on `target` (path and optional query, which is
        ignored). GET /metrics: the registry in Prometheus text format. GET /healthz:
        200 "ok". GET /readyz: 200 with ready()'s reason (or "ready") when ready, else
        503 with the reason; a ready() that raises counts as not ready. Another method
        on those paths: 405 with `Allow: GET`. Any other path: 404. A metrics
        collection that raises: 500."""
        path = target.split(b"?", 1)[0]
        if path not in _PATHS:
            return _NOT_FOUND
        if method != b"GET":
            return _NOT_ALLOWED
        if path == b"/healthz":
            return _HEALTHY
        if path == b"/readyz":
            return self._readiness()
        try:
            return admin_response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        except Exception:
            log.exception("cannot render /metrics")
            return _FAILED

    def _readiness(self) -> bytes:
        try:
            is_ready, reason = self.ready()
        except Exception as error:
            log.exception("readiness check failed")
            is_ready, reason = False, f"readiness check failed: {error!r}"
        if is_ready:
            return admin_response(200, ((reason or "ready") + "\n").encode())
        return admin_response(503, ((reason or "not ready") + "\n").encode())


class AdminConnection(asyncio.Protocol):
    """One admin connection: parse one request with httptools, answer it, close
    (a lingering close, see ADMIN_LINGER_S). Never lets an exception out of a
    callback; a malformed request gets 400, one larger than ADMIN_MAX_REQUEST_BYTES
    431, one not complete within the request timeout 408."""

    def __init__(self, endpoint: AdminEndpoint, loop: asyncio.AbstractEventLoop, request_timeout_s: float):
        self._endpoint = endpoint
        self._loop = loop
        self._request_timeout_s = request_timeout_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport = None
        self._timer = None
        self._target = b""
        self._received = 0
        self._answered = False

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport):
        self._transport = transport
        self._timer = self._loop.call_later(self._request_timeout_s, self._answer, _TIMED_OUT)

    def data_received(self, data):
        if self._answered:
            return              # answered: the rest is read and dropped until the client closes
        self._received += len(data)
        if self._received > ADMIN_MAX_REQUEST_BYTES:
            self._answer(_TOO_LARGE)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if not self._answered:
                self._answer(_BAD_REQUEST)
        except httptools.HttpParserError:
            self._answer(_BAD_REQUEST)
        except Exception:
            log.exception("admin request failed")
            self._answer(_FAILED)

    def eof_received(self):
        if not self._answered:
            self._answered = True   # a request cut short: nothing to answer
        return False                # the transport closes

    def connection_lost(self, exc):
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- httptools callbacks --------------------------------------------------------
    def on_url(self, url: bytes):
        self._target += url

    def on_message_complete(self):
        self._answer(self._endpoint.respond(self._parser.get_method(), self._target))

    def _answer(self, response: bytes) -> None:
        if self._answered:
            return
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = self._loop.call_later(ADMIN_LINGER_S, transport.close)
        else:
            self._timer = None
            transport.close()


async def start_admin_server(host: str, port: int, metrics: ProxyMetrics, ready: ReadyCheck, *,
                             request_timeout_s: float = ADMIN_REQUEST_TIMEOUT_S) -> asyncio.Server:
    """Listen on (host, port) — port 0 picks a free one, see server.sockets — and serve
    the admin endpoint (see AdminEndpoint.respond) until the returned server is closed.
    Raises OSError when the address cannot be bound."""
    loop = asyncio.get_running_loop()
    endpoint = AdminEndpoint(metrics, ready)
    return await loop.create_server(lambda: AdminConnection(endpoint, loop, request_timeout_s), host, port)
