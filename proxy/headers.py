# HTTP/1.1 header hygiene shared by both directions of the proxy. Hop-by-hop fields
# (RFC 9110 7.6.1) and every field the Connection header names are dropped before
# forwarding; fields the proxy sets itself are added after that filtering, so a
# client can neither strip nor forge them.

# Always hop-by-hop, whether or not Connection names them.
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
))
# Set by the proxy; client-sent values are used only from trusted proxies.
FORWARDED_FIELDS = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"))
# The proxy's own namespace: never accepted from a client or an upstream.
OWN_PREFIX = b"x-aforo-"

# Methods safe to send again when a reused upstream connection closed before any
# response byte (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


def connection_tokens(value):
    """The lower-cased, stripped tokens of a Connection field value (b"close, Upgrade"
    -> {b"close", b"upgrade"}); empty tokens are ignored."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def forwardable(headers, named_by_connection):
    """`headers` ((name, value) pairs, names lower-cased) without hop-by-hop fields,
    the fields named by Connection, and the proxy's own `x-aforo-*` fields."""
    return [
        (name, value) for name, value in headers
        if name not in HOP_BY_HOP and name not in named_by_connection and not name.startswith(OWN_PREFIX)
    ]


def render(headers):
    """Wire form of (name, value) pairs: b"name: value\\r\\n" each, in order."""
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers])
