# One proxy in front of two providers, with the real openai and anthropic SDKs as its
# clients, each with its SDK's default key header (OpenAI `Authorization: Bearer`,
# Anthropic `x-api-key`): the customer's Aforo key decides the request and stays at
# the edge; each upstream gets its provider's key from the proxy's environment.
import anthropic
import openai
import pytest
from threaded_proxy import ThreadedProxy

from bench.llm_upstream import LlmUpstream

TIMEOUT_S = 10
MESSAGES = [{"role": "user", "content": "How are margins kept?"}]
CUSTOMER_KEY = "k-ai"
PROVIDER_KEYS = {"OPENAI_API_KEY": "sk-openai-provider-0b3f", "ANTHROPIC_API_KEY": "sk-ant-provider-91ac"}
ROUTES = ("{name: chat, upstream: openai, path_prefix: /v1/chat/completions, ai: {format: openai_chat}}",
          "{name: responses, upstream: openai, path_prefix: /v1/responses, ai: {format: openai_responses}}",
          "{name: messages, upstream: anthropic, path_prefix: /v1/messages, api_key_header: x-api-key, "
          "ai: {format: anthropic_messages}}")


class ProvidersProxy(ThreadedProxy):
    """A proxy (key header `authorization` by default, `x-api-key` on the messages
    route) whose upstreams `openai` and `anthropic` are one LlmUpstream, each sent
    its provider's key from the environment."""

    def __init__(self, folder):
        self.upstream = LlmUpstream()
        super().__init__(folder, (), ROUTES, key=CUSTOMER_KEY)
        self.run(self.upstream.start())
        self.upstreams = (
            f'openai: {{url: "{self.upstream.url}", headers: {{authorization: "Bearer ${{OPENAI_API_KEY}}"}}}}',
            f'anthropic: {{url: "{self.upstream.url}", headers: {{x-api-key: "${{ANTHROPIC_API_KEY}}", '
            'anthropic-version: "2023-06-01"}}',
        )
        self.start()

    def close(self):
        self.close_worker()
        self.run(self.upstream.stop())
        super().close()


@pytest.fixture
def providers(tmp_path, monkeypatch):
    for name, value in PROVIDER_KEYS.items():
        monkeypatch.setenv(name, value)
    running = ProvidersProxy(tmp_path)
    yield running
    running.close()


def sdk_clients(url, key=CUSTOMER_KEY):
    return (openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S),
            anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=TIMEOUT_S))


def fields(exchange, name):
    return [value for field, value in exchange.request_headers if field == name]


def test_each_sdk_reaches_its_provider_with_the_providers_key_never_the_customers(providers):
    openai_client, anthropic_client = sdk_clients(providers.url)
    with openai_client, anthropic_client:
        openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        list(openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        openai_client.responses.create(model="gpt-5", input="How are margins kept?")
        anthropic_client.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
        with anthropic_client.messages.stream(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES) as stream:
            assert "".join(stream.text_stream).startswith("Margins hold")
    exchanges = providers.upstream.exchanges
    assert [exchange.path for exchange in exchanges] == ["/v1/chat/completions"] * 2 + ["/v1/responses"] + \
        ["/v1/messages"] * 2
    for exchange in exchanges[:3]:
        assert fields(exchange, "authorization") == [f"Bearer {PROVIDER_KEYS['OPENAI_API_KEY']}"]
        assert fields(exchange, "x-api-key") == []
    for exchange in exchanges[3:]:
        assert fields(exchange, "x-api-key") == [PROVIDER_KEYS["ANTHROPIC_API_KEY"]]
        assert fields(exchange, "authorization") == []
        assert fields(exchange, "anthropic-version") == ["2023-06-01"]
    for exchange in exchanges:
        assert not any(CUSTOMER_KEY in value for _, value in exchange.request_headers)
        assert fields(exchange, "x-aforo-customer") == ["cus_test"]
    events = providers.metered()
    assert {event["route"] for event in events} == {"chat", "responses", "messages"}
    assert {event["customer_id"] for event in events} == {"cus_test"}


def test_a_wrong_customer_key_is_refused_at_the_edge_whichever_sdk_sends_it(providers):
    openai_client, anthropic_client = sdk_clients(providers.url, key="k-wrong")
    with openai_client, anthropic_client:
        with pytest.raises(openai.AuthenticationError):
            openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
    assert providers.upstream.exchanges == []
