# A running proxy over real sockets, with real upstream servers, for the tests in this
# folder. The proxy and the upstreams run on one uvloop loop in a background thread;
# tests talk to them from the main thread with real HTTP clients and raw sockets.
# Time only moves where a test moves it: timeouts are driven by calling the proxy's
# sweep with a later `now`, never by sleeping.
import asyncio
import datetime
import hashlib
import json
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest
import uvloop
from aiohttp import web

from config.proxy_settings import load_proxy_settings
from proxy.server import ProxyWorker

# Every key used by the tests and the customer it belongs to.
KEYS = {
    "k-pro": "cus_pro",
    "k-free": "cus_free",
    "k-pastdue": "cus_pastdue",
    "k-throttled": "cus_throttled",
    "k-blocked": "cus_blocked",
    "k-locked": "cus_locked",
    "k-shadow": "cus_shadow",
    "k-nearquota": "cus_nearquota",
}
SOCKET_TIMEOUT_S = 10  # a safety bound on reads, never an assertion


class LoopThread:
    """An event loop running in its own thread; run() executes a coroutine on it."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=SOCKET_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def wrapper():
            return fn(*args)
        return self.run(wrapper())

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.stop()


# -- upstream ---------------------------------------------------------------------------

class Upstream:
    """A real HTTP server (aiohttp) the proxy forwards to, with endpoints for each
    behaviour the tests need and a log of what reached it."""

    def __init__(self, loop_thread):
        self.loop_thread = loop_thread
        self.requests = []            # (method, path, headers dict, body bytes, peer port)
        self.gates = {}               # name -> threading.Event the handler waits on
        self.collected = []           # sizes of the request body pieces /collect has read so far
        self.runner = None
        self.port = None

    def gate(self, name):
        return self.gates.setdefault(name, threading.Event())

    async def _wait_gate(self, name):
        await asyncio.get_running_loop().run_in_executor(None, self.gate(name).wait, SOCKET_TIMEOUT_S)

    def app(self):
        routes = web.RouteTableDef()

        @routes.route("*", "/echo{tail:.*}")
        async def echo(request):
            body = await request.read()
            peer_port = request.transport.get_extra_info("peername")[1]
            self.requests.append((request.method, request.path_qs, dict(request.headers), body, peer_port))
            return web.json_response({
                "method": request.method,
                "path": request.path_qs,
                "headers": {name.lower(): value for name, value in request.headers.items()},
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
                "peer_port": peer_port,
            }, headers={"X-Upstream": "yes", "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                        "Keep-Alive": "timeout=5", "X-Aforo-Throttle": "forged"})

        @routes.route("*", "/inspect{tail:.*}")
        async def inspect(request):
            # Like /echo, but reports the request line and every header field exactly
            # as received (repeats included), so duplicates and casing are visible.
            body = await request.read()
            peer_port = request.transport.get_extra_info("peername")[1]
            self.requests.append((request.method, request.raw_path, dict(request.headers), body, peer_port))
            return web.json_response({
                "method": request.method,
                "raw_path": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "raw_headers": [[name.decode("latin-1").lower(), value.decode("latin-1")]
                                for name, value in request.raw_headers],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "peer_port": peer_port,
            })

        @routes.post("/collect")
        async def collect(request):
            # Reads the request body piece by piece as it arrives; `collected` lets a
            # test see how much has reached the upstream before it sends more.
            digest = hashlib.sha256()
            async for piece in request.content.iter_any():
                digest.update(piece)
                self.collected.append(len(piece))
            return web.json_response({"body_len": sum(self.collected), "body_sha256": digest.hexdigest(),
                                      "chunked": request.headers.get("Transfer-Encoding", "") == "chunked"})

        @routes.get("/stream")
        async def stream(request):
            # Sends chunk i, then waits for gate "stream-i" before the next one.
            count = int(request.query.get("chunks", "3"))
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for index in range(count):
                await response.write(f"chunk-{index};".encode())
                if index < count - 1:
                    await self._wait_gate(f"stream-{index}")
            await response.write_eof()
            return response

        @routes.get("/sse")
        async def sse(request):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            for index in range(3):
                await response.write(f"data: event-{index}\n\n".encode())
                if index < 2:
                    await self._wait_gate(f"sse-{index}")
            await response.write_eof()
            return response

        @routes.get("/large")
        async def large(request):
            size = int(request.query["size"])
            return web.Response(body=b"x" * size)

        @routes.get("/slow")
        async def slow(request):
            self.requests.append(("GET", request.path_qs, dict(request.headers), b"", 0))
            await self._wait_gate("slow")
            return web.Response(text="finally")

        @routes.get("/die")
        async def die(request):
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"y" * 100)
            request.transport.abort()
            return response

        @routes.route("*", "/status/{code}")
        async def status(request):
            code = int(request.match_info["code"])
            return web.Response(status=code, body=None if code in (204, 304) else b"status body")

        @routes.get("/ws")
        async def websocket(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str("echo:" + message.data)
            return ws

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(routes)
        return app

    async def start(self):
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self):
        for gate in self.gates.values():
            gate.set()
        await self.runner.cleanup()


@pytest.fixture
def upstream(loop_thread):
    server = Upstream(loop_thread)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


class RawUpstream:
    """A bare TCP upstream whose answers a test scripts byte for byte, for responses an
    HTTP framework will not produce (close-delimited bodies, closing a keep-alive
    connection at a chosen moment).

    `script(upstream, index, reader, writer)` runs for each accepted connection
    (`index` counts them from 0); the connection is closed when it returns.
    `read_request(reader)` reads one request (Content-Length bodies only) and logs it
    in `requests` as (connection index, method, target, body)."""

    def __init__(self, loop_thread):
        self.loop_thread = loop_thread
        self.script = None
        self.connections = 0
        self.requests = []
        self.server = None
        self.port = None

    async def _serve(self, reader, writer):
        index = self.connections
        self.connections += 1
        try:
            await self.script(self, index, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader, index):
        """(method, target, body) of the next request on the connection, or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        self.requests.append((index, method, target, body))
        return method, target, body

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self):
        self.server.close()


@pytest.fixture
def raw_upstream(loop_thread):
    server = RawUpstream(loop_thread)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def wait_until(loop_thread, predicate, timeout_s=SOCKET_TIMEOUT_S):
    """Evaluate `predicate()` on the proxy's loop until it is true; a bound on waiting
    for something the test caused to happen, never a timed assertion."""
    deadline = time.monotonic() + timeout_s
    while not loop_thread.call(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition never became true: {predicate}")
        time.sleep(0.002)


# -- edge state and settings ------------------------------------------------------------------

def digest(key):
    return hashlib.sha256(key.encode()).hexdigest()


def edge_state_yaml(period_end=None, extra_customers=""):
    now = datetime.datetime.now(datetime.timezone.utc)
    start = (now - datetime.timedelta(days=10)).replace(microsecond=0)
    end = period_end or (now + datetime.timedelta(days=20)).replace(microsecond=0)
    return textwrap.dedent(f"""\
        period: {{start: "{start.isoformat()}", end: "{end.isoformat()}"}}
        plans:
          free: {{tier: free, features: [], quotas: {{api_calls: {{limit: 1000, hard: true}}}}}}
          pro:
            tier: pro
            features: [large_models]
            quotas: {{api_calls: {{limit: 100000, hard: true}}, ai_tokens: {{limit: 5000000, hard: false}}}}
        customers:
          - {{id: cus_pro, plan: pro, status: active, api_keys: [{digest("k-pro")}]}}
          - {{id: cus_free, plan: free, status: active, api_keys: [{digest("k-free")}]}}
          - {{id: cus_pastdue, plan: pro, status: past_due, api_keys: [{digest("k-pastdue")}]}}
          - id: cus_throttled
            plan: pro
            status: active
            api_keys: [{digest("k-throttled")}]
            levels: {{api_calls: {{guard: g-throttle, level: 2, throttle_rate: 1req/min, burst: 2}}}}
          - id: cus_blocked
            plan: pro
            status: active
            api_keys: [{digest("k-blocked")}]
            levels: {{overall: {{guard: g-block, level: 3}}}}
          - id: cus_locked
            plan: pro
            status: active
            api_keys: [{digest("k-locked")}]
            levels: {{ai_tokens: {{guard: g-lock, level: 3, locked_features: [large_models]}}}}
          - id: cus_shadow
            plan: pro
            status: active
            api_keys: [{digest("k-shadow")}]
            levels: {{api_calls: {{guard: g-shadow, level: 3, mode: shadow}}}}
          - id: cus_nearquota
            plan: free
            status: active
            api_keys: [{digest("k-nearquota")}]
            usage: {{api_calls: 998}}
        """) + extra_customers


DEFAULT_ROUTES = """\
  - {name: chat, upstream: main, path_prefix: /v1/chat, methods: [POST], features: [large_models], metric: ai_tokens, units: 100}
  - {name: everything, upstream: main, path_prefix: /, metric: api_calls, units: 1}
"""


class RunningProxy:
    """A ProxyWorker serving on 127.0.0.1 with its files in a temporary folder."""

    def __init__(self, loop_thread, folder, worker):
        self.loop_thread = loop_thread
        self.folder = folder
        self.worker = worker
        self.port = worker.port
        self.admin_port = worker.admin_port
        self.app = worker.app
        self.meter_path = Path(worker.settings.metering.path)
        self.edge_state_path = Path(worker.settings.edge_state.file)

    def sweep(self, seconds_later):
        """Run the timeout sweep as if `seconds_later` had passed."""
        app = self.app
        self.loop_thread.call(lambda: app.sweep(app.clock() + seconds_later))

    def stop(self, grace_s=1.0):
        if not self.worker.stopped.is_set():
            self.loop_thread.run(self.worker.stop(grace_s), timeout=30)

    def meter_events(self):
        if not self.meter_path.exists():
            return []
        return [json.loads(line) for line in self.meter_path.read_text().splitlines() if line.strip()]

    def pool(self, name="main"):
        return self.app.pools[name]


@pytest.fixture
def make_proxy(loop_thread, tmp_path):
    started = []

    def make(upstream_port, *, routes=DEFAULT_ROUTES, limits="", pool_size=8, read_timeout_s=30,
             api_key_header="authorization", trusted="[]", edge_state=None, extra_upstreams="", extra_settings=""):
        (tmp_path / "edge_state.yaml").write_text(edge_state or edge_state_yaml())
        settings_text = textwrap.dedent(f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            api_key_header: {api_key_header}
            trusted_proxies: {trusted}
            """) + extra_settings + (f"limits:\n{limits}" if limits else "") + textwrap.dedent(f"""\
            upstreams:
              main: {{url: "http://127.0.0.1:{upstream_port}", pool_size: {pool_size}, connect_timeout_s: 2, read_timeout_s: {read_timeout_s}}}
            """) + extra_upstreams + "routes:\n" + routes + textwrap.dedent("""\
            edge_state: {file: edge_state.yaml, reload_interval_s: 3600}
            metering: {path: meter-events.ndjson, spool_dir: meter-spool, buffer_events: 1000, batch_events: 10, flush_interval_s: 3600}
            """)
        (tmp_path / "proxy.yaml").write_text(settings_text)
        settings = load_proxy_settings(tmp_path / "proxy.yaml")
        worker = ProxyWorker(settings, loop=loop_thread.loop)
        loop_thread.run(worker.start())
        proxy = RunningProxy(loop_thread, tmp_path, worker)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


# -- raw client helpers ---------------------------------------------------------------------

def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
    return sock


def read_until_closed(sock):
    """Everything the peer sends until it closes (or resets) the connection."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def send_raw(port, data):
    """Send raw bytes, half-close nothing, and read until the proxy closes."""
    with connect(port) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


class HttpReader:
    """Reads HTTP/1.1 responses from a raw socket one at a time (Content-Length or
    chunked bodies), so keep-alive and pipelining can be checked byte for byte."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def read_line(self):
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_exact(self, size):
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_response(self, head_only=False):
        """(status, headers dict with lower-case names, body, framing)."""
        status_line = self.read_line()
        status = int(status_line.split()[1])
        headers = {}
        raw_headers = []
        while True:
            line = self.read_line()
            if not line:
                break
            name, _, value = line.partition(b":")
            raw_headers.append((name.decode().lower(), value.strip().decode()))
            headers[name.decode().lower()] = value.strip().decode()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", "none"
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self.read_line().split(b";")[0], 16)
                if size == 0:
                    self.read_line()
                    return status, headers, body, "chunked"
                body += self.read_exact(size)
                self.read_line()
        if "content-length" in headers:
            return status, headers, self.read_exact(int(headers["content-length"])), "length"
        body = self.buffer
        try:
            while True:
                self._fill()
        except ConnectionError:
            pass
        body, self.buffer = self.buffer, b""
        return status, headers, body, "close"


def request(port, method, path, *, key="k-pro", headers=None, body=None, host="api.test"):
    """One request on a fresh connection; returns (status, headers, body)."""
    with connect(port) as sock:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        if key:
            lines.append(f"Authorization: Bearer {key}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        status, response_headers, response_body, _ = HttpReader(sock).read_response(head_only=method == "HEAD")
        return status, response_headers, response_body
