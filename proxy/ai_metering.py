# Token metering of one LLM API call (a route with `ai`): the request body is read
# whole before it is forwarded (the model, and the output limit its token quota
# reservation comes from; a model a level-2 guard downgrades is replaced; for a
# streamed OpenAI chat request, usage is asked for), each response chunk is observed
# as it passes to the client (never held back), and when the response is complete
# its token usage becomes one meter event per kind present, with the model as a
# dimension. A response whose usage cannot be read is still metered with what is
# known, and flagged.
from __future__ import annotations

from proxy.headers import field_value, without_fields
from proxy.llm_usage import UsageReader, ask_for_usage, read_request, with_model
from proxy.meter_event import MeterEvent, new_event_id

_ENCODINGS = frozenset((b"accept-encoding",))
# Input tokens reserved per byte of request body: about 4 bytes a token for text.
BYTES_PER_INPUT_TOKEN = 4
DOWNGRADE_HEADER = b"x-aforo-downgrade"


class AiCall:
    """One call on a route whose token metering is `metering` (config AiMetering).
    `downgraded`: (requested model, model asked for instead) when a guard downgraded
    the call, else None."""

    __slots__ = ("metering", "request", "reader", "body_bytes", "downgraded")

    def __init__(self, metering) -> None:
        self.metering = metering
        self.request = None
        self.reader = None
        self.body_bytes = 0
        self.downgraded = None

    def forwarded(self, body: bytes, headers: list, downgrades: dict | None = None) -> tuple[bytes, list]:
        """The body and header field parts to send upstream for the client's: the
        body as sent, with the model replaced when `downgrades` (requested model ->
        cheaper model, from a level-2 guard) names it, and with usage asked for (a
        streamed OpenAI chat request); the fields without Accept-Encoding (usage is
        read from the answer as it passes)."""
        self.request = read_request(self.metering.format, body)
        self.body_bytes = len(body)
        served = downgrades.get(self.request.model) if downgrades and self.request.model is not None else None
        if served is not None:
            rewritten = with_model(body, served)
            if rewritten is not None:
                body = rewritten
                self.downgraded = (self.request.model, served)
        if self.request.stream:
            body = ask_for_usage(self.metering.format, body)
        return body, without_fields(headers, _ENCODINGS)

    def reservations(self) -> tuple[tuple[str, int], ...]:
        """What to count against token quotas before the call is forwarded, as
        (metric, tokens): the output limit the request sets (or the route's
        `default_max_tokens`), the request body's size in input tokens (about
        BYTES_PER_INPUT_TOKEN bytes each), and 0 of the kinds not known before the
        answer (cached, cache writes, reasoning): finish() settles them all."""
        metering = self.metering
        request = self.request
        limit = request.max_tokens if request is not None and request.max_tokens is not None \
            else metering.default_max_tokens
        estimates = (-(-self.body_bytes // BYTES_PER_INPUT_TOKEN), 0, 0, limit, 0)
        return tuple(zip(metering.metrics, estimates))     # input, cached, cache write, output, reasoning

    def response_fields(self) -> list:
        """Header field parts to add to the client's response: `X-Aforo-Downgrade:
        <requested> -> <served>` for a downgraded call."""
        if self.downgraded is None:
            return []
        requested, served = self.downgraded
        return [DOWNGRADE_HEADER, b": ", f"{requested} -> {served}".encode(), b"\r\n"]

    def missing_feature(self, features: frozenset) -> str | None:
        """LLM calls need no feature beyond their route's."""
        return None

    def response_started(self, status: int, headers: list) -> None:
        """The response head arrived: its `status` and header field parts."""
        content_type = field_value(headers, b"content-type")
        self.reader = UsageReader(self.metering.format,
                                  None if content_type is None else content_type.decode("latin-1"), status)

    def response_chunk(self, chunk: bytes) -> None:
        """A piece of the response body, as it goes to the client."""
        if self.reader is not None:
            self.reader.feed(chunk)

    def finish(self, customer_id: str, timestamp: float, route: str, status: int, request_bytes: int,
               response_bytes: int, latency_ms: float) -> tuple[dict[str, str], list[MeterEvent]]:
        """The response is complete: the dimensions of the call's own meter event
        (`model`: what the response says, else what was asked for; `downgraded_from`:
        the model the client asked for, when a guard downgraded it; and
        `usage_flags` when usage could not be fully read) and its token meter events,
        one per kind counted above zero, with the same dimensions."""
        usage = self.reader.finish() if self.reader is not None else None
        request = self.request
        model = (usage.model if usage is not None else None) or (request.model if request is not None else None)
        if model is None and self.downgraded is not None:
            model = self.downgraded[1]
        dimensions = {"model": model or "unknown"}
        if self.downgraded is not None:
            dimensions["downgraded_from"] = self.downgraded[0]
        flags = set(request.flags if request is not None else ())
        flags.update(usage.flags if usage is not None else ("no_response",))
        if flags:
            dimensions["usage_flags"] = ",".join(sorted(flags))
        if usage is None:
            return dimensions, []
        counts = zip(self.metering.metrics, (usage.input_tokens, usage.cached_tokens, usage.cache_write_tokens,
                                             usage.output_tokens, usage.reasoning_tokens))
        return dimensions, [MeterEvent(new_event_id(), customer_id, metric, count, timestamp, route, status,
                                       request_bytes, response_bytes, latency_ms, dimensions)
                            for metric, count in counts if count]
