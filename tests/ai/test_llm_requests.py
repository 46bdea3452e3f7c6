# What the proxy reads from an LLM request body (model, token limit, streaming) and
# the two rewrites it may make: asking a streamed OpenAI chat call for its usage, and
# replacing the model (the level-2 downgrade). Bodies that are not JSON never raise,
# and a rewrite leaves every other byte as the client sent it.
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.llm_usage import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    LlmRequest,
    ask_for_usage,
    read_request,
    with_model,
)

CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize("wire_format, body, expected", [
    (OPENAI_CHAT, CHAT, LlmRequest("gpt-4o", None, False)),
    (OPENAI_CHAT, b'{"model": "gpt-4o", "max_tokens": 256, "stream": true}',
     LlmRequest("gpt-4o", 256, True)),
    # max_completion_tokens supersedes the deprecated max_tokens.
    (OPENAI_CHAT, b'{"model": "o3", "max_tokens": 10, "max_completion_tokens": 4000}',
     LlmRequest("o3", 4000, False)),
    (OPENAI_CHAT, b'{"model": "o3", "max_output_tokens": 99}', LlmRequest("o3", None, False)),
    (OPENAI_RESPONSES, b'{"model": "gpt-5", "input": "hi", "max_output_tokens": 99, "stream": true}',
     LlmRequest("gpt-5", 99, True)),
    (OPENAI_RESPONSES, b'{"model": "gpt-5", "max_tokens": 99}', LlmRequest("gpt-5", None, False)),
    (ANTHROPIC_MESSAGES, b'{"model": "claude-sonnet-4-6", "max_tokens": 1024, "messages": []}',
     LlmRequest("claude-sonnet-4-6", 1024, False)),
    (ANTHROPIC_MESSAGES, b'{"model": "claude-haiku-4-5", "max_tokens": 0, "stream": true}',
     LlmRequest("claude-haiku-4-5", 0, True)),
    # Only a JSON true streams; "true" or 1 do not.
    (OPENAI_CHAT, b'{"model": "m", "stream": "true"}', LlmRequest("m", None, False)),
    (OPENAI_CHAT, b'{"model": "m", "stream": 1}', LlmRequest("m", None, False)),
    # A model key nested in messages is not the request's model.
    (OPENAI_CHAT, b'{"messages": [{"model": "gpt-4o"}]}', LlmRequest(None, None, False, ("no_model",))),
    (OPENAI_CHAT, b'{"model": 4, "max_tokens": 5}', LlmRequest(None, 5, False, ("no_model",))),
    (OPENAI_CHAT, b'{"model": null}', LlmRequest(None, None, False, ("no_model",))),
    (OPENAI_CHAT, b'{"model": "m", "max_tokens": -1}', LlmRequest("m", None, False, ("bad_max_tokens",))),
    (OPENAI_CHAT, b'{"model": "m", "max_tokens": 1.5}', LlmRequest("m", None, False, ("bad_max_tokens",))),
    (OPENAI_CHAT, b'{"model": "m", "max_tokens": true}', LlmRequest("m", None, False, ("bad_max_tokens",))),
    (ANTHROPIC_MESSAGES, b'{"model": "m", "max_tokens": "100"}',
     LlmRequest("m", None, False, ("bad_max_tokens",))),
    (OPENAI_CHAT, b'{"max_tokens": "x"}', LlmRequest(None, None, False, ("bad_max_tokens", "no_model"))),
    # Escaped keys are the same keys.
    (OPENAI_CHAT, b'{"mod\\u0065l": "gpt-4o"}', LlmRequest("gpt-4o", None, False)),
    # Not a JSON object: never raises.
    (OPENAI_CHAT, b"", LlmRequest(None, None, False, ("malformed",))),
    (OPENAI_CHAT, b'{"model": "gpt-4o"', LlmRequest(None, None, False, ("malformed",))),
    (OPENAI_CHAT, b'["gpt-4o"]', LlmRequest(None, None, False, ("malformed",))),
    (OPENAI_CHAT, b"\xff\xfe", LlmRequest(None, None, False, ("malformed",))),
    (OPENAI_CHAT, b"model=gpt-4o", LlmRequest(None, None, False, ("malformed",))),
    ("gemini", CHAT, LlmRequest(None, None, False, ("unknown_format",))),
])
def test_read_request(wire_format, body, expected):
    assert read_request(wire_format, body) == expected


# -- ask_for_usage ----------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    (b'{"model": "m", "stream": true}',
     b'{"stream_options":{"include_usage":true},"model": "m", "stream": true}'),
    (b'{"model": "m", "stream": true, "stream_options": {"include_obfuscation": false}}',
     b'{"model": "m", "stream": true, "stream_options": {"include_usage":true,"include_obfuscation": false}}'),
    (b'{"model": "m", "stream": true, "stream_options": {}}',
     b'{"model": "m", "stream": true, "stream_options": {"include_usage":true}}'),
    (b'{"model": "m", "stream": true, "stream_options": { }}',
     b'{"model": "m", "stream": true, "stream_options": {"include_usage":true }}'),
    (b'{"model": "m", "stream": true, "stream_options": null}',
     b'{"model": "m", "stream": true, "stream_options": {"include_usage":true}}'),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": false, "x": 1}}',
     b'{"model": "m", "stream": true, "stream_options": {"include_usage": true, "x": 1}}'),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": null}}',
     b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'),
    (b' \n{ "stream" : true }\n', b' \n{"stream_options":{"include_usage":true}, "stream" : true }\n'),
])
def test_ask_for_usage_adds_include_usage_to_a_streamed_chat_request(body, expected):
    rewritten = ask_for_usage(OPENAI_CHAT, body)
    assert rewritten == expected
    assert json.loads(rewritten)["stream_options"]["include_usage"] is True
    # Everything else the client asked for is still there.
    original = json.loads(body)
    options = dict(original.get("stream_options") or {}, include_usage=True)
    assert json.loads(rewritten) == {**original, "stream_options": options}


@pytest.mark.parametrize("wire_format, body", [
    (OPENAI_CHAT, b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'),
    (OPENAI_CHAT, b'{"model": "m"}'),
    (OPENAI_CHAT, b'{"model": "m", "stream": false}'),
    (OPENAI_CHAT, b'{"model": "m", "stream": "yes"}'),
    (OPENAI_CHAT, b'{"model": "m", "stream": true, "stream_options": "usage"}'),
    (OPENAI_CHAT, b'{"model": "m", "stream": true'),
    (OPENAI_CHAT, b"not json"),
    (OPENAI_RESPONSES, b'{"model": "m", "stream": true}'),
    (ANTHROPIC_MESSAGES, b'{"model": "m", "stream": true}'),
    ("gemini", b'{"model": "m", "stream": true}'),
])
def test_ask_for_usage_leaves_other_bodies_alone(wire_format, body):
    assert ask_for_usage(wire_format, body) is body


# -- with_model -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    (b'{"model":"gpt-4o","messages":[]}', b'{"model":"gpt-4o-mini","messages":[]}'),
    (b'{\n  "messages": [{"role": "user", "content": "use \\"model\\": gpt-4o"}],\n  "model" :  "gpt-4o"\n}',
     b'{\n  "messages": [{"role": "user", "content": "use \\"model\\": gpt-4o"}],\n  "model" :  "gpt-4o-mini"\n}'),
    # Nested objects with a model key stay as they are.
    (b'{"tools": [{"model": "gpt-4o"}], "metadata": {"model": "x"}, "model": "gpt-4o"}',
     b'{"tools": [{"model": "gpt-4o"}], "metadata": {"model": "x"}, "model": "gpt-4o-mini"}'),
    # An escaped value, an escaped key.
    (b'{"model": "gpt-\\u0034o\\\\"}', b'{"model": "gpt-4o-mini"}'),
    (b'{"mod\\u0065l": "gpt-4o", "x": "\\"}{"}', b'{"mod\\u0065l": "gpt-4o-mini", "x": "\\"}{"}'),
    # A repeated key: every occurrence, so no parser sees the old model.
    (b'{"model": "a", "model": "gpt-4o"}', b'{"model": "gpt-4o-mini", "model": "gpt-4o-mini"}'),
])
def test_with_model_replaces_only_the_top_level_model(body, expected):
    assert with_model(body, "gpt-4o-mini") == expected


@pytest.mark.parametrize("body", [
    b'{"messages": [{"model": "gpt-4o"}]}',
    b'{"model": null}',
    b'{"model": ["gpt-4o"]}',
    b'{"model": "a", "model": 5}',
    b'["model", "gpt-4o"]',
    b'{"model": "gpt-4o"',
    b"",
    b"\x00",
])
def test_with_model_returns_none_without_a_top_level_string_model(body):
    assert with_model(body, "gpt-4o-mini") is None


def test_with_model_escapes_the_new_model():
    rewritten = with_model(b'{"model": "a"}', 'odd "model"\n\u00e9')
    assert json.loads(rewritten) == {"model": 'odd "model"\n\u00e9'}


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "role", "content", ""]) | st.text(max_size=5), children, max_size=4),
    max_leaves=20)


@st.composite
def request_bodies(draw):
    """(body, its value, the bytes before and after the model's value): a JSON object
    with a top-level string model at any position, nested model keys, any whitespace,
    non-ASCII text escaped or not."""
    members = draw(st.dictionaries(st.text(max_size=8).filter(lambda key: key != "model"),
                                   JSON_VALUES, max_size=5))
    items = list(members.items())
    position = draw(st.integers(0, len(items)))
    items.insert(position, ("model", draw(st.text())))
    ensure_ascii = draw(st.booleans())
    space = draw(st.sampled_from(["", " ", "\n  ", "\t"]))
    tokens = [(json.dumps(key, ensure_ascii=ensure_ascii) + space + ":" + space,
               json.dumps(value, ensure_ascii=ensure_ascii)) for key, value in items]
    before = "{" + space + ("," + space).join(key + value for key, value in tokens[:position])
    if position:
        before += "," + space
    before += tokens[position][0]
    after = "".join("," + space + key + value for key, value in tokens[position + 1:]) + space + "}"
    body = before + tokens[position][1] + after
    return body.encode(), dict(items), before.encode(), after.encode()


@settings(max_examples=300, deadline=None)
@given(request_bodies(), st.text())
def test_with_model_changes_the_model_and_nothing_else(body_and_parts, model):
    body, value, before, after = body_and_parts
    rewritten = with_model(body, model)
    assert rewritten == before + msgspec.json.encode(model) + after
    assert json.loads(rewritten) == {**value, "model": model}
    assert read_request(OPENAI_CHAT, rewritten).model == model


@settings(max_examples=200, deadline=None)
@given(request_bodies(), st.booleans())
def test_ask_for_usage_keeps_the_body_valid_json(body_and_parts, has_options):
    body, value, _, _ = body_and_parts
    streamed = body[:-1] + b', "stream": true' + (b', "stream_options": {"x": 1}' if has_options else b"") + b"}"
    rewritten = ask_for_usage(OPENAI_CHAT, streamed)
    expected_options = {"x": 1, "include_usage": True} if has_options else {"include_usage": True}
    assert json.loads(rewritten) == {**value, "stream": True, "stream_options": expected_options}
