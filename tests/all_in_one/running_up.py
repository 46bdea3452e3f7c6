# `aforo up --config FILE` in its own process for end-to-end tests, with the API it
# proxies to and the webhook receiver (Backend) in threads of the test.
import datetime
import http.server
import json
import os
import socket
import textwrap
import threading
import time
import urllib.error
import urllib.request

from running_command import Command

from control_plane.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify_signature,
)

SECRET = "demo-secret-for-tests"
WAIT_S = 20.0
ANCHOR = "2026-01-01T00:00:00Z"


def free_port(count=1):
    """A port such that it and the `count - 1` after it are free now."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if all(_free(port + offset) for offset in range(1, count)):
            return port


def _free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Backend(http.server.ThreadingHTTPServer):
    """The API behind the proxy (counts what reaches it, keeps its headers) and the webhook receiver
    (keeps every delivery with whether its signature verifies)."""

    daemon_threads = True

    def __init__(self):
        self.api_requests = 0
        self.api_headers = []        # the request headers of each API call, in order
        self.webhooks = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self):
        return self.server_address[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.api_requests += 1
            self.server.api_headers.append({name.lower(): value for name, value in self.headers.items()})
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        verified = verify_signature(SECRET, self.headers[ID_HEADER], self.headers[TIMESTAMP_HEADER], body,
                                    self.headers[SIGNATURE_HEADER])
        with self.server.lock:
            self.server.webhooks.append((verified, json.loads(body)))
        self.send_response(204)
        self.end_headers()


CATALOG = f"""\
metrics:
  - {{key: api_calls, aggregation: count, unit_cost: "0.001"}}
plans:
  - key: starter
    tier: starter
    fixed_fee: "10.00"
    charges:
      - {{metric: api_calls, model: per_unit, price: "0.01"}}
customers:
  - {{key: cus_1}}
subscriptions:
  - {{key: sub_1, customer: cus_1, plan: starter, period_anchor: "{ANCHOR}"}}
"""
GUARDS = """\
guards:
  - id: margin
    metric: overall
    min_margin: 60%
    actions:
      level_1: {threshold: 50%, notify: [ops]}
      level_2: {threshold: 30%, throttle_rate: 1req/min, burst: 2}
      level_3: {threshold: 0%}
"""


class UpFiles:
    """The files of `aforo up --config FILE` in `folder`: `catalog` and `guards`
    files, `routes` (flow mappings) to `upstream_port` (default: the backend's),
    meter events sent every `flush_interval_s`, and free ports for everything."""

    def __init__(self, folder, backend, catalog=CATALOG, guards=GUARDS,
                 routes=("{name: api, upstream: api, path_prefix: /v1, metric: api_calls}",), upstream_port=None,
                 flush_interval_s=3600):
        self.folder = folder
        self.settings = folder / "aforo.yaml"
        self.control_plane_port = free_port()
        self.proxy_port = free_port()
        self.admin_port = free_port(2)           # one admin port per worker
        (folder / "catalog.yaml").write_text(catalog)
        (folder / "guards.yaml").write_text(guards)
        route_lines = "".join(f"\n    - {route}" for route in routes)
        self.settings.write_text(textwrap.dedent(f"""\
            control_plane:
              listen: 127.0.0.1:{self.control_plane_port}
              database: aforo.db
              guards: guards.yaml
              notify:
                ops: {{url: "http://127.0.0.1:{backend.port}/webhooks", secret_env: AFORO_TEST_WEBHOOK_SECRET}}
            catalog: catalog.yaml
            proxy:
              listen: 127.0.0.1:{self.proxy_port}
              admin: 127.0.0.1:{self.admin_port}
              workers: 2
              upstreams:
                api: {{url: "http://127.0.0.1:{upstream_port or backend.port}"}}
              metering: {{spool_dir: meter-spool, flush_interval_s: {flush_interval_s}}}
              routes:""") + route_lines + "\n")
        self.environ = {**os.environ, "AFORO_TEST_WEBHOOK_SECRET": SECRET}

    def start(self):
        """`aforo up` on these files, started."""
        return Command(["up", "--config", str(self.settings)], self.folder, self.environ)


class Up(UpFiles):
    """`aforo up --config FILE` on UpFiles (the same arguments), running in its own
    process, ready once the admin token is printed and every worker answers."""

    def __init__(self, folder, backend, **files):
        super().__init__(folder, backend, **files)
        self.command = self.start()
        self.output = self.command.output
        self.admin_token = self.command.line_with("admin token (shown once, keep it): ").rsplit(" ", 1)[1]
        self.command.line_with("Ctrl-C stops everything")
        self._wait_ready()

    def _wait_ready(self):
        for port in (self.admin_port, self.admin_port + 1):
            eventually(lambda port=port: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200)

    def admin(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(f"http://127.0.0.1:{self.control_plane_port}{path}", data=data, method=method,
                                      headers={"Authorization": f"Bearer {self.admin_token}",
                                               "Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def through_proxy(self, key):
        return _get(f"http://127.0.0.1:{self.proxy_port}/v1/hello", key)

    def stop(self):
        return self.command.interrupt()


def _get(url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()
    except OSError as error:
        return None, {}, repr(error).encode()


def eventually(condition, timeout_s=WAIT_S):
    """Wait for something the test caused (a bound, never a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the condition never held")


def rfc3339_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()
