# `aforo up --demo`: the whole product on this machine with a demo API behind the
# proxy, and a short script that walks one customer down the guard ladder: allowed,
# warned (a signed webhook arrives), throttled, blocked. The demo's files are copied
# to ./aforo-demo (its store starts empty at every run) and it keeps running after
# the script, for you to try with curl.
from __future__ import annotations

import decimal
import json
import os
import secrets
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import config
from config.up_settings import UpSettings

DEMO_FILES = Path(config.__file__).parent / "examples" / "demo"
DEMO_FOLDER = "aforo-demo"
WEBHOOK_SECRET_ENV = "AFORO_DEMO_WEBHOOK_SECRET"
UPSTREAM = ("127.0.0.1", 8001)
CUSTOMER = "cus_demo"
STEP_TIMEOUT_S = 15.0
NANOS = 10**9


def prepare(folder: str | os.PathLike = DEMO_FOLDER) -> Path:
    """Copy the demo's files into `folder` (its old store removed: every run starts
    from an empty one), set the webhook secret, and return the settings file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob("aforo.db*"):
        leftover.unlink()
    for source in DEMO_FILES.glob("*.yaml"):
        shutil.copyfile(source, folder / source.name)
    os.environ.setdefault(WEBHOOK_SECRET_ENV, secrets.token_urlsafe(24))
    return folder / "aforo.yaml"


# -- the demo API (its own process) ------------------------------------------------------

def serve_upstream(host: str = UPSTREAM[0], port: int = UPSTREAM[1]) -> None:
    """The API behind the proxy: answers every /v1 request with a small JSON body,
    and receives the guard's webhooks at /webhooks, checks their signature and says
    what they report."""
    import asyncio

    from aiohttp import web

    from control_plane.webhooks import (
        ID_HEADER,
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        verify_signature,
    )

    secret = os.environ[WEBHOOK_SECRET_ENV]

    async def api(request):
        return web.json_response({"message": "hello from the demo API", "path": request.path})

    async def webhook(request):
        body = await request.read()
        headers = request.headers
        verified = verify_signature(secret, headers.get(ID_HEADER, ""), headers.get(TIMESTAMP_HEADER, ""), body,
                                    headers.get(SIGNATURE_HEADER, ""))
        if not verified:
            print("demo API: a webhook with a bad signature was refused", flush=True)
            return web.Response(status=401)
        event = json.loads(body)
        print(f"demo API: webhook (signature verified): {event['customer_id']} {event['metric']} level "
              f"{event['level_from']} -> {event['level_to']} at margin {event['margin_pct']}%: "
              f"{event['recommended_action']}", flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", api)
    app.router.add_post("/webhooks", webhook)
    asyncio.run(_serve(app, host, port))


async def _serve(app, host, port):
    import asyncio
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- the walk down the ladder -------------------------------------------------------------

class _Demo:
    def __init__(self, settings: UpSettings, admin_token: str) -> None:
        self.control_plane = settings.control_plane_url
        self.proxy = f"http://{settings.proxy.listen}"
        self.admin_token = admin_token
        self.key = None

    def admin(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(self.control_plane + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def through_proxy(self):
        call = urllib.request.Request(self.proxy + "/v1/hello", headers={"Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(call, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def margin(self):
        return self.admin("GET", f"/v1/customers/{CUSTOMER}/margin")

    def units(self):
        return sum(metric["units"] for metric in self.margin()["metrics"])

    def cost_to_reach(self, margin_pct, step):
        # A cost event that brings the customer's margin this period to `margin_pct`.
        margin = self.margin()
        target_cogs = margin["revenue_nanos"] * (100 - margin_pct) // 100
        amount = decimal.Decimal(target_cogs - margin["cogs_nanos"]) / NANOS
        self.admin("POST", "/v1/costs", [{"id": f"demo-cost-{step}-{time.time_ns()}", "customer_id": CUSTOMER,
                                          "amount": str(amount.quantize(decimal.Decimal("0.000000001"))),
                                          "timestamp": _now_rfc3339(), "provider": "demo GPU cloud"}])
        return amount

    def until(self, condition):
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            answer = self.through_proxy()
            if condition(answer):
                return answer
            time.sleep(0.1)
        raise TimeoutError("the demo did not see the expected answer in time")


def drive(settings: UpSettings, admin_token: str | None, say=print) -> None:
    """Walk the demo customer from allowed to throttled to blocked, saying what
    happens at each step."""
    if admin_token is None:
        say("demo: the store already has admin tokens; use one of yours to follow along")
        return
    demo = _Demo(settings, admin_token)
    try:
        demo.key = demo.admin("POST", f"/v1/customers/{CUSTOMER}/api-keys")["key"]
        say(f"demo: API key for {CUSTOMER}: {demo.key}")
        demo.until(lambda answer: answer[0] == 200)          # the proxy has the new key
        statuses = [demo.through_proxy()[0] for _ in range(5)]
        say(f"demo: 5 more requests through the proxy -> {statuses} (allowed)")
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while demo.units() < 6 and time.monotonic() < deadline:      # metered and rated
            time.sleep(0.1)
        margin = demo.margin()
        say(f"demo: revenue ${decimal.Decimal(margin['revenue_nanos']) / NANOS} (fixed fee + usage), COGS "
            f"${decimal.Decimal(margin['cogs_nanos']) / NANOS}: margin {margin['margin_pct']}%")

        amount = demo.cost_to_reach(40, 1)
        say(f"demo: a ${amount} GPU bill arrives (POST /v1/costs): margin 40% -> level 1, warn")
        status, _, _ = demo.through_proxy()
        say(f"demo: requests are untouched at level 1 -> {status}; the webhook is above or just below")

        amount = demo.cost_to_reach(20, 2)
        say(f"demo: another ${amount}: margin 20% -> level 2, throttle to 2 requests/s")
        demo.until(lambda answer: answer[1].get("X-Aforo-Throttle") == "true")
        burst = [demo.through_proxy() for _ in range(6)]
        shown = [f"{status}{' throttled' if headers.get('X-Aforo-Throttle') else ''}"
                 for status, headers, _ in burst]
        say(f"demo: 6 requests at once -> {shown} (X-Aforo-Throttle: true, then 429 beyond the rate)")

        amount = demo.cost_to_reach(-20, 3)
        say(f"demo: another ${amount}: margin -20% -> level 3, block")
        status, headers, body = demo.until(lambda answer: b"Margin Limit Exceeded" in answer[2])
        say(f"demo: -> {status} {json.loads(body)['title']}, Retry-After {headers['Retry-After']} s "
            "(the start of the next billing period); blocked requests never reach the API")
        say(f"demo: try it: curl -i -H 'Authorization: Bearer {demo.key}' {demo.proxy}/v1/hello")
        say(f"demo: the margin: curl -H 'Authorization: Bearer {admin_token}' "
            f"{demo.control_plane}/v1/customers/{CUSTOMER}/margin")
    except (OSError, TimeoutError, KeyError, ValueError) as error:
        say(f"demo: stopped early: {error!r}")


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
