# Token metering through a running proxy, with the real openai and anthropic SDKs as
# clients of LLM routes in front of a local upstream speaking their wire formats: the
# tokens metered equal the usage the SDK reports, per kind, with the model as a
# dimension; streamed answers reach the client whole and in order (a streamed OpenAI
# chat call is asked for its usage by the proxy); the request's body reaches the
# upstream unchanged otherwise; a response without usage is still metered, flagged.
import json
import socket

import anthropic
import openai
import pytest
from llm_proxy import LlmProxy
from sdk_usage import anthropic_counts, openai_chat_counts, openai_responses_counts

from bench.llm_upstream import Script

TIMEOUT_S = 10
MESSAGES = [{"role": "user", "content": "How are margins kept?"}]
KIND_METRICS = {"input_tokens": "ai_input_tokens", "cached_tokens": "ai_cached_tokens",
                "cache_write_tokens": "ai_cache_write_tokens", "output_tokens": "ai_output_tokens",
                "reasoning_tokens": "ai_reasoning_tokens"}


@pytest.fixture
def openai_proxy(tmp_path):
    running = LlmProxy(tmp_path, "authorization")
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        yield running, client
    running.close()


@pytest.fixture
def anthropic_proxy(tmp_path):
    running = LlmProxy(tmp_path, "x-api-key")
    with anthropic.Anthropic(base_url=running.url, api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        yield running, client
    running.close()


def tokens_metered(events, route):
    """{kind: count} of the token events of `route`, and their dimensions."""
    tokens = [event for event in events if event["route"] == route and event["metric"] in KIND_METRICS.values()]
    by_metric = {event["metric"]: event["quantity"] for event in tokens}
    return ({kind: by_metric.get(metric, 0) for kind, metric in KIND_METRICS.items()},
            {json.dumps(event["dimensions"], sort_keys=True) for event in tokens})


def the_call(events, route):
    (call,) = [event for event in events if event["route"] == route and event["metric"] == "api_calls"]
    return call


def test_openai_chat_tokens_are_metered_as_the_sdk_reports_them(openai_proxy):
    running, client = openai_proxy
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    events = running.metered()
    counts, dimensions = tokens_metered(events, "chat")
    assert counts == openai_chat_counts(completion.usage)
    assert dimensions == {'{"model": "gpt-4o"}'}
    assert the_call(events, "chat")["dimensions"] == {"model": "gpt-4o"}


def test_a_streamed_openai_chat_is_asked_for_its_usage_and_reaches_the_client_whole(openai_proxy):
    running, client = openai_proxy
    running.upstream.script = Script(text_chunks=12)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    deltas = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(deltas) == 12                                  # every chunk the upstream sent, in order
    asked = json.loads(running.upstream.exchanges[-1].request_body)
    assert asked["stream_options"] == {"include_usage": True}
    assert {key: value for key, value in asked.items() if key != "stream_options"} == {
        "model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    counts, dimensions = tokens_metered(running.metered(), "chat")
    assert counts == openai_chat_counts(chunks[-1].usage)
    assert dimensions == {'{"model": "gpt-4o-mini"}'}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_responses_tokens_are_metered(openai_proxy, stream):
    running, client = openai_proxy
    if stream:
        events = list(client.responses.create(model="gpt-5", input="How are margins kept?", stream=True))
        (completed,) = [event for event in events if event.type == "response.completed"]
        usage = completed.response.usage
    else:
        usage = client.responses.create(model="gpt-5", input="How are margins kept?").usage
    counts, dimensions = tokens_metered(running.metered(), "responses")
    assert counts == openai_responses_counts(usage)
    assert dimensions == {'{"model": "gpt-5"}'}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_messages_tokens_are_metered(anthropic_proxy, stream):
    running, client = anthropic_proxy
    if stream:
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES) as answer:
            usage = answer.get_final_message().usage
    else:
        usage = client.messages.create(model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES).usage
    counts, dimensions = tokens_metered(running.metered(), "messages")
    assert counts == anthropic_counts(usage)
    assert dimensions == {'{"model": "claude-sonnet-4-6"}'}


def test_an_answer_without_usage_is_still_metered_and_flagged(openai_proxy):
    running, client = openai_proxy
    running.upstream.script = Script(report_usage=False)
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content                # the client got its answer
    events = running.metered()
    assert tokens_metered(events, "chat")[0] == dict.fromkeys(KIND_METRICS, 0)
    assert the_call(events, "chat")["dimensions"] == {"model": "gpt-4o", "usage_flags": "no_usage"}


def test_a_client_that_expects_100_continue_is_asked_for_its_body_by_the_proxy(openai_proxy):
    running, _ = openai_proxy
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode()
    with socket.create_connection(("127.0.0.1", running.worker.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-ai\r\n"
                     b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")   # asked for, with no upstream yet
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    counts, _ = tokens_metered(running.metered(), "chat")
    assert counts["input_tokens"] > 0
