# Model downgrade at margin level 2, through a running proxy with the real openai
# and anthropic SDKs: a customer throttled by a guard whose level 2 maps the model
# asked for to a cheaper one is served by the cheaper model. The upstream receives
# the client's body with the model replaced and every other byte as sent; the
# response says so in X-Aforo-Downgrade; the call is metered (and so priced) as the
# model served, with the model asked for beside it. Other models, and guards in
# shadow mode, are left alone. Guards on the token metrics an LLM route meters act
# on its calls as guards on its own metric do.
import json

import anthropic
import httpx2
import openai
import pytest
from llm_proxy import LlmProxy

TIMEOUT_S = 10
MESSAGES = [{"role": "user", "content": "How are margins kept?"}]
DOWNGRADES = "{gpt-4o: gpt-4o-mini, claude-opus-4-1: claude-haiku-4-5}"


def standing(mode="enforce"):
    return (f"{{overall: {{guard: ai-margin, level: 2, mode: {mode}, throttle_rate: 100req/sec, "
            f"downgrade_models: {DOWNGRADES}}}}}")


@pytest.fixture
def running(tmp_path, request):
    options = getattr(request, "param", {})
    proxy = LlmProxy(tmp_path, options.get("header", "authorization"),
                     levels=options.get("levels", standing(options.get("mode", "enforce"))))
    yield proxy
    proxy.close()


class SentBodies:
    """The request bodies an SDK's HTTP client sent, in order."""

    def __init__(self):
        self.bodies = []

    def client(self):
        return httpx2.Client(event_hooks={"request": [lambda request: self.bodies.append(request.read())]})


def test_a_downgraded_call_is_asked_for_the_cheaper_model_and_nothing_else_changes(running):
    sent = SentBodies()
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S,
                       http_client=sent.client()) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=64, temperature=0.2, tools=[
                {"type": "function", "function": {"name": "lookup", "description": "model: gpt-4o",
                                                  "parameters": {"type": "object", "properties": {}}}}])
        completion = raw.parse()
    assert raw.headers["x-aforo-downgrade"] == "gpt-4o -> gpt-4o-mini"
    assert raw.headers["x-aforo-throttle"] == "true"
    assert completion.model == "gpt-4o-mini"
    (body,) = sent.bodies
    (received,) = [exchange.request_body for exchange in running.upstream.exchanges]
    # Byte for byte the client's body, but for the top-level model (the tool's
    # description mentions the model too, and keeps it).
    top_level = body.index(b'"gpt-4o"', body.index(b'"model"'))
    assert received == body[:top_level] + b'"gpt-4o-mini"' + body[top_level + len(b'"gpt-4o"'):]
    assert json.loads(received)["tools"][0]["function"]["description"] == "model: gpt-4o"
    (call,) = [event for event in running.metered() if event["metric"] == "api_calls"]
    assert call["dimensions"] == {"model": "gpt-4o-mini", "downgraded_from": "gpt-4o"}


def test_a_streamed_call_is_downgraded_and_still_metered(running):
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o", messages=MESSAGES, stream=True) as response:
            assert response.headers["x-aforo-downgrade"] == "gpt-4o -> gpt-4o-mini"
            models = {chunk.model for chunk in response.parse()}
    assert models == {"gpt-4o-mini"}
    tokens = [event for event in running.metered() if event["metric"] == "ai_output_tokens"]
    assert [event["dimensions"]["model"] for event in tokens] == ["gpt-4o-mini"]


def test_a_model_the_guard_does_not_map_is_left_alone(running):
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        raw = client.chat.completions.with_raw_response.create(model="o3-mini", messages=MESSAGES)
    assert "x-aforo-downgrade" not in raw.headers and raw.headers["x-aforo-throttle"] == "true"
    assert json.loads(running.upstream.exchanges[0].request_body)["model"] == "o3-mini"


@pytest.mark.parametrize("running", [{"mode": "shadow"}], indirect=True)
def test_a_guard_in_shadow_mode_only_reports(running):
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert "x-aforo-downgrade" not in raw.headers and raw.parse().model == "gpt-4o"
    assert "x-aforo-shadow" not in raw.headers               # the verdict goes to the upstream only


@pytest.mark.parametrize("running", [{"header": "x-api-key"}], indirect=True)
def test_an_anthropic_call_is_downgraded(running):
    with anthropic.Anthropic(base_url=running.url, api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        raw = client.messages.with_raw_response.create(model="claude-opus-4-1", max_tokens=64, messages=MESSAGES)
    assert raw.headers["x-aforo-downgrade"] == "claude-opus-4-1 -> claude-haiku-4-5"
    assert raw.parse().model == "claude-haiku-4-5"


@pytest.mark.parametrize("running", [{"levels": "{ai_output_tokens: {guard: output-margin, level: 3}}"}],
                         indirect=True)
def test_a_guard_on_a_token_metric_blocks_the_llm_calls_that_spend_it(running):
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.response.json()["title"] == "Margin Limit Exceeded"
    assert running.upstream.exchanges == []


@pytest.mark.parametrize("running", [{"levels": (
        "{ai_reasoning_tokens: {guard: reasoning-margin, level: 2, throttle_rate: 100req/sec, "
        "downgrade_models: {o3: o3-mini}}}")}], indirect=True)
def test_a_token_metrics_guard_downgrades_too(running):
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k-ai", max_retries=0, timeout=TIMEOUT_S) as client:
        raw = client.chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)
    assert raw.headers["x-aforo-downgrade"] == "o3 -> o3-mini"
