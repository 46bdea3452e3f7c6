# The real openai and anthropic SDKs call a local upstream speaking their wire
# formats, streaming and not; the exact body bytes the upstream sent, fed to a
# UsageReader, give the counts the SDK reports, in any split of the stream.
import asyncio
import dataclasses
import threading

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdk_usage import anthropic_counts, openai_chat_counts, openai_responses_counts

from bench.llm_upstream import LlmUpstream, Script
from proxy.llm_usage import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    TokenUsage,
    UsageReader,
    ask_for_usage,
)

MESSAGES = [{"role": "user", "content": "How are margins kept?"}]
TIMEOUT_S = 10


class RunningUpstream:
    """An LlmUpstream on an event loop of its own thread, for synchronous SDK clients."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream = LlmUpstream()
        self._run(self.upstream.start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT_S)

    def answer_with(self, script: Script):
        self.upstream.script = script

    def last_exchange(self):
        return self.upstream.exchanges[-1]

    def close(self):
        self._run(self.upstream.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
        self.loop.close()


@pytest.fixture(scope="module")
def running():
    running = RunningUpstream()
    yield running
    running.close()


@pytest.fixture
def upstream(running):
    running.answer_with(Script())
    return running


@pytest.fixture
def openai_client(running):
    with openai.OpenAI(base_url=f"{running.upstream.url}/v1", api_key="sk-test", max_retries=0,
                       timeout=TIMEOUT_S) as client:
        yield client


@pytest.fixture
def anthropic_client(running):
    with anthropic.Anthropic(base_url=running.upstream.url, api_key="sk-ant-test", max_retries=0,
                             timeout=TIMEOUT_S) as client:
        yield client


def read_usage(wire_format, exchange, pieces=None) -> TokenUsage:
    """What a UsageReader makes of the exchange's response body, fed as the upstream
    wrote it (or in the given pieces)."""
    reader = UsageReader(wire_format, exchange.content_type, status=exchange.status)
    for piece in exchange.sent if pieces is None else pieces:
        reader.feed(piece)
    return reader.finish()


def counts(usage: TokenUsage) -> dict:
    return {field: getattr(usage, field) for field in
            ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cache_write_tokens")}


# -- OpenAI chat completions -----------------------------------------------------------------

def test_openai_chat_json(upstream, openai_client):
    completion = openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    usage = read_usage(OPENAI_CHAT, upstream.last_exchange())
    assert counts(usage) == openai_chat_counts(completion.usage)
    assert usage.model == completion.model == "gpt-4o"
    assert usage.flags == ()
    # Each token once: the partition adds up to the total the upstream billed.
    assert usage.total_tokens == completion.usage.total_tokens


def test_openai_chat_stream_with_usage(upstream, openai_client):
    stream = openai_client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    reported = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(reported) == 1 and chunks[-1].choices == []
    usage = read_usage(OPENAI_CHAT, upstream.last_exchange())
    assert counts(usage) == openai_chat_counts(reported[0])
    assert usage.model == "gpt-4o" and usage.flags == ()


def test_openai_chat_stream_without_usage_is_flagged(upstream, openai_client):
    chunks = list(openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    usage = read_usage(OPENAI_CHAT, upstream.last_exchange())
    assert usage == TokenUsage(model="gpt-4o", flags=("no_usage",))


def test_a_chat_stream_asked_for_usage_by_the_proxy_still_suits_the_sdk(upstream, openai_client):
    # The client did not ask for usage; the request the upstream reads was rewritten
    # by ask_for_usage, as the proxy will. The SDK takes the extra usage chunk.
    upstream.answer_with(Script(rewrite_request=lambda body: ask_for_usage(OPENAI_CHAT, body)))
    chunks = list(openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.startswith("Margins hold")
    assert chunks[-1].usage is not None
    usage = read_usage(OPENAI_CHAT, upstream.last_exchange())
    assert counts(usage) == openai_chat_counts(chunks[-1].usage)


# -- OpenAI responses ---------------------------------------------------------------------------

def test_openai_responses_json(upstream, openai_client):
    response = openai_client.responses.create(model="gpt-5", input="How are margins kept?")
    usage = read_usage(OPENAI_RESPONSES, upstream.last_exchange())
    assert counts(usage) == openai_responses_counts(response.usage)
    assert usage.model == response.model == "gpt-5"
    assert usage.flags == ()
    assert usage.total_tokens == response.usage.total_tokens


def test_openai_responses_stream(upstream, openai_client):
    events = list(openai_client.responses.create(model="gpt-5", input="How are margins kept?",
                                                  stream=True))
    completed = [event for event in events if event.type == "response.completed"]
    assert len(completed) == 1
    usage = read_usage(OPENAI_RESPONSES, upstream.last_exchange())
    assert counts(usage) == openai_responses_counts(completed[0].response.usage)
    assert usage.model == "gpt-5" and usage.flags == ()


def test_openai_responses_stream_through_the_stream_helper(upstream, openai_client):
    with openai_client.responses.stream(model="gpt-5", input="How are margins kept?") as stream:
        final = stream.get_final_response()
    usage = read_usage(OPENAI_RESPONSES, upstream.last_exchange())
    assert counts(usage) == openai_responses_counts(final.usage)


# -- Anthropic messages -----------------------------------------------------------------------

def test_anthropic_messages_json(upstream, anthropic_client):
    message = anthropic_client.messages.create(model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES)
    usage = read_usage(ANTHROPIC_MESSAGES, upstream.last_exchange())
    assert counts(usage) == anthropic_counts(message.usage)
    assert usage.model == message.model == "claude-sonnet-4-6"
    assert usage.flags == ()


def test_anthropic_messages_stream(upstream, anthropic_client):
    with anthropic_client.messages.stream(model="claude-sonnet-4-6", max_tokens=256,
                                          messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("Margins hold")
    usage = read_usage(ANTHROPIC_MESSAGES, upstream.last_exchange())
    # The SDK's final message holds the cumulative output count of the last
    # message_delta, not the 1 of message_start.
    assert final.usage.output_tokens == Script().output_tokens
    assert counts(usage) == anthropic_counts(final.usage)
    assert usage.model == "claude-sonnet-4-6" and usage.flags == ()


def test_anthropic_raw_stream_events(upstream, anthropic_client):
    events = list(anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=64,
                                                   messages=MESSAGES, stream=True))
    start = next(event for event in events if event.type == "message_start")
    delta = next(event for event in events if event.type == "message_delta")
    usage = read_usage(ANTHROPIC_MESSAGES, upstream.last_exchange())
    assert usage.input_tokens == start.message.usage.input_tokens
    assert usage.cached_tokens == start.message.usage.cache_read_input_tokens
    assert usage.cache_write_tokens == start.message.usage.cache_creation_input_tokens
    assert usage.output_tokens == delta.usage.output_tokens


# -- other token counts, missing usage ----------------------------------------------------------

@pytest.mark.parametrize("script", [
    Script(input_tokens=0, cached_tokens=0, cache_write_tokens=0, output_tokens=0, reasoning_tokens=0),
    Script(input_tokens=123_456, cached_tokens=1_000_000, cache_write_tokens=7, output_tokens=9,
           reasoning_tokens=31_000, text_chunks=40),
])
def test_counts_follow_the_upstream_in_every_format(upstream, openai_client, anthropic_client, script):
    upstream.answer_with(script)
    chat = list(openai_client.chat.completions.create(
        model="o3", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))[-1]
    assert counts(read_usage(OPENAI_CHAT, upstream.last_exchange())) == openai_chat_counts(chat.usage)
    response = openai_client.responses.create(model="o3", input="x")
    assert counts(read_usage(OPENAI_RESPONSES, upstream.last_exchange())) == \
        openai_responses_counts(response.usage)
    message = anthropic_client.messages.create(model="claude-opus-4-1", max_tokens=64, messages=MESSAGES)
    assert counts(read_usage(ANTHROPIC_MESSAGES, upstream.last_exchange())) == anthropic_counts(message.usage)


@pytest.mark.parametrize("wire_format, stream", [
    (OPENAI_CHAT, False), (OPENAI_CHAT, True), (OPENAI_RESPONSES, False), (OPENAI_RESPONSES, True),
    (ANTHROPIC_MESSAGES, False), (ANTHROPIC_MESSAGES, True),
])
def test_an_upstream_without_usage_is_metered_with_the_model_and_flagged(
        upstream, openai_client, anthropic_client, wire_format, stream):
    upstream.answer_with(Script(report_usage=False))
    if wire_format == OPENAI_CHAT:
        answer = openai_client.chat.completions.create(
            model="m", messages=MESSAGES, stream=stream, **({"stream_options": {"include_usage": True}}
                                                            if stream else {}))
    elif wire_format == OPENAI_RESPONSES:
        answer = openai_client.responses.create(model="m", input="x", stream=stream)
    else:
        answer = anthropic_client.messages.create(model="m", max_tokens=8, messages=MESSAGES, stream=stream)
    if stream:
        list(answer)
    assert read_usage(wire_format, upstream.last_exchange()) == TokenUsage(model="m", flags=("no_usage",))


# -- the same result in any split of the bytes ---------------------------------------------------

def capture(running, wire_format, client_call):
    running.answer_with(Script(reasoning_tokens=3, text_chunks=12))
    list(client_call())
    return running.last_exchange()


@pytest.fixture(scope="module")
def streamed_exchanges(running):
    with openai.OpenAI(base_url=f"{running.upstream.url}/v1", api_key="sk-test", max_retries=0) as oa, \
            anthropic.Anthropic(base_url=running.upstream.url, api_key="sk-ant-test", max_retries=0) as an:
        return {
            OPENAI_CHAT: capture(running, OPENAI_CHAT, lambda: oa.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})),
            OPENAI_RESPONSES: capture(running, OPENAI_RESPONSES, lambda: oa.responses.create(
                model="gpt-5", input="x", stream=True)),
            ANTHROPIC_MESSAGES: capture(running, ANTHROPIC_MESSAGES, lambda: an.messages.create(
                model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES, stream=True)),
        }


@pytest.mark.parametrize("wire_format", [OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES])
def test_a_stream_fed_byte_by_byte_reads_the_same(streamed_exchanges, wire_format):
    exchange = streamed_exchanges[wire_format]
    whole = read_usage(wire_format, exchange)
    assert whole.flags == () and whole.total_tokens > 0
    body = exchange.response_body
    assert read_usage(wire_format, exchange, [body[i:i + 1] for i in range(len(body))]) == whole
    assert read_usage(wire_format, exchange, [body]) == whole


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES]),
       st.lists(st.integers(0, 4000), max_size=30), st.booleans())
def test_a_stream_in_random_splits_reads_the_same(streamed_exchanges, wire_format, cuts, crlf):
    exchange = streamed_exchanges[wire_format]
    body = exchange.response_body
    if crlf:  # SSE allows CRLF line ends
        body = body.replace(b"\n", b"\r\n")
    expected = read_usage(wire_format, exchange)
    points = sorted({cut % (len(body) + 1) for cut in cuts})
    pieces = [body[start:end] for start, end in zip([0, *points], [*points, len(body)])]
    assert b"".join(pieces) == body
    assert read_usage(wire_format, exchange, pieces) == expected


def test_the_upstream_paces_its_chunks(running, openai_client):
    running.answer_with(dataclasses.replace(Script(), chunk_delay_s=0.01, text_chunks=3))
    list(openai_client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    # One write an event: role chunk, three deltas, finish, [DONE].
    assert len(running.last_exchange().sent) == 6
