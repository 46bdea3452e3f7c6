# A control plane API running on 127.0.0.1 over a test's store, and a client for it.
import json

import aiohttp
from aiohttp import web

from control_plane.api import create_app
from control_plane.tokens import create_token

NOW = 1_800_000_000.0
# A guard on the pro tier's tokens, notifying `finance` at level 1.
TOKEN_GUARD = """\
guards:
  - id: tokens-floor
    metric: ai_tokens
    scope: {tier: pro}
    min_margin: 25%
    actions:
      level_1: {threshold: 30%, notify: [finance]}
      level_2: {threshold: 20%, throttle_rate: 5req/sec}
      level_3: {threshold: 10%}
"""


def token_guards(tmp_path):
    """TOKEN_GUARD written to `tmp_path`/guards.yaml, and watched there."""
    from config.guards import watch_guards

    guard_file = tmp_path / "guards.yaml"
    guard_file.write_text(TOKEN_GUARD)
    return watch_guards(guard_file)


class Api:
    """A running API on 127.0.0.1 and a client session with the admin token."""

    def __init__(self, store):
        self.store = store
        self.app_options = {}

    async def __aenter__(self):
        _, self.token = await create_token(self.store, "tests", NOW, author="test")
        self.runner = web.AppRunner(create_app(self.store, clock=lambda: NOW, **self.app_options))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"})
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.runner.cleanup()

    async def call(self, method, path, body=None, *, raw=None, content_type="application/json", headers=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        send = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(method, self.base + path, data=data, headers={**send, **(headers or {})}) \
                as response:
            text = await response.read()
            return response.status, response.headers.get("Content-Type", ""), json.loads(text) if text else None


def api_test(backend, scenario):
    async def run(open_store):
        store = await open_store()
        async with Api(store) as api:
            await scenario(api)
    backend.run(run)


async def catalog_for_cus_1(store, anchor=NOW - 100 * 86400):
    """A catalog under which cus_1's usage of api_calls (and its costs) are rated: a
    pro plan at 0.01 a call, subscribed since `anchor` (before any event of a test)."""
    import datetime

    await store.put_catalog("metric", "api_calls", {"aggregation": "count"}, author="test")
    await store.put_catalog("plan", "pro", {"tier": "pro", "charges": [
        {"metric": "api_calls", "model": "per_unit", "price": "0.01", "per_units": 1}]}, author="test")
    await store.put_catalog("customer", "cus_1", {}, author="test")
    await store.put_catalog("subscription", "sub_1", {
        "customer": "cus_1", "plan": "pro", "status": "active",
        "period_anchor": datetime.datetime.fromtimestamp(anchor, datetime.timezone.utc).isoformat()}, author="test")


async def example_api(store, guards):
    """An Api (to use with `async with`) over `store` with the example catalog applied
    and the watched guard file `guards` in force."""
    from pathlib import Path

    from config.catalog_file import load_catalog_file
    from control_plane.catalog import apply_catalog

    catalog = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
    await apply_catalog(store, load_catalog_file(catalog), "catalog.yaml", author="test")
    api = Api(store)
    api.app_options = {"guards": guards}
    return api
