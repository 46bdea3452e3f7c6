# A local LLM API that speaks the OpenAI chat completions, OpenAI responses and
# Anthropic messages wire formats, as JSON and as SSE streams, with the usage the
# SDKs expect. It keeps the exact body bytes it sent for each call, so tests can feed
# them to a UsageReader and compare with what an SDK client reported.
"""`LlmUpstream(script)`: `await start()` binds 127.0.0.1 on a free port (`url`,
`port`; or a given port), `await stop()`; `exchanges` lists every call answered
(`Exchange`).

Run alone for manual checks or a benchmark: `python -m bench.llm_upstream --port N`.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Script:
    """How the upstream answers. Token counts are the partition the proxy reads
    (see proxy.llm_usage): the wire fields are derived from them per format
    (OpenAI input includes cached tokens and output includes reasoning tokens;
    Anthropic input excludes cache reads and writes). `cache_write_tokens` is only
    reported by Anthropic and `reasoning_tokens` only by OpenAI.

    `text_chunks`: content deltas per streamed answer; `chunk_delay_s`: pause before
    each streamed event after the first; `report_usage`: False answers without any
    usage block (as some OpenAI-compatible servers do)."""

    input_tokens: int = 42
    cached_tokens: int = 8
    cache_write_tokens: int = 5
    output_tokens: int = 17
    reasoning_tokens: int = 6
    text_chunks: int = 5
    chunk_delay_s: float = 0.0
    report_usage: bool = True
    # Applied to each request body before it is read, standing in for a proxy that
    # rewrites requests (e.g. proxy.llm_usage.ask_for_usage); None reads it as sent.
    rewrite_request: Callable[[bytes], bytes] | None = None
    # When given, each streamed answer sends its first event, then waits until this
    # event (of the upstream's loop) is set before the rest: a call held in flight.
    hold: asyncio.Event | None = None


@dataclass
class Exchange:
    """One call answered: the request path, its body as read (after any rewrite),
    the response's Content-Type and status, the response body bytes exactly as
    written, one entry a write, and the request's header fields as received
    (lower-case names, repeats kept, in order)."""

    path: str
    request_body: bytes
    content_type: str
    status: int = 200
    sent: list[bytes] = field(default_factory=list)
    request_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def response_body(self) -> bytes:
        return b"".join(self.sent)


WORDS = ["Margins ", "hold ", "when ", "tokens ", "are ", "metered ", "at ", "the ", "edge. "]
CREATED = 1_730_000_000


def _dump(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class LlmUpstream:
    def __init__(self, script: Script | None = None, keep_exchanges: bool = True):
        self.script = script or Script()
        self.keep_exchanges = keep_exchanges  # False for long runs: nothing kept
        self.exchanges: list[Exchange] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- plumbing -----------------------------------------------------------------------

    async def _read(self, request: web.Request) -> tuple[dict, Exchange]:
        body = await request.read()
        if self.script.rewrite_request is not None:
            body = self.script.rewrite_request(body)
        exchange = Exchange(request.path, body, "", request_headers=[
            (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in request.raw_headers])
        if self.keep_exchanges:
            self.exchanges.append(exchange)
        return json.loads(body), exchange

    def _json(self, exchange: Exchange, answer: dict, status: int = 200) -> web.Response:
        body = _dump(answer)
        exchange.content_type = "application/json"
        exchange.status = status
        exchange.sent.append(body)
        return web.Response(body=body, status=status, content_type="application/json")

    async def _stream(self, request: web.Request, exchange: Exchange, events) -> web.StreamResponse:
        exchange.content_type = "text/event-stream; charset=utf-8"
        response = web.StreamResponse(headers={"Content-Type": exchange.content_type,
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for index, data in enumerate(events):
            if index == 1 and self.script.hold is not None:
                await self.script.hold.wait()
            if index and self.script.chunk_delay_s:
                await asyncio.sleep(self.script.chunk_delay_s)
            exchange.sent.append(data)
            await response.write(data)
        await response.write_eof()
        return response

    def _text(self) -> list[str]:
        return [WORDS[index % len(WORDS)] for index in range(self.script.text_chunks)]

    # -- OpenAI chat completions ----------------------------------------------------------

    def _openai_totals(self) -> tuple[int, int]:
        # OpenAI counts cached tokens in its input and reasoning tokens in its output.
        s = self.script
        return s.input_tokens + s.cached_tokens, s.output_tokens + s.reasoning_tokens

    def _chat_usage(self) -> dict:
        prompt, completion = self._openai_totals()
        return {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.script.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.script.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        asked, exchange = await self._read(request)
        model = asked.get("model", "gpt-4o-mini")
        ident = f"chatcmpl-{next(self._ids)}"
        text = self._text()
        if not asked.get("stream"):
            answer = {
                "id": ident, "object": "chat.completion", "created": CREATED, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text),
                                                     "refusal": None, "annotations": []},
                             "logprobs": None, "finish_reason": "stop"}],
                "service_tier": "default", "system_fingerprint": "fp_aforo",
            }
            if self.script.report_usage:
                answer["usage"] = self._chat_usage()
            return self._json(exchange, answer)
        # OpenAI sends usage only when asked, in one last chunk with no choices; once
        # asked, every chunk carries "usage": null.
        include_usage = bool((asked.get("stream_options") or {}).get("include_usage")) \
            and self.script.report_usage
        head = {"id": ident, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "service_tier": "default", "system_fingerprint": "fp_aforo"}

        def chunk(delta, finish_reason=None):
            value = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}
            if include_usage:
                value["usage"] = None
            return b"data: " + _dump(value) + b"\n\n"

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": piece}) for piece in text]
        events.append(chunk({}, "stop"))
        if include_usage:
            events.append(b"data: " + _dump({**head, "choices": [], "usage": self._chat_usage()}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, exchange, events)

    # -- OpenAI responses ------------------------------------------------------------------

    def _responses_usage(self) -> dict:
        input_tokens, output_tokens = self._openai_totals()
        return {
            "input_tokens": input_tokens, "output_tokens": output_tokens,
            "input_tokens_details": {"cached_tokens": self.script.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": self.script.reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        }

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        asked, exchange = await self._read(request)
        model = asked.get("model", "gpt-4o-mini")
        number = next(self._ids)
        text = self._text()
        message_id = f"msg_{number}"
        item = {"id": message_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "".join(text), "annotations": [],
                             "logprobs": []}]}

        def response(status, output, usage):
            return {
                "id": f"resp_{number}", "object": "response", "created_at": CREATED,
                "status": status, "background": False, "error": None,
                "incomplete_details": None, "instructions": None,
                "max_output_tokens": asked.get("max_output_tokens"), "model": model,
                "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
                "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
                "usage": usage, "user": None, "metadata": {},
            }

        usage = self._responses_usage() if self.script.report_usage else None
        if not asked.get("stream"):
            return self._json(exchange, response("completed", [item], usage))
        sequence = itertools.count()

        def event(kind, **fields):
            return (b"event: " + kind.encode() + b"\ndata: "
                    + _dump({"type": kind, "sequence_number": next(sequence), **fields}) + b"\n\n")

        empty_item = {**item, "status": "in_progress", "content": []}
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [
            event("response.created", response=response("in_progress", [], None)),
            event("response.in_progress", response=response("in_progress", [], None)),
            event("response.output_item.added", output_index=0, item=empty_item),
            event("response.content_part.added", item_id=message_id, output_index=0,
                  content_index=0, part=empty_part),
        ]
        events += [event("response.output_text.delta", item_id=message_id, output_index=0,
                         content_index=0, delta=piece, logprobs=[]) for piece in text]
        events += [
            event("response.output_text.done", item_id=message_id, output_index=0,
                  content_index=0, text="".join(text), logprobs=[]),
            event("response.content_part.done", item_id=message_id, output_index=0,
                  content_index=0, part=item["content"][0]),
            event("response.output_item.done", output_index=0, item=item),
            event("response.completed", response=response("completed", [item], usage)),
        ]
        return await self._stream(request, exchange, events)

    # -- Anthropic messages ------------------------------------------------------------------

    def _anthropic_usage(self, output_tokens: int) -> dict:
        s = self.script
        return {"input_tokens": s.input_tokens, "cache_creation_input_tokens": s.cache_write_tokens,
                "cache_read_input_tokens": s.cached_tokens, "output_tokens": output_tokens,
                "service_tier": "standard"}

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        asked, exchange = await self._read(request)
        model = asked.get("model", "claude-sonnet-4-6")
        text = self._text()
        message = {"id": f"msg_{next(self._ids):024d}", "type": "message", "role": "assistant",
                   "model": model, "content": [], "stop_reason": None, "stop_sequence": None}
        output_tokens = self.script.output_tokens
        if not asked.get("stream"):
            answer = {**message, "content": [{"type": "text", "text": "".join(text)}],
                      "stop_reason": "end_turn"}
            if self.script.report_usage:
                answer["usage"] = self._anthropic_usage(output_tokens)
            return self._json(exchange, answer)

        def event(kind, **fields):
            return b"event: " + kind.encode() + b"\ndata: " + _dump({"type": kind, **fields}) + b"\n\n"

        # message_start carries the input counts and a first output count; each
        # message_delta carries the cumulative output count.
        start = dict(message)
        if self.script.report_usage:
            start["usage"] = self._anthropic_usage(1)
        events = [
            event("message_start", message=start),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            event("ping"),
        ]
        events += [event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
                   for piece in text]
        events.append(event("content_block_stop", index=0))
        delta = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if self.script.report_usage:
            delta["usage"] = {"output_tokens": output_tokens}
        events.append(event("message_delta", **delta))
        events.append(event("message_stop"))
        return await self._stream(request, exchange, events)


async def _serve(port: int, script: Script) -> None:
    upstream = LlmUpstream(script, keep_exchanges=False)
    await upstream.start(port)
    print(f"LLM upstream on {upstream.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--text-chunks", type=int, default=Script.text_chunks)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    arguments = parser.parse_args()
    script = Script(text_chunks=arguments.text_chunks, chunk_delay_s=arguments.chunk_delay_s)
    try:
        asyncio.run(_serve(arguments.port, script))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
