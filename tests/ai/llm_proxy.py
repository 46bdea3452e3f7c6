# The local LLM upstream (bench.llm_upstream) and a proxy with LLM routes in front of
# it, in a thread of their own: one route per wire format, one customer (key `k-ai`)
# whose plan has feature `large_models` and the given quotas and standings.
from threaded_proxy import ThreadedProxy

from bench.llm_upstream import LlmUpstream

ROUTES = ("{name: chat, upstream: main, path_prefix: /v1/chat/completions, features: [large_models], "
          "ai: {format: openai_chat}}",
          "{name: responses, upstream: main, path_prefix: /v1/responses, ai: {format: openai_responses}}",
          "{name: messages, upstream: main, path_prefix: /v1/messages, ai: {format: anthropic_messages}}")


class LlmProxy(ThreadedProxy):
    """`upstream` is the LlmUpstream (its `script` says how it answers, `exchanges`
    what it was sent); `routes`, `quotas` and `levels` as ThreadedProxy takes them."""

    def __init__(self, folder, api_key_header="authorization", *, routes=ROUTES, quotas="{}", levels="{}",
                 script=None):
        self.upstream = LlmUpstream(script)
        super().__init__(folder, (), routes, key="k-ai", features=("large_models",), api_key_header=api_key_header,
                         quotas=quotas, levels=levels)
        self.run(self.upstream.start())
        self.upstreams = (f'main: {{url: "{self.upstream.url}"}}',)
        self.start()

    def close(self):
        self.close_worker()
        self.run(self.upstream.stop())
        super().close()
