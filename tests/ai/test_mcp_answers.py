# Which tool calls a server answered `input_required` (2026-07-28 multi round-trip
# requests: the client calls again, and only the round that completes is metered),
# read from the answer as it passes, JSON or SSE, however the bytes are cut into
# chunks. What cannot be read defers nothing, so the call counts.
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.mcp_answers import ANSWER_READ_MAX_BYTES, AnswerReader

JSON = b"application/json"
SSE = b"text/event-stream"


def _answer(request_id, result_type="input_required", **result):
    return {"jsonrpc": "2.0", "id": request_id, "result": {"resultType": result_type, **result}}


ASKS = _answer(2, inputRequests={"confirm": {"method": "elicitation/create", "params": {"message": "Archive?"}}},
               requestState="v1.sealed")
DONE = _answer(3, "complete", content=[{"type": "text", "text": "archived"}], isError=False)
PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 2, "progress": 0}}


def _json(value):
    return json.dumps(value).encode()


def _events(*messages, newline=b"\r\n", event=b"message"):
    frames = []
    for message in messages:
        head = b"event: " + event + newline if event else b""
        frames.append(head + b"data: " + _json(message) + newline + newline)
    return b"".join(frames)


def _read(content_type, body, chunks=None, encoding=None):
    reader = AnswerReader(content_type, encoding)
    for chunk in chunks if chunks is not None else [body]:
        reader.feed(chunk)
    return reader.input_required_ids()


@pytest.mark.parametrize("content_type, body, deferred", [
    # JSON answers
    (JSON, _json(ASKS), {2}),
    (JSON, _json(_answer("r-7")), {"r-7"}),
    (b"application/json; charset=utf-8", _json(ASKS), {2}),
    (b"Application/JSON", _json(ASKS), {2}),
    (JSON, _json(DONE), set()),
    (JSON, _json(_answer(3, "complete", content=[{"type": "text", "text": '"input_required"'}])), set()),
    (JSON, _json([ASKS, DONE, _answer(4)]), {2, 4}),                  # a batch's answers
    (JSON, _json({"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "input_required"}}), set()),
    (JSON, _json(_answer(None)), set()),
    (JSON, _json(_answer(True)), set()),
    (JSON, _json(_answer(1.5)), set()),
    (JSON, _json({"jsonrpc": "2.0", "id": 2, "result": "input_required"}), set()),
    (JSON, _json([ASKS, 7, "input_required", DONE]), {2}),
    (JSON, _json(ASKS)[:-1], set()),                                    # cut short
    (JSON, b"\xff" + _json(ASKS), set()),
    (JSON, b"[" * 100_000 + b'"input_required"' + b"]" * 100_000, set()),
    (JSON, b"", set()),
    # SSE answers: line ends, comments, other events, data over several lines
    (SSE, _events(ASKS), {2}),
    (SSE, _events(ASKS, newline=b"\n"), {2}),
    (SSE, _events(ASKS, newline=b"\r"), {2}),
    (SSE, _events(ASKS, event=b""), {2}),
    (SSE, _events(PROGRESS, ASKS), {2}),
    (SSE, b": ping\r\n\r\n" + _events(PROGRESS) + b": ping\r\n\r\n" + _events(ASKS), {2}),
    (SSE, _events(DONE), set()),
    (SSE, _events(ASKS, event=b"ping"), set()),
    (SSE, b"event: message\ndata: " + _json(ASKS).replace(b', "result"', b',\ndata: "result"') + b"\n\n", {2}),
    (SSE, b"event: message\ndata:" + _json(ASKS) + b"\n\n", {2}),
    (SSE, b"event: message\ndata: " + _json(ASKS) + b"\n", set()),    # the event never ended
    (SSE, b"event: message\ndata: {\"id\": 2, \"input_required\n\n", set()),
    # neither JSON nor SSE
    (b"text/plain", _json(ASKS), set()),
    (None, _json(ASKS), set()),
])
def test_an_answer_gives_the_ids_it_answered_input_required(content_type, body, deferred):
    assert _read(content_type, body) == deferred


def test_an_encoded_answer_is_not_read():
    assert _read(JSON, _json(ASKS), encoding=b"gzip") == frozenset()
    assert _read(JSON, _json(ASKS), encoding=b"identity") == {2}


def test_an_answer_over_the_read_limit_is_not_read():
    padding = "x" * ANSWER_READ_MAX_BYTES
    assert _read(JSON, _json(_answer(2, note=padding))) == frozenset()
    assert _read(SSE, _events(_answer(2, note=padding))) == frozenset()
    # A long event does not hide the next one.
    assert _read(SSE, _events(_answer(5, "complete", note=padding), ASKS)) == {2}


def test_each_sse_event_is_read_once_as_it_ends():
    reader = AnswerReader(SSE, None)
    reader.feed(_events(PROGRESS, ASKS))
    assert reader.input_required_ids() == {2}
    reader.feed(_events(_answer("later")))
    assert reader.input_required_ids() == {2, "later"}


_BODIES = [
    (JSON, _json(ASKS)),
    (JSON, _json([ASKS, DONE, _answer("r-4")])),
    (SSE, _events(PROGRESS, ASKS, DONE)),
    (SSE, _events(PROGRESS, ASKS, newline=b"\r")),
    (SSE, _events(ASKS, _answer(9), newline=b"\n")),
    (SSE, b": ping\r\n\r\n" + _events(DONE, PROGRESS)),
]


@given(st.sampled_from(_BODIES), st.lists(st.integers(min_value=0, max_value=2_000), max_size=12))
def test_the_ids_do_not_depend_on_how_the_answer_is_cut_into_chunks(answer, cuts):
    content_type, body = answer
    points = sorted({min(cut, len(body)) for cut in cuts})
    chunks = [body[start:end] for start, end in zip([0, *points], [*points, len(body)])]
    assert _read(content_type, body, chunks) == _read(content_type, body)
