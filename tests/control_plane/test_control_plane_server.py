# The control plane started from a settings file, end to end on both stores: costs
# posted to its API drive a customer below a guard's margin, and the channel the guard
# notifies receives the signed webhook; `aforo control-plane --config` serves the same
# way and refuses settings it cannot run with.
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from running_api import TOKEN_GUARD

from config.catalog_file import load_catalog_file
from config.control_plane_settings import (
    ControlPlaneSettings,
    DatabaseUrl,
    load_control_plane_settings,
)
from config.network import HostPort
from control_plane.catalog import apply_catalog
from control_plane.server import start_control_plane
from control_plane.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify_signature,
)

NOW = 1_800_000_000.0                  # 2027-01-15T08:00:00Z
CATALOG = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
SECRET = "s3cret-finance"
ENVIRON = {"AFORO_TEST_FINANCE_SECRET": SECRET}
DEADLINE_S = 10.0


SETTINGS = """\
listen: 127.0.0.1:0
database: '{database}'
guards: guards.yaml
notify:
  finance:
    url: {url}/hooks/aforo
    secret_env: AFORO_TEST_FINANCE_SECRET
    timeout_s: 5
webhooks: {{max_attempts: 3, initial_backoff_s: 0.05}}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    """The settings' `database`: a relative SQLite path, or a PostgreSQL URL whose
    search_path is a schema of the test's own."""
    if request.param == "sqlite":
        return "store/aforo.db"
    url, schema = request.getfixturevalue("postgres_schema")
    return f"{url}?search_path={schema}"


async def poll(read, done):
    """`await read()` until `done(value)`; fails after DEADLINE_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not done(value := await read()):
        assert loop.time() < deadline, f"still {value!r}"
        await asyncio.sleep(0.02)
    return value


def test_costs_posted_below_a_guards_margin_reach_the_notified_channel_signed(tmp_path, database):
    received = []

    async def take(request):
        received.append((request.headers.copy(), await request.read()))
        return web.Response(status=204)

    async def scenario():
        app = web.Application()
        app.router.add_post("/hooks/aforo", take)
        receiver = web.AppRunner(app, access_log=None)
        await receiver.setup()
        site = web.TCPSite(receiver, "127.0.0.1", 0)
        await site.start()
        receiver_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        (tmp_path / "guards.yaml").write_text(TOKEN_GUARD)
        (tmp_path / "control_plane.yaml").write_text(SETTINGS.format(database=database, url=receiver_url))
        settings = load_control_plane_settings(tmp_path / "control_plane.yaml", environ=ENVIRON)
        control_plane = await start_control_plane(settings, environ=ENVIRON, clock=lambda: NOW)
        try:
            await apply_catalog(control_plane.store, load_catalog_file(CATALOG), "catalog.yaml", author="test")
            headers = {"Authorization": f"Bearer {control_plane.admin_token}"}
            async with aiohttp.ClientSession(headers=headers) as session:
                # ai_tokens earns 39.20 this period (80% of globex's 49.00 fee): 35.00 of cost leaves 10.7%.
                costs = [{"id": "c1", "customer_id": "cus_globex", "amount": "35.00", "metric": "ai_tokens",
                          "timestamp": "2027-01-15T07:00:00Z", "provider": "openai"}]
                async with session.post(control_plane.url + "/v1/costs", json=costs) as response:
                    assert (await response.json())["accepted"] == 1

                async def outbox():
                    async with session.get(control_plane.url + "/v1/webhooks") as response:
                        return await response.json()
                listed = await poll(outbox, lambda body: [item["status"] for item in body["items"]] == ["delivered"])
                async with session.get(control_plane.url + "/metrics") as response:
                    exposition = await response.text()
        finally:
            await control_plane.stop()
            await receiver.cleanup()
        return listed, exposition

    listed, exposition = asyncio.run(scenario())
    [(headers, body)] = received
    assert verify_signature(SECRET, headers[ID_HEADER], headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert headers[TIMESTAMP_HEADER] == str(int(NOW))
    payload = json.loads(body)
    assert payload == {
        "id": headers[ID_HEADER], "type": "margin.level_changed", "customer_id": "cus_globex", "metric": "ai_tokens",
        "guard": "tokens-floor", "level_from": 0, "level_to": 2, "margin_pct": 10.7143, "min_margin_pct": 25.0,
        "mode": "enforce", "recommended_action": "Throttled to 5req/sec: responses carry `X-Aforo-Throttle: true`. "
        "Move the customer to a cheaper path or review pricing and costs.", "occurred_at": "2027-01-15T08:00:00Z"}
    [delivered] = listed["items"]
    assert (delivered["id"], delivered["attempts"], delivered["channel"]) == (headers[ID_HEADER], 1, "finance")
    assert delivered["payload"] == payload
    assert 'aforo_webhook_attempts_total{channel="finance",result="delivered"} 1.0' in exposition
    if not database.startswith("postgresql"):
        assert (tmp_path / "store" / "aforo.db").is_file()       # read from the settings file's directory


def test_a_start_that_cannot_listen_leaves_the_first_admin_token_for_the_next_start(tmp_path):
    async def scenario():
        database = DatabaseUrl(str(tmp_path / "aforo.db"))
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = ControlPlaneSettings(listen=HostPort("127.0.0.1", taken.getsockname()[1]), database=database)
            with pytest.raises(OSError):
                await start_control_plane(busy, environ={})
        control_plane = await start_control_plane(ControlPlaneSettings(listen=HostPort("127.0.0.1", 0),
                                                                       database=database), environ={})
        await control_plane.stop()
        return control_plane.admin_token
    assert asyncio.run(scenario()) is not None


def run_aforo(*args):
    return subprocess.run([sys.executable, "-m", "control_plane.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_aforo_control_plane_refuses_settings_with_an_unset_secret(tmp_path):
    settings = tmp_path / "control_plane.yaml"
    settings.write_text(SETTINGS.format(database="aforo.db", url="http://127.0.0.1:9"))
    result = run_aforo("control-plane", "--config", str(settings))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"{settings}:7: Environment variable `AFORO_TEST_FINANCE_SECRET` is not set; it holds the signing secret "
        "of notify channel `finance` - at `$.notify.finance.secret_env`")
    assert not (tmp_path / "aforo.db").exists()


def test_aforo_control_plane_refuses_an_unreadable_or_invalid_settings_file(tmp_path):
    result = run_aforo("control-plane", "--config", str(tmp_path / "missing.yaml"))
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2, f"aforo control-plane: cannot read {tmp_path / 'missing.yaml'}: No such file or directory")
    settings = tmp_path / "control_plane.yaml"
    settings.write_text("listen: 127.0.0.1:0\nwebhook: {max_attempts: 3}\n")
    result = run_aforo("control-plane", "--config", str(settings))
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        1, f"{settings}:2: Object contains unknown field `webhook`")


def test_a_redis_url_that_is_not_one_is_refused_before_anything_starts(tmp_path):
    result = run_aforo("control-plane", "--listen", "127.0.0.1:0", "--database", str(tmp_path / "aforo.db"),
                       "--redis-url", "localhost:6379")
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2, "aforo control-plane: --redis-url: expected a Redis URL such as `redis://127.0.0.1:6379/0`, "
           "got `localhost:6379`")
    assert not (tmp_path / "aforo.db").exists()


def test_aforo_control_plane_serves_from_a_settings_file_and_flags_override_it(tmp_path):
    (tmp_path / "conf").mkdir()
    settings = tmp_path / "conf" / "control_plane.yaml"
    (tmp_path / "conf" / "guards.yaml").write_text(TOKEN_GUARD)
    settings.write_text(SETTINGS.format(database="from-file.db", url="http://127.0.0.1:9"))
    command = [sys.executable, "-m", "control_plane.cli", "control-plane", "--config", str(settings),
               "--database", str(tmp_path / "from-flag.db")]
    env = {**os.environ, **ENVIRON}
    env.pop("AFORO_DATABASE_URL", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        token = re.search(r"admin token \(shown once, keep it\): (\S+)", process.stdout.readline()).group(1)
        url = re.search(r"API on (http://\S+) ", process.stdout.readline()).group(1)
        assert not url.endswith(":0")                              # the port the system picked
        for path, expected in (("/v1/webhooks", {"counts": {"pending": 0, "delivered": 0, "failed": 0},
                                                 "items": []}),
                               ("/v1/guards", None)):
            request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                body = json.loads(response.read())
            if expected is not None:
                assert body == expected
            else:
                assert [guard["id"] for guard in body["guards"]] == ["tokens-floor"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    assert (tmp_path / "from-flag.db").is_file() and not (tmp_path / "conf" / "from-file.db").exists()
