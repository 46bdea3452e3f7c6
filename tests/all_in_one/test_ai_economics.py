# AI economics end to end with `aforo up` (two proxy workers, the control plane, its
# store), LLM calls from a client over real sockets to the local LLM upstream: each
# call's tokens are priced per model as they arrive, so the margin moves with every
# call; a guard whose level 2 downgrades gpt-4o to gpt-4o-mini takes the customer
# there and the calls that follow are served by the cheaper model; a hard quota on
# output tokens admits calls only while their max_tokens fit what is left.
import asyncio
import json
import textwrap
import threading
import urllib.error
import urllib.request

import pytest
from running_up import ANCHOR, Backend, Up, eventually

from bench.llm_upstream import LlmUpstream, Script

SCRIPT = Script()          # each answer: 42 input, 8 cached, 17 output and 6 reasoning tokens
# USD per million tokens: gpt-4o is priced so that one call costs 0.092 of its 0.10.
PRICES = {"gpt-4o": {"input": 1000, "cached_input": 500, "output": 2000, "reasoning": 2000},
          "gpt-4o-mini": {"input": 1, "cached_input": 0.5, "output": 2, "reasoning": 2}}


def catalog(quotas="{}"):
    prices = "".join(f"\n  - {{key: {model}, " + ", ".join(f'{kind}: "{price}"' for kind, price in kinds.items())
                     + "}" for model, kinds in PRICES.items())
    return textwrap.dedent(f"""\
        metrics:
          - {{key: api_calls, aggregation: count}}
          - {{key: ai_input_tokens, priced_by: input_tokens}}
          - {{key: ai_cached_tokens, priced_by: cached_input_tokens}}
          - {{key: ai_cache_write_tokens, priced_by: cache_write_tokens}}
          - {{key: ai_output_tokens, priced_by: output_tokens}}
          - {{key: ai_reasoning_tokens, priced_by: reasoning_tokens}}
        plans:
          - key: starter
            tier: starter
            quotas: {quotas}
            charges:
              - {{metric: api_calls, model: per_unit, price: "0.10"}}
        customers:
          - {{key: cus_1}}
        subscriptions:
          - {{key: sub_1, customer: cus_1, plan: starter, period_anchor: "{ANCHOR}"}}
        """) + "model_prices:" + prices + "\n"


GUARDS = """\
guards:
  - id: model-costs
    metric: overall
    min_margin: 50%
    actions:
      level_2: {threshold: 30%, throttle_rate: 100req/sec, downgrade_models: {gpt-4o: gpt-4o-mini}}
"""
ROUTES = ("{name: chat, upstream: api, path_prefix: /v1/chat/completions, ai: {format: openai_chat}}",)


def call_cost_nanos(model):
    """What one call of the upstream's answer costs to serve with `model`, in nanos."""
    kinds = {"input": SCRIPT.input_tokens, "cached_input": SCRIPT.cached_tokens, "output": SCRIPT.output_tokens,
             "reasoning": SCRIPT.reasoning_tokens}
    return sum(int(tokens * PRICES[model][kind] * 1e9) // 1_000_000 for kind, tokens in kinds.items())


class ThreadedUpstream:
    """The LLM upstream on an event loop in a thread of its own."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = LlmUpstream()
        self.run(self.server.start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def models(self):
        return [json.loads(exchange.request_body)["model"] for exchange in self.server.exchanges]

    def close(self):
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def upstream():
    running = ThreadedUpstream()
    yield running
    running.close()


@pytest.fixture
def start_up(tmp_path, upstream):
    backend, running = Backend(), []

    def start(quotas="{}"):
        running.append(Up(tmp_path, backend, catalog=catalog(quotas), guards=GUARDS, routes=ROUTES,
                          upstream_port=upstream.server.port, flush_interval_s=0.1))
        return running[-1]
    yield start
    for up in running:
        up.stop()
    backend.shutdown()


def chat(up, key, **options):
    """One chat completion through the proxy: (status, headers, body as JSON)."""
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **options}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{up.proxy_port}/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def test_token_costs_move_the_margin_and_level_2_serves_the_cheaper_model(start_up, upstream):
    up = start_up()
    key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
    eventually(lambda: chat(up, key)[0] == 200)
    status, headers, answer = chat(up, key)
    assert "X-Aforo-Downgrade" not in headers and answer["model"] == "gpt-4o"
    # Each gpt-4o call keeps 8% of its price: the margin falls below level 2's 30%,
    # and the next calls are downgraded.
    downgraded = []
    eventually(lambda: downgraded.append(chat(up, key)) or "X-Aforo-Downgrade" in downgraded[-1][1])
    status, headers, answer = downgraded[-1]
    assert (status, headers["X-Aforo-Downgrade"], headers["X-Aforo-Throttle"]) == (200, "gpt-4o -> gpt-4o-mini",
                                                                                 "true")
    assert answer["model"] == "gpt-4o-mini" and upstream.models()[-1] == "gpt-4o-mini"
    # Every call is priced by the model that served it, as soon as its events are in.
    models = upstream.models()
    expected = sum(call_cost_nanos(model) for model in models)
    eventually(lambda: up.admin("GET", "/v1/customers/cus_1/margin")["cogs_nanos"] == expected)
    margin = up.admin("GET", "/v1/customers/cus_1/margin")
    assert margin["revenue_nanos"] == len(models) * 100_000_000
    actions = up.admin("GET", "/v1/actions")["items"]
    assert (actions[0]["guard_id"], actions[0]["level_from"], actions[0]["level_to"]) == ("model-costs", 0, 2)


def test_a_hard_quota_on_output_tokens_admits_calls_while_their_max_tokens_fit(start_up, upstream):
    # max_tokens 20 reserved per call, 17 used: 5 calls use 85 of 100, and a 6th
    # (85 + 20) never fits. Two workers lease the quota; one may still hold the few
    # units its last call left (at most 3 plus a top-up of 5), so the 5th may find
    # too few in the ledger, never more than 5 get through.
    up = start_up("{ai_output_tokens: {limit: 100, hard: true}}")
    key = up.admin("POST", "/v1/customers/cus_1/api-keys")["key"]
    # The key has reached the proxy once a call asking for more than the quota is refused.
    eventually(lambda: chat(up, key, max_tokens=101)[0] == 429)
    answers = []
    while len(answers) < 8:
        answers.append(chat(up, key, max_tokens=20))
    statuses = [status for status, _, _ in answers]
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429} and admitted in (4, 5)
    assert statuses == [200] * admitted + [429] * (8 - admitted)
    refusal = answers[-1]
    assert refusal[2]["title"] == "Quota Exceeded"
    assert refusal[1]["RateLimit"].startswith('"ai_output_tokens";r=')
    assert len(upstream.server.exchanges) == admitted
