# A proxy worker for tests whose clients are synchronous SDKs or run their own event
# loop: it serves on an event loop in a thread of its own, with one customer (key
# `key`, plan features `features`), the given upstreams and routes, and meter events
# in an NDJSON file that metered() reads once the worker has stopped.
import asyncio
import hashlib
import json
import textwrap
import threading

from config.proxy_settings import load_proxy_settings
from proxy.server import ProxyWorker

TIMEOUT_S = 20


class ThreadedProxy:
    """`upstreams` and `routes`: settings lines (YAML flow mappings, one per line,
    under `upstreams:` and `routes:`); `api_key_header` as in the settings; `quotas`
    and `levels`: the plan's quotas and the customer's margin standings, as YAML flow
    mappings. `url` is where it listens; `loop` runs it (other servers may share it
    through run())."""

    def __init__(self, folder, upstreams, routes, *, key="k-test", features=(), api_key_header="authorization",
                 quotas="{}", levels="{}"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.folder = folder
        self.key = key
        self.upstreams, self.routes, self.features, self.api_key_header = upstreams, routes, features, api_key_header
        self.quotas, self.levels = quotas, levels
        self.meter_path = folder / "meter-events.ndjson"
        self.worker = None

    def start(self):
        """Write the settings and edge state, start the worker; returns self."""
        digest = hashlib.sha256(self.key.encode()).hexdigest()
        (self.folder / "edge_state.yaml").write_text(textwrap.dedent(f"""\
            period: {{start: "2026-01-01T00:00:00+00:00", end: "2099-01-01T00:00:00+00:00"}}
            plans:
              pro: {{tier: pro, features: [{", ".join(self.features)}], quotas: {self.quotas}}}
            customers:
              - {{id: cus_test, plan: pro, status: active, api_keys: [{digest}], levels: {self.levels}}}
            """))
        (self.folder / "proxy.yaml").write_text(textwrap.dedent(f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            api_key_header: {self.api_key_header}
            edge_state: {{file: edge_state.yaml, reload_interval_s: 3600}}
            metering: {{path: meter-events.ndjson, spool_dir: meter-spool, flush_interval_s: 3600}}
            """) + "upstreams:\n" + "".join(f"  {line}\n" for line in self.upstreams)
            + "routes:\n" + "".join(f"  - {line}\n" for line in self.routes))
        self.worker = ProxyWorker(load_proxy_settings(self.folder / "proxy.yaml"), loop=self.loop)
        self.run(self.worker.start())
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self.worker.port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT_S)

    def metered(self):
        """Stop the worker (delivering every meter event) and read what it metered."""
        self.run(self.worker.stop(1.0))
        return [json.loads(line) for line in self.meter_path.read_text().splitlines() if line.strip()]

    def close_worker(self):
        """Stop the worker unless it has stopped."""
        if self.worker is not None and not self.worker.stopped.is_set():
            self.run(self.worker.stop(1.0))

    def close(self):
        """Stop the worker and the loop."""
        self.close_worker()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
