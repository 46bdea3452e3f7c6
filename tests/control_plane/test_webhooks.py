# Level webhooks, on both stores and over real sockets: who is told of a transition
# and what they read, the signature a receiver checks, one webhook per channel however
# many evaluators race, retried with backoff until delivered or given up, and listed
# for operators. (The outbox itself is in the store contract.)
import asyncio
import hashlib
import hmac
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from config import parse_guards
from config.catalog_file import load_catalog_file
from config.control_plane_settings import NotifyChannel, WebhookSettings
from config.network import WebhookUrl
from control_plane.api import create_app
from control_plane.tokens import create_token
from control_plane.catalog import apply_catalog
from control_plane.guard_actions import evaluate_guards
from control_plane.ingest import ingest
from control_plane.store import COST, DELIVERED, FAILED, PENDING, Action, Webhook
from control_plane.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookMetrics,
    WebhookSender,
    level_change_webhooks,
    notified_channels,
    recommended_action,
    retry_delay_s,
    sign,
    verify_signature,
)

NOW = 1_800_000_000.0                  # 2027-01-15T08:00:00Z
SECRET = b"whsec_test_secret"
CATALOG = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
DEADLINE_S = 10.0

GUARDS = parse_guards("""\
guards:
  - id: tokens-floor
    metric: ai_tokens
    scope: {tier: pro}
    min_margin: 25%
    actions:
      level_1: {threshold: 30%, notify: [finance, engineering]}
      level_2: {threshold: 20%, throttle_rate: 5req/sec}
      level_3: {threshold: 10%, notify: [finance, on-call]}
  - id: free-trial
    metric: ai_tokens
    scope: {tier: free}
    min_margin: 40%
    mode: shadow
    actions:
      level_2: {threshold: 35%, throttle_rate: 1000req/hour, notify: [finance]}
      level_3: {threshold: 20%, action: lock_features, features: [large_models]}
  - id: quiet
    metric: api_calls
    min_margin: 10%
    actions:
      level_3: {threshold: 0%}
  - id: cheaper-models
    metric: overall
    min_margin: 30%
    actions:
      level_2: {threshold: 20%, throttle_rate: 50req/sec, downgrade_models: {gpt-4o: gpt-4o-mini, o3: o3-mini}}
""", "guards.yaml")
TOKENS_FLOOR, FREE_TRIAL, QUIET, CHEAPER_MODELS = GUARDS.guards


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


class Receiver:
    """A real HTTP server taking webhooks: answers `answers` in turn (then 200), keeps
    every request as (headers, body). `release` holds a `/slow` request until set."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.requests = []
        self.release = asyncio.Event()

    async def __aenter__(self):
        async def take(request):
            self.requests.append((request.headers.copy(), await request.read()))
            if request.path == "/slow":
                await self.release.wait()
            status = self.answers.pop(0) if self.answers else 200
            return web.Response(status=status, text="" if status < 300 else "try again later\n")
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", take)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.release.set()
        await self.runner.cleanup()

    async def wait_for(self, count):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while len(self.requests) < count:
            assert loop.time() < deadline, f"{len(self.requests)} webhooks received, expected {count}"
            await asyncio.sleep(0.01)


def channel(url, timeout_s=5.0):
    return NotifyChannel(url=WebhookUrl.parse(url), secret_env="UNUSED_HERE", timeout_s=timeout_s)


def action(level_from=0, level_to=1, guard=TOKENS_FLOOR, margin=27.5, at=NOW, customer="cus_globex"):
    return Action(customer, guard.metric, guard.id, level_from, level_to, margin, float(guard.min_margin),
                  guard.mode, at)


# -- signatures ---------------------------------------------------------------------

BODY = b'{"id":"whk_1","type":"margin.level_changed"}'
GOOD = "v1=" + hmac.new(SECRET, b"whk_1.1800000000." + BODY, hashlib.sha256).hexdigest()


def test_a_signature_is_hmac_sha256_over_id_timestamp_and_body():
    assert sign(SECRET, "whk_1", 1_800_000_000, BODY) == GOOD


@pytest.mark.parametrize(
    ("secret", "webhook_id", "timestamp", "body", "header", "valid"),
    [
        (SECRET, "whk_1", "1800000000", BODY, GOOD, True),
        (SECRET.decode(), "whk_1", 1_800_000_000, BODY, GOOD, True),              # secret as the env gives it
        (SECRET, "whk_1", "1800000000", BODY, f"v1=00ff, {GOOD}", True),           # during a secret rotation
        (SECRET, "whk_1", "1800000000", BODY + b" ", GOOD, False),                 # body changed
        (SECRET, "whk_2", "1800000000", BODY, GOOD, False),                        # id changed
        (SECRET, "whk_1", "1800000001", BODY, GOOD, False),                        # timestamp changed (replay)
        (b"another secret", "whk_1", "1800000000", BODY, GOOD, False),
        (SECRET, "whk_1", "1800000000", BODY, GOOD.replace("v1=", "v0="), False),
        (SECRET, "whk_1", "1800000000", BODY, GOOD.removeprefix("v1="), False),
        (SECRET, "whk_1", "1800000000", BODY, "", False),
    ],
    ids=["valid", "str-secret", "several", "body", "id", "timestamp", "secret", "version", "bare-hex", "empty"],
)
def test_verify_signature(secret, webhook_id, timestamp, body, header, valid):
    assert verify_signature(secret, webhook_id, timestamp, body, header) is valid


@pytest.mark.parametrize(("attempts", "delay_s"), [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0),
                                                     (10_000, 300.0)])
def test_the_backoff_doubles_from_the_initial_delay_up_to_the_cap(attempts, delay_s):
    assert retry_delay_s(attempts, WebhookSettings(initial_backoff_s=1, max_backoff_s=300)) == delay_s


# -- who is told, and what ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("guard", "level_from", "level_to", "channels"),
    [
        (TOKENS_FLOOR, 0, 1, ("finance", "engineering")),
        (TOKENS_FLOOR, 0, 2, ("finance", "engineering")),      # level 2 names no one: level 1's still hear
        (TOKENS_FLOOR, 1, 2, ("finance", "engineering")),
        (TOKENS_FLOOR, 2, 3, ("finance", "engineering", "on-call")),
        (TOKENS_FLOOR, 3, 0, ("finance", "engineering", "on-call")),   # the block ends: on-call hears
        (TOKENS_FLOOR, 1, 0, ("finance", "engineering")),
        (FREE_TRIAL, 0, 3, ("finance",)),
        (FREE_TRIAL, 2, 0, ("finance",)),
        (QUIET, 0, 3, ()),
    ],
)
def test_a_levels_channels_hear_of_every_transition_touching_it_or_a_worse_level(guard, level_from, level_to,
                                                                                  channels):
    assert notified_channels(guard, level_from, level_to) == channels


@pytest.mark.parametrize(
    ("guard", "level_from", "level_to", "sentence"),
    [
        (TOKENS_FLOOR, 0, 1, ("Review pricing and costs for this customer: the margin is below the warning "
                              "threshold (30%); requests proceed untouched.")),
        (TOKENS_FLOOR, 3, 1, ("The throttle or block is lifted. Review pricing and costs for this customer: the "
                              "margin is below the warning threshold (30%); requests proceed untouched.")),
        (TOKENS_FLOOR, 1, 2, ("Throttled to 5req/sec: responses carry `X-Aforo-Throttle: true`. Move the customer "
                              "to a cheaper path or review pricing and costs.")),
        (TOKENS_FLOOR, 2, 3, ("Blocked until the billing period ends (429 Margin Limit Exceeded). Review pricing "
                              "and costs before the next period.")),
        (TOKENS_FLOOR, 3, 0, ("Recovered: the margin is back above the guard's thresholds; nothing is enforced any "
                              "more.")),
        (FREE_TRIAL, 0, 3, ("Would lock features large_models until the billing period ends (shadow mode: nothing "
                            "is enforced); review pricing.")),
        (FREE_TRIAL, 0, 2, ("Would throttle to 1000req/hour (shadow mode: nothing is enforced); review pricing "
                            "and costs.")),
        (CHEAPER_MODELS, 0, 2, ("Throttled to 50req/sec, and LLM calls downgraded (gpt-4o to gpt-4o-mini, o3 to "
                                "o3-mini): responses carry `X-Aforo-Throttle: true` and `X-Aforo-Downgrade`. Review "
                                "pricing and costs.")),
    ],
)
def test_the_recommended_action_says_what_happens_and_what_to_do(guard, level_from, level_to, sentence):
    assert recommended_action(guard, level_from, level_to) == sentence


def test_a_transition_makes_one_webhook_per_channel_with_the_structured_payload():
    transition = action(1, 2, margin=None)
    webhooks = level_change_webhooks(transition, TOKENS_FLOOR)
    assert [webhook.channel for webhook in webhooks] == ["finance", "engineering"]
    assert len({webhook.id for webhook in webhooks}) == 2
    payload = json.loads(webhooks[0].body)
    assert payload == {
        "id": webhooks[0].id, "type": "margin.level_changed", "customer_id": "cus_globex", "metric": "ai_tokens",
        "guard": "tokens-floor", "level_from": 1, "level_to": 2, "margin_pct": None, "min_margin_pct": 25.0,
        "mode": "enforce", "recommended_action": recommended_action(TOKENS_FLOOR, 1, 2),
        "occurred_at": "2027-01-15T08:00:00Z"}
    assert webhooks[0].id.startswith("whk_")
    assert level_change_webhooks(action(0, 3, guard=QUIET), QUIET) == []


def cost(event_id, amount):
    return json.dumps({"id": event_id, "customer_id": "cus_globex", "amount": amount, "metric": "ai_tokens",
                       "timestamp": "2027-01-15T07:00:00Z"}).encode()


def test_two_concurrent_evaluations_enqueue_one_webhook_per_channel(backend):
    async def scenario(open_store):
        stores = [await open_store() for _ in range(2)]
        await apply_catalog(stores[0], load_catalog_file(CATALOG), "catalog.yaml", author="test")
        # ai_tokens earns 39.20 this period (80% of the 49.00 fee): a 35.00 cost leaves 10.7%, level 2.
        await ingest(stores[0], COST, [cost("c1", "35.00")], NOW)
        recorded = await asyncio.gather(*(evaluate_guards(store, GUARDS, NOW, {"cus_globex"}) for store in stores))
        assert sorted(len(actions) for actions in recorded) == [0, 1]
        [(action_seq, transition)] = await stores[0].actions("cus_globex")
        assert (transition.level_from, transition.level_to) == (0, 2)
        queued = await stores[1].webhooks()
        assert [(item.channel, item.action_seq) for item in queued] == [("finance", action_seq),
                                                                         ("engineering", action_seq)]
        payload = json.loads(queued[0].body)
        assert (payload["level_from"], payload["level_to"], payload["margin_pct"]) == (0, 2, 10.7143)
        # Evaluating again changes nothing and enqueues nothing.
        assert await evaluate_guards(stores[1], GUARDS, NOW, {"cus_globex"}) == []
        assert len(await stores[0].webhooks()) == 2
    backend.run(scenario)


# -- delivery ---------------------------------------------------------------------------

def sender_for(store, receiver_url, clock, retry, **channels):
    metrics = WebhookMetrics(CollectorRegistry())
    channels = channels or {"finance": channel(receiver_url + "/aforo")}
    return WebhookSender(store, channels, dict.fromkeys(channels, SECRET), retry, clock=clock, metrics=metrics)


def test_a_receiver_failing_twice_gets_the_same_signed_webhook_three_times_then_it_is_delivered(backend):
    async def scenario(open_store):
        store = await open_store()
        clock = Clock()
        async with Receiver(answers=[500, 500]) as receiver, aiohttp.ClientSession() as session:
            sender = sender_for(store, receiver.url, clock, WebhookSettings(initial_backoff_s=10, max_backoff_s=60))
            sent = level_change_webhooks(action(0, 1), TOKENS_FLOOR)[0]          # to finance
            await store.transition_level(action(0, 1), [sent])
            assert await sender.deliver_due(session) == 1           # 500
            assert await sender.deliver_due(session) == 0           # not due again yet
            clock.now += 10
            assert await sender.deliver_due(session) == 1           # 500
            clock.now += 19
            assert await sender.deliver_due(session) == 0
            clock.now += 1                                          # 20 s after the second failure
            assert await sender.deliver_due(session) == 1           # 200
            clock.now += 3600
            assert await sender.deliver_due(session) == 0           # delivered: never sent again
        assert len(receiver.requests) == 3
        for headers, body in receiver.requests:
            assert headers[ID_HEADER] == sent.id and body == sent.body
            assert headers["Content-Type"] == "application/json"
            assert verify_signature(SECRET, headers[ID_HEADER], headers[TIMESTAMP_HEADER], body,
                                    headers[SIGNATURE_HEADER])
        assert [int(headers[TIMESTAMP_HEADER]) for headers, _ in receiver.requests] == [NOW, NOW + 10, NOW + 30]
        [delivered] = await store.webhooks()
        assert (delivered.status, delivered.attempts, delivered.delivered_at) == (DELIVERED, 3, NOW + 30)
        assert delivered.last_error == "HTTP 500: try again later"
        attempts = sender.metrics.attempts
        assert attempts.labels(channel="finance", result="failed")._value.get() == 2
        assert attempts.labels(channel="finance", result="delivered")._value.get() == 1
    backend.run(scenario)


def test_a_receiver_that_always_fails_is_given_up_after_max_attempts_and_listed_failed(backend):
    async def scenario(open_store):
        store = await open_store()
        clock = Clock()
        async with Receiver(answers=[503] * 10) as receiver, aiohttp.ClientSession() as session:
            sender = sender_for(store, receiver.url, clock, WebhookSettings(max_attempts=3, initial_backoff_s=1))
            await store.transition_level(action(0, 1), level_change_webhooks(action(0, 1), TOKENS_FLOOR)[:1])
            while (due := await store.next_webhook_at()) is not None:
                clock.now = due
                await sender.deliver_due(session)
            assert len(receiver.requests) == 3
            assert sender.metrics.given_up.labels(channel="finance")._value.get() == 1
            _, token = await create_token(store, "tests", NOW, author="test")
            runner = web.AppRunner(create_app(store, clock))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            headers = {"Authorization": f"Bearer {token}"}
            try:
                async with session.get(base + "/v1/webhooks?status=failed", headers=headers) as response:
                    listed = await response.json()
                async with session.get(base + "/v1/webhooks?status=lost", headers=headers) as response:
                    assert response.status == 400
                async with session.get(base + "/v1/webhooks?status=pending", headers=headers) as response:
                    assert (await response.json())["items"] == []
            finally:
                await runner.cleanup()
        [failed] = listed["items"]
        assert (failed["status"], failed["attempts"], failed["channel"]) == (FAILED, 3, "finance")
        assert (failed["failed_at"], failed["next_attempt_at"]) == (NOW + 1 + 2, None)
        assert failed["last_error"] == "HTTP 503: try again later"
        assert failed["payload"]["type"] == "margin.level_changed" and failed["payload"]["id"] == failed["id"]
        assert listed["counts"] == {PENDING: 0, DELIVERED: 0, FAILED: 1}
    backend.run(scenario)


def test_timeouts_refused_connections_and_unknown_channels_are_failures_with_a_reason(backend):
    async def scenario(open_store):
        store = await open_store()
        clock = Clock()
        async with Receiver() as receiver, aiohttp.ClientSession() as session:
            closed = Receiver()
            await closed.__aenter__()
            closed_url = closed.url
            await closed.__aexit__()                                 # nothing listens there any more
            sender = sender_for(store, receiver.url, clock, WebhookSettings(max_attempts=1),
                                slow=channel(receiver.url + "/slow", timeout_s=0.2), closed=channel(closed_url))
            await store.transition_level(action(0, 1), [Webhook(webhook_id, name, b"{}") for webhook_id, name in (
                ("whk_slow", "slow"), ("whk_closed", "closed"), ("whk_nobody", "nobody"))])
            assert await sender.deliver_due(session) == 3
        errors = {item.id: (item.status, item.attempts, item.last_error) for item in await store.webhooks()}
        assert errors["whk_slow"] == (FAILED, 1, "no answer within 0.2 s")
        assert errors["whk_closed"][:2] == (FAILED, 1) and errors["whk_closed"][2].startswith("ClientConnectorError")
        assert errors["whk_nobody"] == (FAILED, 1, "no notify channel `nobody` in the control plane settings")
    backend.run(scenario)


def test_the_sender_delivers_as_soon_as_it_is_woken(backend):
    import time

    async def scenario(open_store):
        store = await open_store()
        async with Receiver() as receiver:
            sender = sender_for(store, receiver.url, time.time, WebhookSettings())
            sender.max_idle_s = 3600                    # only a wake-up or a due retry can start a pass
            running = asyncio.create_task(sender.run())
            try:
                for number in (1, 2):
                    transition = action(number - 1, number, at=time.time())
                    await store.transition_level(transition, level_change_webhooks(transition, TOKENS_FLOOR)[:1])
                    sender.wake()
                    await receiver.wait_for(number)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        assert [json.loads(body)["level_to"] for _, body in receiver.requests] == [1, 2]
    backend.run(scenario)
