# A proxy fed by a running control plane, over real sockets: it serves the control
# plane's customers, follows their changes (new keys, guard levels, a canceled
# subscription), sends its meter events there exactly once, and keeps the usage it
# counted itself when its snapshot is rebuilt. Hard quotas, token quotas too, are
# leased so that workers together never admit more than the limit.
import concurrent.futures
import datetime
import json
import textwrap
import time
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from conftest import SOCKET_TIMEOUT_S, request, wait_until

from bench.llm_upstream import LlmUpstream
from config.guards import watch_guards
from config.proxy_settings import load_proxy_settings
from control_plane.api import create_app
from control_plane.periods import period_bounds
from control_plane.sqlite_store import SqliteStore
from control_plane.store import USAGE
from control_plane.tokens import PROXY, create_token
from proxy import quota_leases
from proxy.server import ProxyWorker

GUARDS = """\
guards:
  - id: floor
    metric: overall
    min_margin: 50%
    actions:
      level_2: {threshold: 20%, throttle_rate: 1req/min, burst: 1}
      level_3: {threshold: 0%}
"""


def answered(port, key, status, timeout_s=SOCKET_TIMEOUT_S):
    """Whether requests with `key` come to be answered `status` (asked again and
    again from this thread, within a bound: never a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request(port, "GET", "/echo", key=key)[0] == status:
            return True
        time.sleep(0.02)
    return False


def iso(epoch_s):
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat()


class ControlPlane:
    """A control plane API over an SQLite store in `folder`, on the tests' loop."""

    def __init__(self, loop_thread, folder):
        self.loop_thread = loop_thread
        self.folder = folder
        (folder / "guards.yaml").write_text(GUARDS)

    async def start(self):
        self.store = await SqliteStore.open(str(self.folder / "aforo.db"))
        await self.store.migrate()
        _, self.token = await create_token(self.store, "tests", time.time(), author="test")
        # What the proxies following this control plane use: the proxy scope is enough.
        _, self.proxy_token = await create_token(self.store, "proxies", time.time(), PROXY, author="test")
        self.runner = web.AppRunner(create_app(self.store, guards=watch_guards(self.folder / "guards.yaml")))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self):
        await self.runner.cleanup()
        await self.store.close()

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=10) as response:
            text = response.read()
            return json.loads(text) if text else None

    def catalog(self, quota=1000):
        now = time.time()
        self.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
        self.call("PUT", "/v1/plans/pro", {"tier": "pro", "quotas": {"api_calls": {"limit": quota}},
                                           "charges": [{"metric": "api_calls", "model": "per_unit",
                                                        "price": "0.01"}]})
        self.call("PUT", "/v1/customers/cus_a", {})
        self.call("PUT", "/v1/subscriptions/sub_a", {"customer": "cus_a", "plan": "pro",
                                                     "period_anchor": iso(now - 86400)})

    def new_key(self, customer="cus_a"):
        return self.call("POST", f"/v1/customers/{customer}/api-keys")["key"]


@pytest.fixture
def control_plane(loop_thread, tmp_path):
    plane = ControlPlane(loop_thread, tmp_path)
    loop_thread.run(plane.start())
    yield plane
    loop_thread.run(plane.stop())


EVERYTHING = "{name: everything, upstream: main, path_prefix: /, metric: api_calls, units: 1}"


def fed_settings(upstream_port, source, metering, routes=(EVERYTHING,), more=""):
    """Proxy settings taking edge state from `source` (a settings line), with
    `routes` (flow mappings) and `more` settings lines."""
    route_lines = "".join(f"\n  - {route}" for route in routes)
    return textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        upstreams:
          main: {{url: "http://127.0.0.1:{upstream_port}"}}
        {source}
        metering: {metering}
        """) + f"routes:{route_lines}\n{more}"


def following(control_plane_url):
    return f'control_plane: {{url: "{control_plane_url}", token_env: AFORO_TEST_CONTROL_PLANE_TOKEN}}'


@pytest.fixture
def bus_plane(loop_thread, tmp_path, private_redis):
    """A control plane (SQLite) on the Redis edge bus of a private Redis: it reads the
    meter stream and publishes the edge state there."""
    from config.control_plane_settings import ControlPlaneSettings, DatabaseUrl
    from config.network import HostPort
    from control_plane.server import start_control_plane

    settings = ControlPlaneSettings(listen=HostPort("127.0.0.1", 0), database=DatabaseUrl(str(tmp_path / "a.db")),
                                    redis_url=private_redis.url)
    running = loop_thread.run(start_control_plane(settings, environ={}))
    plane = ControlPlane(loop_thread, tmp_path)
    plane.url, plane.token, plane.store = running.url, running.admin_token, running.store
    plane.redis = private_redis
    yield plane
    loop_thread.run(running.stop())


def started_workers(loop_thread, tmp_path, settings_text):
    """A fixture's body: yields start(*args), which writes the settings
    `settings_text(index, *args)` returns (index: workers started before) and starts a
    worker with them; stops every worker still running afterwards."""
    workers = []

    def start(*args, **kwargs):
        (tmp_path / "proxy.yaml").write_text(settings_text(len(workers), *args, **kwargs))
        worker = ProxyWorker(load_proxy_settings(tmp_path / "proxy.yaml"), loop=loop_thread.loop)
        loop_thread.run(worker.start())
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if not worker.stopped.is_set():
            loop_thread.run(worker.stop(1.0), timeout=30)


@pytest.fixture
def bus_proxy(loop_thread, tmp_path, upstream, bus_plane):
    """Start a worker on `bus_plane`'s Redis bus (edge state, meter events, quota
    leases), with `routes` and `more` settings lines as fed_settings takes."""
    url = bus_plane.redis.url

    def settings_text(index, routes=(EVERYTHING,), more=""):
        return fed_settings(upstream.port, f'edge_state: {{redis_url: "{url}"}}',
                            f'{{spool_dir: meter-spool-{index}, redis_url: "{url}", batch_events: 10, '
                            'flush_interval_s: 3600}', routes, more)
    yield from started_workers(loop_thread, tmp_path, settings_text)


@pytest.fixture(params=["control plane", "redis bus"])
def leasing(request):
    """(control plane, start a worker): workers leasing hard quotas from the control
    plane's ledger, or from the Redis bus's."""
    if request.param == "control plane":
        return request.getfixturevalue("control_plane"), request.getfixturevalue("fed_proxy")
    return request.getfixturevalue("bus_plane"), request.getfixturevalue("bus_proxy")


@pytest.fixture
def fed_proxy(loop_thread, tmp_path, upstream, control_plane, monkeypatch):
    """Start a worker following `control_plane` over its API."""
    monkeypatch.setenv("AFORO_TEST_CONTROL_PLANE_TOKEN", control_plane.proxy_token)

    def settings_text(index, routes=(EVERYTHING,)):
        return fed_settings(upstream.port, following(control_plane.url),
                            f"{{spool_dir: meter-spool-{index}, batch_events: 10, flush_interval_s: 3600}}", routes)
    yield from started_workers(loop_thread, tmp_path, settings_text)


def test_the_proxy_serves_the_control_planes_customers_and_follows_their_changes(
        loop_thread, control_plane, fed_proxy):
    control_plane.catalog()
    key = control_plane.new_key()
    worker = fed_proxy()
    assert worker.ready() == (True, "ready")
    assert request(worker.port, "GET", "/echo", key=key)[0] == 200

    later_key = control_plane.new_key()
    wait_until(loop_thread, lambda: worker.edge_state.customer_for_key(later_key.encode()) is not None)
    assert request(worker.port, "GET", "/echo", key=later_key)[0] == 200

    # Costs far above revenue: the guard blocks until the period ends.
    control_plane.call("POST", "/v1/costs", [{"id": "c1", "customer_id": "cus_a", "amount": "50",
                                              "timestamp": iso(time.time())}])
    assert answered(worker.port, key, 429)
    status, headers, body = request(worker.port, "GET", "/echo", key=key)
    assert json.loads(body)["title"] == "Margin Limit Exceeded"
    anchor = datetime.datetime.fromisoformat(control_plane.call("GET", "/v1/subscriptions/sub_a")["period_anchor"])
    now = datetime.datetime.now(datetime.timezone.utc)
    _, period_end = period_bounds(anchor, "month", now)
    assert abs(int(headers["retry-after"]) - (period_end - now).total_seconds()) <= 5

    # A canceled subscription is a catalog change: the proxy pulls everything again.
    control_plane.call("PUT", "/v1/subscriptions/sub_a", {"customer": "cus_a", "plan": "pro", "status": "canceled",
                                                          "period_anchor": iso(time.time() - 86400)})
    assert answered(worker.port, key, 403)


def test_meter_events_reach_the_control_plane_once(loop_thread, control_plane, fed_proxy):
    control_plane.catalog()
    key = control_plane.new_key()
    worker = fed_proxy()
    for _ in range(25):
        assert request(worker.port, "GET", "/echo", key=key)[0] == 200
    loop_thread.run(worker.stop(1.0), timeout=30)           # a graceful stop delivers every event
    events = loop_thread.run(control_plane.store.events(USAGE, "cus_a"))
    assert len(events) == 25
    assert {json.loads(event.payload)["source"] for event in events} == {"proxy"}
    margin = control_plane.call("GET", "/v1/customers/cus_a/margin")
    assert margin["metrics"][0]["units"] == 25


def test_usage_counted_at_the_proxy_survives_a_new_snapshot(loop_thread, control_plane, fed_proxy):
    control_plane.catalog(quota=5)
    key = control_plane.new_key()
    worker = fed_proxy()
    assert [request(worker.port, "GET", "/echo", key=key)[0] for _ in range(3)] == [200] * 3
    # A new key changes the customer's keys: the proxy builds a new snapshot while its
    # 3 requests are not yet with the control plane (meter events flush hourly here).
    second = control_plane.new_key()
    wait_until(loop_thread, lambda: worker.edge_state.customer_for_key(second.encode()) is not None)
    statuses = [request(worker.port, "GET", "/echo", key=second)[0] for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_two_workers_never_admit_more_than_a_hard_quota_between_them(loop_thread, leasing):
    control_plane, start_worker = leasing
    control_plane.catalog(quota=40)
    key = control_plane.new_key()
    first, second = start_worker(), start_worker()
    for worker in (first, second):                      # on the bus, the key arrives as a change
        wait_until(loop_thread, lambda: worker.edge_state.customer_for_key(key.encode()) is not None)
    with concurrent.futures.ThreadPoolExecutor(16) as clients:
        statuses = list(clients.map(lambda n: request((first, second)[n % 2].port, "GET", "/echo", key=key)[0],
                                    range(100)))
    admitted = statuses.count(200)
    assert admitted <= 40
    assert set(statuses) <= {200, 429}
    # Units one worker leased and did not use go back, and the other can use them:
    # in the end exactly the quota is admitted, never more.
    for worker in (first, second):
        loop_thread.run(worker.leases.give_back())
    while True:
        status = request(first.port, "GET", "/echo", key=key)[0]
        if status != 200:
            break
        admitted += 1
    assert (admitted, status) == (40, 429)
    assert request(second.port, "GET", "/echo", key=key)[0] == 429


def remaining(headers):
    """Units left, as the RateLimit field tells the customer."""
    return int(headers["ratelimit"].split(";r=")[1].split(";")[0])


def test_ratelimit_tells_the_customer_what_it_has_left_not_what_a_worker_holds(loop_thread, leasing):
    # Two workers lease chunks of a twentieth of the quota; requests alternate between
    # them. Each answer says what the customer has left across both, within one chunk
    # (the units the other worker holds and has not used count as used until it
    # gives them back; its requests show at this worker's next lease).
    control_plane, start_worker = leasing
    control_plane.catalog(quota=100)
    chunk = 100 // quota_leases.CHUNK_SHARE
    key = control_plane.new_key()
    workers = start_worker(), start_worker()
    for worker in workers:
        wait_until(loop_thread, lambda worker=worker: worker.edge_state.customer_for_key(key.encode()) is not None)
    admitted = 0
    for number in range(120):
        status, headers, _ = request(workers[number % 2].port, "GET", "/echo", key=key)
        assert headers["ratelimit-policy"].startswith('"api_calls";q=100;w=')
        if status == 200:
            admitted += 1
            assert abs(remaining(headers) - (100 - admitted)) <= chunk
        else:
            assert status == 429 and remaining(headers) <= chunk
    for worker in workers:
        loop_thread.run(worker.leases.give_back())
    while (answer := request(workers[0].port, "GET", "/echo", key=key))[0] == 200:
        admitted += 1
    assert admitted == 100
    time.sleep(quota_leases.DENIED_RETRY_S)          # each asks the ledger again: all is used
    for worker in workers:
        status, headers, _ = request(worker.port, "GET", "/echo", key=key)
        assert (status, remaining(headers)) == (429, 0)


def test_usage_from_elsewhere_counts_against_the_hard_quota_the_workers_lease(loop_thread, leasing):
    # A hard quota of 50: 30 units billed through the API before any worker leases,
    # 10 more while they serve. The proxies admit exactly the 10 left.
    control_plane, start_worker = leasing
    control_plane.catalog(quota=50)
    key = control_plane.new_key()

    def bill_elsewhere(event_id, units):
        control_plane.call("POST", "/v1/events", [{"id": event_id, "customer_id": "cus_a", "metric": "api_calls",
                                                    "quantity": units, "timestamp": iso(time.time())}])
    bill_elsewhere("batch-job-1", 30)
    workers = start_worker(), start_worker()
    for worker in workers:
        wait_until(loop_thread, lambda worker=worker: worker.edge_state.customer_for_key(key.encode()) is not None)
    admitted = sum(request(workers[n % 2].port, "GET", "/echo", key=key)[0] == 200 for n in range(4))
    bill_elsewhere("batch-job-2", 10)
    for _ in range(3):                                  # what the workers hold goes back, and is asked for again
        admitted += sum(request(workers[n % 2].port, "GET", "/echo", key=key)[0] == 200 for n in range(20))
        for worker in workers:
            loop_thread.run(worker.leases.give_back())
        time.sleep(quota_leases.DENIED_RETRY_S)
    assert admitted == 50 - 30 - 10


def llm_upstream_with_token_quota(loop_thread, control_plane, monkeypatch, output_tokens):
    """A running LLM upstream, and the pro plan with a hard quota of `output_tokens`
    ai_output_tokens (and 1,000 calls) for the proxies following `control_plane`."""
    llm = LlmUpstream(keep_exchanges=False)
    loop_thread.run(llm.start())
    monkeypatch.setenv("AFORO_TEST_CONTROL_PLANE_TOKEN", control_plane.proxy_token)
    control_plane.catalog()
    control_plane.call("PUT", "/v1/metrics/ai_output_tokens", {"aggregation": "sum"})
    control_plane.call("PUT", "/v1/plans/pro", {
        "tier": "pro", "quotas": {"api_calls": {"limit": 1000}, "ai_output_tokens": {"limit": output_tokens}},
        "charges": [{"metric": "api_calls", "model": "per_unit", "price": "0.01"}]})
    return llm


def llm_workers(loop_thread, tmp_path, control_plane, llm, batch_events):
    """started_workers() for workers following `control_plane` with one OpenAI chat
    route to `llm`, sending meter events in batches of `batch_events`."""
    def settings_text(index):
        return fed_settings(llm.port, following(control_plane.url),
                            f"{{spool_dir: meter-spool-{index}, batch_events: {batch_events}, flush_interval_s: 3600}}",
                            ("{name: chat, upstream: main, path_prefix: /v1/chat/completions, "
                             "ai: {format: openai_chat}}",))
    return started_workers(loop_thread, tmp_path, settings_text)


def test_two_workers_lease_token_quotas_and_settle_them_to_the_tokens_used(loop_thread, tmp_path, control_plane,
                                                                            monkeypatch):
    # Each call reserves its max_tokens (30) of ai_output_tokens and uses 17: with a
    # quota of 100, exactly 5 calls fit (85 used; a 6th would need 115), whichever
    # worker serves them.
    llm = llm_upstream_with_token_quota(loop_thread, control_plane, monkeypatch, 100)
    key = control_plane.new_key()

    workers = llm_workers(loop_thread, tmp_path, control_plane, llm, batch_events=10)
    start_worker = next(workers)
    try:
        first, second = start_worker(), start_worker()
        body = json.dumps({"model": "gpt-4o", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]})

        def call(worker):
            return request(worker.port, "POST", "/v1/chat/completions", key=key, body=body.encode(),
                           headers={"Content-Type": "application/json"})[0]
        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            statuses = list(clients.map(lambda n: call((first, second)[n % 2]), range(12)))
        admitted = statuses.count(200)
        assert admitted <= 5 and set(statuses) <= {200, 429}
        for worker in (first, second):
            loop_thread.run(worker.leases.give_back())
        time.sleep(quota_leases.DENIED_RETRY_S)      # a worker told "nothing left" asks again after this
        while (status := call(first)) == 200:
            admitted += 1
        assert (admitted, status, call(second)) == (5, 429, 429)
    finally:
        next(workers, None)
        loop_thread.run(llm.stop())


def test_an_implausible_token_count_never_stalls_the_meter(loop_thread, tmp_path, control_plane, monkeypatch):
    # One answer reports 10^19 output tokens (more than any event may carry): that
    # count is not metered (the call is, flagged), and every call after it reaches the
    # control plane. Once, such an answer failed the worker's meter batch forever.
    llm = llm_upstream_with_token_quota(loop_thread, control_plane, monkeypatch, 10**6)
    key = control_plane.new_key()

    workers = llm_workers(loop_thread, tmp_path, control_plane, llm, batch_events=2)
    try:
        worker = next(workers)()
        body = json.dumps({"model": "gpt-4o", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]})

        def call():
            return request(worker.port, "POST", "/v1/chat/completions", key=key, body=body.encode(),
                           headers={"Content-Type": "application/json"})[0]
        llm.script.output_tokens = 10**19
        assert call() == 200
        llm.script.output_tokens = 17
        assert [call() for _ in range(4)] == [200] * 4
        loop_thread.run(worker.stop(1.0), timeout=30)          # a graceful stop delivers every event
        events = [json.loads(event.payload) for event in loop_thread.run(control_plane.store.events(USAGE, "cus_a"))]
        calls = [event for event in events if event["metric"] == "api_calls"]
        assert len(calls) == 5
        assert "implausible_count" in calls[0]["dimensions"]["usage_flags"]
        assert [event["quantity"] for event in events if event["metric"] == "ai_output_tokens"] == [17] * 4
        assert worker.sink.rejected == 0
    finally:
        next(workers, None)
        loop_thread.run(llm.stop())


def test_a_worker_that_cannot_reach_the_ledger_admits_one_chunk_from_its_last_state(loop_thread, control_plane,
                                                                                     fed_proxy):
    control_plane.catalog(quota=100)                        # leases come five units at a time
    key = control_plane.new_key()
    worker = fed_proxy(routes=(
        "{name: closed, upstream: main, path_prefix: /echo/closed, when_quota_unknown: closed}", EVERYTHING))
    ledger = worker.leases.ledger.client
    reachable, ledger.url = ledger.url, "http://127.0.0.1:9"     # the ledger cannot be asked
    # A route that prefers a refusal gets one at once; the others are admitted one
    # chunk from the last state, then refused too, until the ledger answers.
    status, headers, body = request(worker.port, "GET", "/echo/closed", key=key)
    assert (status, headers["retry-after"], json.loads(body)["reason"]) == (503, "1", "quota_unavailable")
    statuses = [request(worker.port, "GET", "/echo", key=key)[0] for _ in range(7)]
    assert statuses == [200] * 5 + [503] * 2
    assert request(worker.port, "GET", "/echo/closed", key=key)[0] == 503
    assert worker.leases.unledgered_total == 5

    # Once the ledger answers again, the units admitted meanwhile are added to it: the
    # two workers together admit exactly the quota.
    ledger.url = reachable
    admitted = 5
    while request(worker.port, "GET", "/echo", key=key)[0] == 200:
        admitted += 1
    assert admitted == 100
    assert request(fed_proxy().port, "GET", "/echo", key=key)[0] == 429


def test_units_the_ledger_cannot_take_back_stay_with_the_worker(loop_thread, control_plane, fed_proxy):
    control_plane.catalog(quota=40)                         # leases come two units at a time
    key = control_plane.new_key()
    worker = fed_proxy()
    assert request(worker.port, "GET", "/echo", key=key)[0] == 200

    def usable_here():
        # A leased quota's counter is `limit - units this worker holds`.
        return 40 - loop_thread.call(lambda: worker.edge_state.customer_for_key(key.encode()).quota_used("api_calls"))
    assert usable_here() == 1
    worker.leases.ledger.client.url = "http://127.0.0.1:9"   # the ledger cannot be asked
    loop_thread.run(worker.leases.give_back(idle_for_s=1e-9))
    assert usable_here() == 1                               # not dropped: given back at a later sweep
    assert request(worker.port, "GET", "/echo", key=key)[0] == 200


def test_a_proxy_can_run_apart_on_the_redis_edge_bus(loop_thread, tmp_path, upstream, redis_url):
    # Production mode: the proxy follows the edge state the control plane publishes on
    # Redis and sends its meter events to the stream the control plane reads.
    import redis as redis_client

    from config.bus import EDGE_CHANGES, EDGE_STATE, EDGE_VERSION, METER_STREAM
    from config.control_plane_settings import ControlPlaneSettings, DatabaseUrl
    from config.network import HostPort
    from control_plane.server import start_control_plane

    redis_client.Redis.from_url(redis_url).delete(METER_STREAM, EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
    settings = ControlPlaneSettings(listen=HostPort("127.0.0.1", 0), database=DatabaseUrl(str(tmp_path / "a.db")),
                                    redis_url=redis_url)
    running = loop_thread.run(start_control_plane(settings, environ={}))
    plane = ControlPlane(loop_thread, tmp_path)
    plane.url, plane.token = running.url, running.admin_token
    try:
        plane.catalog()
        (tmp_path / "proxy.yaml").write_text(fed_settings(
            upstream.port, f'edge_state: {{redis_url: "{redis_url}"}}',
            f'{{spool_dir: meter-spool, redis_url: "{redis_url}", flush_interval_s: 3600}}'))
        worker = ProxyWorker(load_proxy_settings(tmp_path / "proxy.yaml"), loop=loop_thread.loop)
        loop_thread.run(worker.start())
        key = plane.new_key()                               # published on the bus as a change
        assert answered(worker.port, key, 200)
        for _ in range(11):
            assert request(worker.port, "GET", "/echo", key=key)[0] == 200
        loop_thread.run(worker.stop(1.0), timeout=30)    # its events go to the stream as it stops
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while len(loop_thread.run(running.store.events(USAGE, "cus_a"))) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        events = loop_thread.run(running.store.events(USAGE, "cus_a"))
        assert len(events) == 12
        assert {json.loads(event.payload)["source"] for event in events} == {"proxy"}
    finally:
        loop_thread.run(running.stop())


def admin(worker, path):
    """(status, body text) of the worker's admin endpoint at `path`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.admin_port}{path}", timeout=SOCKET_TIMEOUT_S) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def eventually(condition, timeout_s=30):
    """Whether `condition()` comes true within a bound (asked again and again): a
    bound on waiting for what the test caused, never a timed assertion."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_without_redis_a_proxy_decides_from_its_last_state_then_fails_each_route_as_configured(
        loop_thread, bus_plane, bus_proxy):
    bus_plane.catalog()
    key = bus_plane.new_key()
    worker = bus_proxy(routes=(
        "{name: closed, upstream: main, path_prefix: /echo/closed, when_stale: closed}",
        "{name: open, upstream: main, path_prefix: /, when_stale: open}"),
        more="degraded: {staleness_budget_s: 1, retry_after_s: 7}\nredis: {timeout_s: 0.2, breaker_open_s: 0.5}\n")
    assert answered(worker.port, key, 200)
    forwarded = 1
    assert request(worker.port, "GET", "/echo/closed", key=key)[0] == 200
    forwarded += 1

    bus_plane.redis.stop(keep_data=False)
    # Within the staleness budget nothing changes for clients: the last state decides.
    assert request(worker.port, "GET", "/echo/closed", key=key)[0] == 200
    assert request(worker.port, "GET", "/echo", key=key)[0] == 200
    forwarded += 2
    # Beyond it, /readyz and /metrics say so, the closed route answers 503, the open one
    # goes on deciding from the last state.
    assert eventually(lambda: "degraded" in admin(worker, "/readyz")[1])
    assert admin(worker, "/readyz")[0] == 200
    assert "aforo_degraded 1.0" in admin(worker, "/metrics")[1]
    status, headers, body = request(worker.port, "GET", "/echo/closed", key=key)
    assert (status, headers["retry-after"], json.loads(body)["reason"]) == (503, "7", "state_stale")
    for _ in range(20):
        assert request(worker.port, "GET", "/echo", key=key)[0] == 200
        forwarded += 1
    assert worker.meter.spooled_events + worker.meter.depth >= 20     # kept while the bus is away

    # Redis comes back empty (it lost everything): the control plane publishes the state
    # again, the proxy follows it and is fresh, and every meter event is stored once.
    bus_plane.redis.start()
    assert eventually(lambda: request(worker.port, "GET", "/echo/closed", key=key)[0] == 200)
    forwarded += 1
    assert "degraded" not in admin(worker, "/readyz")[1]
    loop_thread.run(worker.stop(1.0), timeout=30)
    assert eventually(lambda: len(loop_thread.run(bus_plane.store.events(USAGE, "cus_a"))) >= forwarded)
    events = loop_thread.run(bus_plane.store.events(USAGE, "cus_a"))
    assert len(events) == forwarded
    assert len({event.event_id for event in events}) == forwarded


def test_a_replacement_worker_starts_from_the_kept_state_while_the_control_plane_is_down(
        loop_thread, tmp_path, control_plane, fed_proxy):
    control_plane.catalog()
    key = control_plane.new_key()
    worker = fed_proxy()
    later_key = control_plane.new_key()            # a change after the whole state: kept too
    wait_until(loop_thread, lambda: worker.edge_state.customer_for_key(later_key.encode()) is not None)
    loop_thread.run(worker.stop(1.0), timeout=30)
    loop_thread.run(control_plane.runner.cleanup())    # the control plane is gone

    # The worker's replacement (same settings, same spool) starts at once from what was kept.
    replacement = ProxyWorker(load_proxy_settings(tmp_path / "proxy.yaml"), loop=loop_thread.loop)
    loop_thread.run(replacement.start())
    try:
        assert replacement.ready()[0]
        assert request(replacement.port, "GET", "/echo", key=key)[0] == 200
        assert request(replacement.port, "GET", "/echo", key=later_key)[0] == 200
        assert request(replacement.port, "GET", "/echo", key="ak_live_unknown")[0] == 401
    finally:
        loop_thread.run(replacement.stop(1.0), timeout=30)


def test_without_a_kept_state_a_worker_still_waits_for_its_control_plane(loop_thread, tmp_path, upstream,
                                                                         monkeypatch):
    from proxy.followed_edge_state import EdgeStateUnavailable

    monkeypatch.setenv("AFORO_TEST_CONTROL_PLANE_TOKEN", "aforo_proxy_nothing")
    (tmp_path / "proxy.yaml").write_text(fed_settings(
        upstream.port, 'control_plane: {url: "http://127.0.0.1:9", token_env: AFORO_TEST_CONTROL_PLANE_TOKEN, '
                       'start_timeout_s: 0.5}', "{spool_dir: meter-spool}"))
    worker = ProxyWorker(load_proxy_settings(tmp_path / "proxy.yaml"), loop=loop_thread.loop)
    with pytest.raises(EdgeStateUnavailable):
        loop_thread.run(worker.start())
