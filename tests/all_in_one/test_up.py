# `aforo up` end to end, as a user runs it: one settings file, the command in its own
# process, real sockets everywhere. A customer's margin falls with cost events and it
# goes to level 1 (a signed webhook arrives), level 2 (throttle header, then 429
# beyond the rate), level 3 (429 with Retry-After to the period's end), then recovers
# when revenue grows. Ctrl-C stops it without losing a meter event.
import asyncio
import contextlib
import datetime
import json
import socket

import pytest
from running_up import ANCHOR, CATALOG, GUARDS, Backend, Up, UpFiles, eventually, rfc3339_now

from control_plane.periods import period_bounds
from control_plane.store import USAGE, open_store


def cost_to_reach(up, margin_pct, step):
    margin = up.admin("GET", "/v1/customers/cus_1/margin")
    nanos = margin["revenue_nanos"] * (100 - margin_pct) // 100 - margin["cogs_nanos"]
    up.admin("POST", "/v1/costs", [{"id": f"cost-{step}", "customer_id": "cus_1", "amount": f"{nanos / 1e9:.9f}",
                                    "timestamp": rfc3339_now()}])


@pytest.fixture
def backend():
    server = Backend()
    yield server
    server.shutdown()


@pytest.fixture
def up(tmp_path, backend):
    running = Up(tmp_path, backend)
    yield running
    running.stop()


def test_the_proxies_of_aforo_up_run_on_a_proxy_scoped_token(up, backend):
    key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
    eventually(lambda: up.through_proxy(key)[0] == 200)       # edge state reached the proxies with it
    live = [(token["name"], token["scope"]) for token in up.admin("GET", "/v1/tokens")["items"]
            if token["revoked_at"] is None]
    assert sorted(live) == [("first", "admin"), ("proxies of aforo up", "proxy")]


def test_a_customer_walks_the_guard_ladder_and_recovers(up, backend):
    key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
    eventually(lambda: up.through_proxy(key)[0] == 200)
    assert up.through_proxy(key)[1].get("X-Aforo-Throttle") is None

    # Level 1: a webhook, signed, once; requests untouched.
    cost_to_reach(up, 40, 1)
    eventually(lambda: backend.webhooks)
    verified, event = backend.webhooks[0]
    assert verified
    assert (event["customer_id"], event["metric"], event["level_from"], event["level_to"]) == ("cus_1", "overall", 0, 1)
    assert event["margin_pct"] == pytest.approx(40, abs=0.01)
    assert event["recommended_action"]
    assert up.through_proxy(key)[0] == 200

    # Level 2: the throttle header, then 429 beyond the guard's rate (burst 2).
    cost_to_reach(up, 20, 2)
    eventually(lambda: up.through_proxy(key)[1].get("X-Aforo-Throttle") == "true")
    answers = [up.through_proxy(key) for _ in range(4)]
    assert 429 in [status for status, _, _ in answers]
    throttled = next(answer for answer in answers if answer[0] == 429)
    assert json.loads(throttled[2])["reason"] == "throttled"

    # Level 3: blocked until the period ends, never forwarded.
    cost_to_reach(up, -10, 3)
    eventually(lambda: b"Margin Limit Exceeded" in up.through_proxy(key)[2])
    forwarded = backend.api_requests
    status, headers, _ = up.through_proxy(key)
    now = datetime.datetime.now(datetime.timezone.utc)
    _, period_end = period_bounds(datetime.datetime.fromisoformat(ANCHOR), "month", now)
    assert status == 429
    assert abs(int(headers["Retry-After"]) - (period_end - now).total_seconds()) <= 5
    assert backend.api_requests == forwarded

    # Revenue grows (usage billed from elsewhere): the margin recovers, so does the customer.
    up.admin("POST", "/v1/events", [{"id": "big-usage", "customer_id": "cus_1", "metric": "api_calls",
                                     "quantity": 100_000, "timestamp": rfc3339_now()}])
    eventually(lambda: up.through_proxy(key)[0] == 200)
    assert up.through_proxy(key)[1].get("X-Aforo-Throttle") is None
    levels = [(action["level_from"], action["level_to"]) for action in up.admin("GET", "/v1/actions")["items"]]
    assert levels == [(0, 1), (1, 2), (2, 3), (3, 0)]


HOURLY_THROTTLE = """\
guards:
  - id: margin
    metric: overall
    min_margin: 60%
    actions:
      level_2: {threshold: 30%, throttle_rate: 1req/hour, burst: 3}
"""


@contextlib.contextmanager
def up_with(tmp_path, backend, guards):
    """`aforo up` with the guard file `guards`, and an API key of cus_1 the proxy knows."""
    up = Up(tmp_path, backend, guards=guards)
    try:
        key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
        eventually(lambda: up.through_proxy(key)[0] == 200)
        yield up, key
    finally:
        up.stop()


def test_a_throttle_holds_for_the_customer_across_every_worker(tmp_path, backend):
    # Two workers, each on its own bucket, would admit the burst twice over; sharing
    # the customer's bucket (through the control plane), they admit it once.
    with up_with(tmp_path, backend, HOURLY_THROTTLE) as (up, key):
        cost_to_reach(up, 20, 1)
        answers = []

        def throttled():
            answers.append(up.through_proxy(key))        # a new connection each: both workers serve
            return answers[-1][0] == 429
        eventually(throttled)
        answers += [up.through_proxy(key) for _ in range(24)]
        admitted = [headers for status, headers, _ in answers if status == 200 and headers.get("X-Aforo-Throttle")]
        refused = [(headers, json.loads(body)) for status, headers, body in answers if status == 429]
        assert len(admitted) == 3                       # the burst, once, for the whole proxy
        assert {problem["reason"] for _, problem in refused} == {"throttled"}
        assert all(int(headers["Retry-After"]) >= 1 for headers, _ in refused)


SHADOW_BESIDE = GUARDS + """\
  - id: cus-1-stricter-trial
    metric: overall
    scope: {customer: cus_1}
    mode: shadow
    min_margin: 90%
    actions:
      level_2: {threshold: 85%, throttle_rate: 1req/hour, burst: 1}
      level_3: {threshold: 50%}
"""


def test_a_shadow_guard_is_judged_beside_the_enforcing_one_and_never_lifts_its_block(tmp_path, backend):
    with up_with(tmp_path, backend, SHADOW_BESIDE) as (up, key):
        # 20 %: the enforcing guard throttles, the customer's trial guard would block.
        cost_to_reach(up, 20, 1)
        eventually(lambda: up.through_proxy(key)[1].get("X-Aforo-Throttle") == "true")
        assert backend.api_headers[-1]["x-aforo-throttle"] == "true"
        assert backend.api_headers[-1]["x-aforo-guard"] == "margin"
        assert backend.api_headers[-1]["x-aforo-shadow"] == "margin_blocked; guard=cus-1-stricter-trial"
        # Below 0 %: the enforcing guard blocks, whatever the shadow guard says.
        cost_to_reach(up, -10, 2)
        eventually(lambda: b"Margin Limit Exceeded" in up.through_proxy(key)[2])
        forwarded = backend.api_requests
        assert up.through_proxy(key)[0] == 429
        assert backend.api_requests == forwarded
        trail = {(action["guard_id"], action["mode"], action["level_to"])
                 for action in up.admin("GET", "/v1/actions")["items"]}
        assert {("margin", "enforce", 2), ("margin", "enforce", 3), ("cus-1-stricter-trial", "shadow", 3)} <= trail


def test_relaxing_a_guard_unblocks_a_customer_at_once(up, backend):
    # Blocked below 0 %, then the guard file moves the block to -50 %: the customer is
    # judged again on the reload, with no new event, and served (throttled) again.
    key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
    eventually(lambda: up.through_proxy(key)[0] == 200)
    cost_to_reach(up, -10, 1)
    eventually(lambda: b"Margin Limit Exceeded" in up.through_proxy(key)[2])
    (up.folder / "guards.yaml").write_text(GUARDS.replace("level_3: {threshold: 0%}", "level_3: {threshold: -50%}"))
    answers = []
    eventually(lambda: answers.append(up.through_proxy(key)) or answers[-1][0] == 200)
    assert answers[-1][1].get("X-Aforo-Throttle") == "true"          # level 2 now
    levels = [(action["level_from"], action["level_to"]) for action in up.admin("GET", "/v1/actions")["items"]]
    assert levels[-1] == (3, 2)


def test_ctrl_c_stops_everything_and_keeps_every_meter_event(up, backend):
    key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
    eventually(lambda: up.through_proxy(key)[0] == 200)
    for _ in range(30):
        assert up.through_proxy(key)[0] == 200
    # Meter events flush hourly here: every one of them is still in the workers' memory.
    assert up.stop() == 0
    forwarded = backend.api_requests

    async def stored():
        store = await open_store(str(up.folder / "aforo.db"))
        try:
            return await store.events(USAGE, "cus_1")
        finally:
            await store.close()
    assert len(asyncio.run(stored())) == forwarded
    assert "control plane" in "\n".join(up.output)


def refused_start(files):
    # `aforo up` on files it must refuse: its exit status and output, once it has exited.
    command = files.start()
    return command.exit_status(), command.output


def test_aforo_up_checks_every_file_before_it_touches_the_store(tmp_path, backend):
    files = UpFiles(tmp_path, backend, guards=GUARDS.replace("notify: [ops]", "notify: [ops, pager]"),
                    catalog=CATALOG.replace("plan: starter", "plan: growth"))
    status, output = refused_start(files)
    assert status == 1
    assert output == [
        f"{tmp_path / 'guards.yaml'}:6: Notify channel `pager` is not defined in the control plane settings "
        f"{files.settings} (defined: `ops`); its webhooks would fail - at `$.guards[0].actions.level_1.notify[1]`",
        f"{tmp_path / 'catalog.yaml'}:12: Unknown plan `growth`; define it under `plans` "
        "- at `$.subscriptions[0].plan`",
    ]
    assert not (tmp_path / "aforo.db").exists()          # nothing migrated, applied, or a token made


def test_aforo_up_refuses_an_address_in_use_before_it_touches_the_store(tmp_path, backend):
    files = UpFiles(tmp_path, backend)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", files.proxy_port))
        taken.listen()
        status, output = refused_start(files)
    assert status == 2
    assert output == [f"aforo up: the proxy cannot listen on 127.0.0.1:{files.proxy_port}: Address already in use"]
    assert not (tmp_path / "aforo.db").exists()
