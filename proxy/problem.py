# Responses the proxy answers itself, as RFC 9457 problem+json. Bodies and heads are
# built once per distinct (status, title, detail) and reused: refusals are hot too.
import http
import json

# Standard reason phrases, for the proxy's own answers and for upstream responses
# that came without one (RFC 9110 names, e.g. 413 "Content Too Large").
REASON_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}
REASON_PHRASES.update({
    413: b"Content Too Large", 414: b"URI Too Long", 416: b"Range Not Satisfiable",
    421: b"Misdirected Request", 422: b"Unprocessable Content",
})
PROBLEM_CACHE_MAX = 4096
_BODIES = {}


def problem_body(status, title, detail, reason=""):
    """The problem+json body for a refusal: {"type", "title", "status", "detail"} plus
    the machine-readable "reason" when given. Cached by its inputs."""
    key = (status, title, detail, reason)
    body = _BODIES.get(key)
    if body is None:
        document = {"type": "about:blank", "title": title, "status": status, "detail": detail}
        if reason:
            document["reason"] = reason
        body = json.dumps(document, separators=(",", ":")).encode()
        if len(_BODIES) >= PROBLEM_CACHE_MAX:
            _BODIES.clear()
        _BODIES[key] = body
    return body


_STATUS_LINES = {}   # status -> (phrase, line) of the last line made for it


def status_line(status, phrase=None):
    """b"HTTP/1.1 <status> <phrase>\\r\\n"; the standard phrase when `phrase` is None."""
    last = _STATUS_LINES.get(status)
    if last is not None and last[0] == phrase:
        return last[1]
    line = b"HTTP/1.1 %d %s\r\n" % (status, phrase if phrase is not None else REASON_PHRASES.get(status, b"Unknown"))
    if len(_STATUS_LINES) < 1000:      # statuses are three digits; the cache stays small
        _STATUS_LINES[status] = (phrase, line)
    return line


def problem_response(status, title, detail, *, reason="", headers=(), close=False):
    """A complete problem+json response: status line, `headers` ((name, value) bytes
    pairs), Content-Type, Content-Length, `Connection: close` when `close`, and body."""
    body = problem_body(status, title, detail, reason)
    parts = [status_line(status)]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"content-type: application/problem+json\r\ncontent-length: %d\r\n" % len(body))
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)
