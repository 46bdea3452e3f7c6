# Token quotas through a running proxy, with the real openai and anthropic SDKs as
# clients: before an LLM call is forwarded, its output limit (`max_tokens`, or the
# route's `default_max_tokens`) and its prompt's size are reserved against the plan's
# hard token quotas, and a call that does not fit is answered 429 without reaching the
# upstream; once the answer is in, each reservation is settled to the tokens metered,
# so what is left is what was really used. Reservations also hold while a call is
# still streaming.
import asyncio
import socket
import time

import anthropic
import openai
import pytest
from llm_proxy import ROUTES, LlmProxy

from bench.llm_upstream import Script

TIMEOUT_S = 10
MESSAGES = [{"role": "user", "content": "How are margins kept?"}]
OUTPUT_QUOTA = "{ai_output_tokens: {limit: 100, hard: true}}"
OUTPUT_TOKENS = Script().output_tokens          # what the upstream answers each call uses (17)


@pytest.fixture
def running(tmp_path, request):
    options = getattr(request, "param", {})
    proxy = LlmProxy(tmp_path, options.get("header", "authorization"), quotas=options.get("quotas", OUTPUT_QUOTA),
                     routes=options.get("routes", ROUTES))
    yield proxy
    proxy.close()


def openai_client(proxy):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S)


def chat(client, **options):
    return client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **options)


def refused(call):
    """The 429 a call got from the proxy: (problem title, RateLimit field)."""
    with pytest.raises(openai.RateLimitError) as caught:
        call()
    return caught.value.response.json()["title"], caught.value.response.headers["ratelimit"]


def test_a_call_whose_max_tokens_do_not_fit_what_is_left_is_refused_before_the_upstream(running):
    with openai_client(running) as client:
        chat(client, max_tokens=60)                   # 60 reserved, settled to the 17 used
        title, remaining = refused(lambda: chat(client, max_tokens=90))          # 17 + 90 > 100
        assert title == "Quota Exceeded"
        assert remaining.startswith(f'"ai_output_tokens";r={100 - OUTPUT_TOKENS};')
        assert len(running.upstream.exchanges) == 1
        # What is left is what the calls really used, not what they reserved.
        chat(client, max_tokens=100 - OUTPUT_TOKENS)
        chat(client, max_tokens=100 - 2 * OUTPUT_TOKENS)
        refused(lambda: chat(client, max_tokens=100 - 3 * OUTPUT_TOKENS + 1))
    events = running.metered()
    assert [event["quantity"] for event in events if event["metric"] == "ai_output_tokens"] == [OUTPUT_TOKENS] * 3
    assert len([event for event in events if event["metric"] == "api_calls"]) == 3


def test_a_streaming_call_holds_its_reservation_until_its_usage_is_in(running):
    hold = running.run(make_event())
    running.upstream.script.hold = hold
    with openai_client(running) as client:
        stream = chat(client, max_tokens=70, stream=True)
        first = next(iter(stream))                   # the call is in flight, 70 reserved
        assert first.model == "gpt-4o"
        refused(lambda: chat(client, max_tokens=40))                            # 70 + 40 > 100
        running.loop.call_soon_threadsafe(hold.set)
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert usage[0].completion_tokens == OUTPUT_TOKENS + Script().reasoning_tokens
        chat(client, max_tokens=80)                  # 17 used + 80 fits
    assert len(running.upstream.exchanges) == 2


async def make_event():
    return asyncio.Event()


@pytest.mark.parametrize("running", [{
    "quotas": "{ai_output_tokens: {limit: 60, hard: true}}",
    "routes": ("{name: chat, upstream: main, path_prefix: /v1/chat/completions, "
               "ai: {format: openai_chat, default_max_tokens: 50}}",)}], indirect=True)
def test_a_call_without_max_tokens_reserves_the_route_default(running):
    with openai_client(running) as client:
        chat(client)                                 # 50 reserved, 17 used
        refused(lambda: chat(client))                # 17 + 50 > 60
        chat(client, max_tokens=60 - OUTPUT_TOKENS)  # a limit of its own fits
    assert len(running.upstream.exchanges) == 2


@pytest.mark.parametrize("running", [{"quotas": "{ai_input_tokens: {limit: 1000, hard: true}}"}], indirect=True)
def test_a_prompt_too_large_for_the_input_quota_is_refused(running):
    with openai_client(running) as client:
        title, remaining = refused(lambda: client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "margin " * 700}]))   # ~4,900 bytes: ~1,225 tokens
        assert title == "Quota Exceeded" and remaining.startswith('"ai_input_tokens";r=1000;')
        chat(client)
        # Settled to the input tokens the upstream billed at the full rate.
        _, remaining = refused(lambda: client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "margin " * 700}]))
        assert remaining.startswith(f'"ai_input_tokens";r={1000 - Script().input_tokens};')
    assert len(running.upstream.exchanges) == 1


@pytest.mark.parametrize("running", [{"header": "x-api-key"}], indirect=True)
def test_anthropic_max_tokens_are_reserved_and_settled(running):
    with anthropic.Anthropic(base_url=running.url, api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        def message(max_tokens):
            return client.messages.create(model="claude-sonnet-4-6", max_tokens=max_tokens, messages=MESSAGES)
        message(90)
        with pytest.raises(anthropic.RateLimitError) as caught:
            message(100 - OUTPUT_TOKENS + 1)
        assert caught.value.response.json()["title"] == "Quota Exceeded"
        message(100 - OUTPUT_TOKENS)
    assert len(running.upstream.exchanges) == 2


@pytest.mark.parametrize("running", [{"quotas": "{api_calls: {limit: 1, hard: true}}"}], indirect=True)
def test_a_client_gone_before_its_body_is_in_is_not_charged(running):
    # Admitted (the proxy asks for the body), then the client leaves: nothing was
    # forwarded or metered, so the one call the quota allows is still there.
    with socket.create_connection(("127.0.0.1", running.worker.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-ai\r\n"
                     b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n{")
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
    with openai_client(running) as client:
        deadline = time.monotonic() + TIMEOUT_S        # the proxy hears of the close on its own loop
        while True:
            try:
                chat(client, max_tokens=10)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the call of a client that left was still charged"
                time.sleep(0.05)
    assert len(running.upstream.exchanges) == 1


@pytest.mark.parametrize("running", [{"quotas": "{api_calls: {limit: 50, hard: true}, "
                                                "ai_output_tokens: {limit: 100, hard: true}}"}], indirect=True)
def test_every_answer_of_a_token_route_says_what_is_left_of_each_quota(running):
    # The route's own metric and the tokens its calls meter, both with a quota: each
    # answer lists both, the tokens as left once this call's reservation is counted.
    with openai_client(running) as client:
        first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=60)
        assert first.headers["ratelimit-policy"].startswith('"api_calls";q=50;w=')
        assert ', "ai_output_tokens";q=100;w=' in first.headers["ratelimit-policy"]
        assert first.headers["ratelimit"].startswith('"api_calls";r=49;')
        assert ', "ai_output_tokens";r=40;' in first.headers["ratelimit"]            # 60 reserved
        second = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
        assert f', "ai_output_tokens";r={100 - OUTPUT_TOKENS - 10};' in second.headers["ratelimit"]
        with pytest.raises(openai.RateLimitError) as caught:                      # 34 + 90 > 100
            chat(client, max_tokens=90)
    refusal = caught.value.response.headers
    assert refusal["ratelimit"].startswith('"api_calls";r=48;')
    assert f', "ai_output_tokens";r={100 - 2 * OUTPUT_TOKENS};' in refusal["ratelimit"]
