# UsageReader on bodies the SDK tests cannot produce: error answers, missing or
# broken usage, streams cut short, oversized bodies, unknown formats, other
# OpenAI-compatible servers' habits. Never an exception; what is known is kept and
# flags say what went wrong.
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.llm_usage import (
    ANTHROPIC_MESSAGES,
    MAX_BODY_BYTES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    TokenUsage,
    UsageReader,
)

JSON = "application/json"
SSE = "text/event-stream"


def read(wire_format, content_type, *chunks, status=None):
    reader = UsageReader(wire_format, content_type, status=status)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


def sse(*events):
    """SSE bytes: each event a (name or None, data) pair, data a dict or raw bytes."""
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"
    return out


CHAT_USAGE = {"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130,
              "prompt_tokens_details": {"cached_tokens": 40},
              "completion_tokens_details": {"reasoning_tokens": 10}}
CHAT_READ = TokenUsage(model="gpt-4o", input_tokens=60, cached_tokens=40, output_tokens=20, reasoning_tokens=10)
ANTHROPIC_USAGE = {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 300,
                   "cache_creation_input_tokens": 50}


def chat_chunk(content=None, usage=None, choices=True, model="gpt-4o"):
    value = {"id": "c", "object": "chat.completion.chunk", "model": model,
             "choices": [{"index": 0, "delta": {"content": content}}] if choices else []}
    if usage is not None:
        value["usage"] = usage
    return (None, value)


# -- JSON bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("wire_format, body, expected", [
    (OPENAI_CHAT, {"model": "gpt-4o", "usage": CHAT_USAGE}, CHAT_READ),
    # Details are optional: without them nothing is cached or reasoning.
    (OPENAI_CHAT, {"model": "gpt-4o", "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
     TokenUsage(model="gpt-4o", input_tokens=5, output_tokens=7)),
    (OPENAI_CHAT, {"model": "gpt-4o", "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                                "prompt_tokens_details": None}},
     TokenUsage(model="gpt-4o", input_tokens=5, output_tokens=7)),
    (OPENAI_CHAT, {"model": "gpt-4o"}, TokenUsage(model="gpt-4o", flags=("no_usage",))),
    (OPENAI_CHAT, {"model": "gpt-4o", "usage": None}, TokenUsage(model="gpt-4o", flags=("no_usage",))),
    (OPENAI_CHAT, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
     TokenUsage(flags=("error", "no_usage"))),
    # Counts that contradict each other are clamped, never negative.
    (OPENAI_CHAT, {"model": "m", "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                           "prompt_tokens_details": {"cached_tokens": 9}}},
     TokenUsage(model="m", input_tokens=0, cached_tokens=9, output_tokens=1, flags=("inconsistent",))),
    (OPENAI_CHAT, {"model": "m", "usage": {"prompt_tokens": "5"}}, TokenUsage(flags=("malformed", "no_usage"))),
    (OPENAI_CHAT, {"model": "m", "usage": {"prompt_tokens": -5}}, TokenUsage(flags=("malformed", "no_usage"))),
    (OPENAI_RESPONSES, {"model": "gpt-5", "status": "completed", "usage": {
        "input_tokens": 10, "output_tokens": 50, "input_tokens_details": {"cached_tokens": 4},
        "output_tokens_details": {"reasoning_tokens": 45}}},
     TokenUsage(model="gpt-5", input_tokens=6, cached_tokens=4, output_tokens=5, reasoning_tokens=45)),
    (OPENAI_RESPONSES, {"model": "gpt-5", "status": "failed", "error": {"code": "server_error"},
                        "usage": None}, TokenUsage(model="gpt-5", flags=("error", "no_usage"))),
    (OPENAI_RESPONSES, {"model": "gpt-5", "status": "incomplete", "usage": {"input_tokens": 3, "output_tokens": 9}},
     TokenUsage(model="gpt-5", input_tokens=3, output_tokens=9)),
    (ANTHROPIC_MESSAGES, {"type": "message", "model": "claude-opus-4-1", "usage": {**ANTHROPIC_USAGE, "output_tokens": 70}},
     TokenUsage(model="claude-opus-4-1", input_tokens=12, cached_tokens=300, cache_write_tokens=50, output_tokens=70)),
    (ANTHROPIC_MESSAGES, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
     TokenUsage(flags=("error", "no_usage"))),
])
def test_json_bodies(wire_format, body, expected):
    data = json.dumps(body).encode()
    assert read(wire_format, JSON, data) == expected
    assert read(wire_format, "application/json; charset=utf-8", *[data[i:i + 7] for i in range(0, len(data), 7)]) \
        == expected


@pytest.mark.parametrize("body, flags", [
    (b"", ("no_usage",)),
    (b"<html>502 Bad Gateway</html>", ("malformed", "no_usage")),
    (b'{"model": "gpt-4o", "usage": {"prompt_tokens": 5', ("no_usage", "truncated")),
    (b"[1, 2]", ("malformed", "no_usage")),
    (b"\xff\xfe{}", ("malformed", "no_usage")),
])
def test_a_json_body_that_cannot_be_read_is_flagged(body, flags):
    assert read(OPENAI_CHAT, JSON, body).flags == flags


def test_an_error_status_is_flagged_with_whatever_the_body_says():
    body = json.dumps({"error": {"message": "bad model"}}).encode()
    assert read(OPENAI_CHAT, JSON, body, status=404).flags == ("error", "no_usage")
    assert read(OPENAI_CHAT, JSON, json.dumps({"model": "m", "usage": CHAT_USAGE}).encode(), status=200).flags == ()


def test_a_json_body_beyond_the_cap_is_dropped_and_flagged():
    reader = UsageReader(OPENAI_CHAT, JSON)
    piece = b" " * (1024 * 1024)
    for _ in range(MAX_BODY_BYTES // len(piece)):
        reader.feed(piece)
    reader.feed(b'{"model": "m", "usage": {"prompt_tokens": 1}}')
    assert reader._parts == []  # nothing held any more
    assert reader.finish() == TokenUsage(flags=("no_usage", "too_large"))


def test_an_unknown_format_is_flagged_and_read_no_further():
    assert read("gemini", JSON, b'{"usageMetadata": {}}') == TokenUsage(flags=("no_usage", "unknown_format"))
    assert read("gemini", SSE, b"data: {}\n\n") == TokenUsage(flags=("no_usage", "unknown_format"))


def test_finish_is_stable_and_later_feeds_change_nothing():
    reader = UsageReader(OPENAI_CHAT, JSON)
    reader.feed(json.dumps({"model": "gpt-4o", "usage": CHAT_USAGE}).encode())
    first = reader.finish()
    reader.feed(b"garbage")
    assert reader.finish() is first == CHAT_READ


def test_feed_never_changes_a_chunk():
    chunk = bytearray(sse(chat_chunk("hi"), chat_chunk(usage=CHAT_USAGE, choices=False), (None, b"[DONE]")))
    before = bytes(chunk)
    reader = UsageReader(OPENAI_CHAT, SSE)
    assert reader.feed(chunk) is None
    assert chunk == before
    assert reader.finish() == CHAT_READ


# -- SSE streams --------------------------------------------------------------------------------

DONE = (None, b"[DONE]")


@pytest.mark.parametrize("wire_format, events, expected", [
    (OPENAI_CHAT, [chat_chunk("a"), chat_chunk("b"), chat_chunk(usage=CHAT_USAGE, choices=False), DONE], CHAT_READ),
    # Servers that put usage on every chunk (cumulative): the last one counts.
    (OPENAI_CHAT, [chat_chunk("a", usage={"prompt_tokens": 100, "completion_tokens": 1}),
                   chat_chunk("b", usage={"prompt_tokens": 100, "completion_tokens": 2}), DONE],
     TokenUsage(model="gpt-4o", input_tokens=100, output_tokens=2)),
    (OPENAI_CHAT, [chat_chunk("a"), DONE], TokenUsage(model="gpt-4o", flags=("no_usage",))),
    (OPENAI_CHAT, [chat_chunk("a"), chat_chunk(usage=CHAT_USAGE, choices=False)],
     TokenUsage(model="gpt-4o", input_tokens=60, cached_tokens=40, output_tokens=20, reasoning_tokens=10,
                flags=("truncated",))),
    (OPENAI_CHAT, [chat_chunk("a"), (None, {"error": {"message": "server had an error"}})],
     TokenUsage(model="gpt-4o", flags=("error", "no_usage", "truncated"))),
    (OPENAI_CHAT, [chat_chunk("a"), (None, b'{"usage": {"prompt_tokens": 1'), DONE],
     TokenUsage(model="gpt-4o", flags=("no_usage", "truncated"))),
    (OPENAI_CHAT, [(None, b"not json"), chat_chunk("a"), DONE],
     TokenUsage(model="gpt-4o", flags=("malformed", "no_usage"))),
    (OPENAI_RESPONSES, [("response.created", {"type": "response.created", "response": {"model": "gpt-5", "usage": None}}),
                        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "usage"}),
                        ("response.completed", {"type": "response.completed", "response": {
                            "model": "gpt-5", "status": "completed",
                            "usage": {"input_tokens": 9, "output_tokens": 4}}})],
     TokenUsage(model="gpt-5", input_tokens=9, output_tokens=4)),
    # Without event lines the type inside the data tells.
    (OPENAI_RESPONSES, [(None, {"type": "response.completed", "response": {
        "model": "gpt-5", "usage": {"input_tokens": 9, "output_tokens": 4}}})],
     TokenUsage(model="gpt-5", input_tokens=9, output_tokens=4)),
    (OPENAI_RESPONSES, [("response.created", {"type": "response.created", "response": {"model": "gpt-5"}}),
                        ("response.failed", {"type": "response.failed", "response": {
                            "model": "gpt-5", "status": "failed", "error": {"code": "server_error"},
                            "usage": {"input_tokens": 9, "output_tokens": 0}}})],
     TokenUsage(model="gpt-5", input_tokens=9, flags=("error",))),
    (OPENAI_RESPONSES, [("response.created", {"type": "response.created"}),
                        ("error", {"type": "error", "code": "rate_limit_exceeded"})],
     TokenUsage(flags=("error", "no_usage", "truncated"))),
    (OPENAI_RESPONSES, [("response.created", {"type": "response.created"})],
     TokenUsage(flags=("no_usage", "truncated"))),
    (ANTHROPIC_MESSAGES, [("message_start", {"type": "message_start", "message": {
                              "model": "claude-opus-4-1", "usage": ANTHROPIC_USAGE}}),
                          ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "x"}}),
                          ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 15}}),
                          ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}}),
                          ("message_stop", {"type": "message_stop"})],
     TokenUsage(model="claude-opus-4-1", input_tokens=12, cached_tokens=300, cache_write_tokens=50, output_tokens=42)),
    # A message_delta with the full cumulative usage (newer API versions) wins.
    (ANTHROPIC_MESSAGES, [("message_start", {"type": "message_start", "message": {
                              "model": "claude-opus-4-1", "usage": ANTHROPIC_USAGE}}),
                          ("message_delta", {"type": "message_delta", "usage": {
                              "input_tokens": 20, "cache_read_input_tokens": 300,
                              "cache_creation_input_tokens": 0, "output_tokens": 8}}),
                          ("message_stop", {"type": "message_stop"})],
     TokenUsage(model="claude-opus-4-1", input_tokens=20, cached_tokens=300, output_tokens=8)),
    # Cut after message_start: the input is known, the output so far is what it said.
    (ANTHROPIC_MESSAGES, [("message_start", {"type": "message_start", "message": {
                              "model": "claude-opus-4-1", "usage": ANTHROPIC_USAGE}}),
                          ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "x"}})],
     TokenUsage(model="claude-opus-4-1", input_tokens=12, cached_tokens=300, cache_write_tokens=50,
                output_tokens=1, flags=("truncated",))),
    (ANTHROPIC_MESSAGES, [("message_start", {"type": "message_start", "message": {"model": "claude-opus-4-1",
                                                                                  "usage": ANTHROPIC_USAGE}}),
                          ("error", {"type": "error", "error": {"type": "overloaded_error"}})],
     TokenUsage(model="claude-opus-4-1", input_tokens=12, cached_tokens=300, cache_write_tokens=50,
                output_tokens=1, flags=("error", "truncated"))),
    (ANTHROPIC_MESSAGES, [(None, {"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 3}}}),
                          (None, {"type": "message_stop"})],
     TokenUsage(model="c", input_tokens=3)),
])
def test_sse_streams(wire_format, events, expected):
    body = sse(*events)
    assert read(wire_format, SSE, body) == expected
    assert read(wire_format, "text/event-stream; charset=utf-8", *[body[i:i + 1] for i in range(len(body))]) \
        == expected


def test_sse_comments_other_fields_and_multi_line_data():
    body = (b": keep-alive\n\nid: 1\nretry: 100\n"
            b'data: {"model": "gpt-4o",\ndata:  "choices": []}\n\n'
            b'data:{"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\r\n\r\n'
            b"data: [DONE]\n\n")
    assert read(OPENAI_CHAT, SSE, body) == TokenUsage(model="gpt-4o", input_tokens=3, output_tokens=4)


def test_a_stream_whose_last_line_is_cut_is_read_and_flagged():
    body = sse(chat_chunk("a")) + b'data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    assert read(OPENAI_CHAT, SSE, body) == TokenUsage(model="gpt-4o", input_tokens=3, output_tokens=4,
                                                      flags=("truncated",))
    assert read(OPENAI_CHAT, SSE, body[:-3]).flags == ("no_usage", "truncated")


def test_an_sse_line_beyond_the_cap_stops_the_reader():
    reader = UsageReader(OPENAI_RESPONSES, SSE)
    reader.feed(b"event: response.completed\ndata: ")
    piece = b"x" * (1024 * 1024)
    for _ in range(MAX_BODY_BYTES // len(piece) + 1):
        reader.feed(piece)
    assert reader._line == []
    reader.feed(b"\n\n")
    assert reader.finish() == TokenUsage(flags=("no_usage", "too_large"))


def test_between_chunks_only_the_unfinished_line_and_event_are_kept():
    reader = UsageReader(OPENAI_CHAT, SSE)
    body = sse(*[chat_chunk("word " * 50) for _ in range(200)])
    reader.feed(body + b'data: {"model"')
    assert b"".join(reader._line) == b'data: {"model"'
    assert reader._data == []


def test_a_stream_read_as_json_or_json_read_as_a_stream_is_flagged():
    stream = sse(chat_chunk("a"), chat_chunk(usage=CHAT_USAGE, choices=False), DONE)
    assert read(OPENAI_CHAT, JSON, stream).flags == ("malformed", "no_usage")
    assert read(OPENAI_CHAT, SSE, json.dumps({"model": "gpt-4o", "usage": CHAT_USAGE}).encode()).flags == \
        ("no_usage", "truncated")
    assert read(OPENAI_CHAT, None, json.dumps({"model": "gpt-4o", "usage": CHAT_USAGE}).encode()) == CHAT_READ


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES]),
       st.sampled_from([JSON, SSE, None, "text/plain"]), st.binary(max_size=300), st.integers(1, 64))
def test_any_bytes_never_raise(wire_format, content_type, body, step):
    usage = read(wire_format, content_type, *[body[i:i + step] for i in range(0, len(body), step)])
    assert isinstance(usage, TokenUsage)
    assert min(usage.input_tokens, usage.output_tokens, usage.cached_tokens,
               usage.reasoning_tokens, usage.cache_write_tokens) >= 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES]),
       st.lists(st.sampled_from([b"data: ", b"event: message_start\n", b"event: response.completed\n",
                                 b'{"type":"message_delta","usage":{"output_tokens":3}}', b"\n", b"\r\n",
                                 b'{"model":"m","usage":{"prompt_tokens":1}}', b"[DONE]", b"{", b'"'])))
def test_sse_like_fragments_never_raise(wire_format, fragments):
    assert isinstance(read(wire_format, SSE, b"".join(fragments)), TokenUsage)
