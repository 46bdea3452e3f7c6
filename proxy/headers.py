# HTTP/1.1 header hygiene shared by both directions of the proxy. Hop-by-hop fields
# (RFC 9110 7.6.1) and every field the Connection header names are dropped before
# forwarding; fields the proxy sets itself are added after that filtering, so a
# client can neither strip nor forge them.
import cython

# Always hop-by-hop, whether or not Connection names them.
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
))
# The proxy's own namespace: never accepted from a client or an upstream.
OWN_PREFIX = b"x-aforo-"

# Methods safe to send again when a reused upstream connection closed before any
# response byte (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


_COMMON_CONNECTION_VALUES = {
    b"keep-alive": frozenset((b"keep-alive",)), b"close": frozenset((b"close",)),
    b"Keep-Alive": frozenset((b"keep-alive",)), b"Close": frozenset((b"close",)),
}


def connection_tokens(value):
    """The lower-cased, stripped tokens of a Connection field value (b"close, Upgrade"
    -> {b"close", b"upgrade"}); empty tokens are ignored."""
    common = _COMMON_CONNECTION_VALUES.get(value)
    if common is not None:
        return common
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


# What a field is to the proxy, by its lower-cased name: a kind from below, found once
# per distinct name as sent (a bounded memory; names past it are classified each time).
FIELD_OTHER = 0                # end-to-end: forwarded as is
FIELD_HOST = 1
FIELD_CONTENT_LENGTH = 2
FIELD_TRANSFER_ENCODING = 3
FIELD_CONNECTION = 4
FIELD_UPGRADE = 5
# X-Forwarded-* are set by the proxy; client-sent values are used only from trusted proxies.
FIELD_FORWARDED_FOR = 6
FIELD_FORWARDED_PROTO = 7
FIELD_FORWARDED_HOST = 8
FIELD_FORWARDED = 9
FIELD_DROPPED = 10             # hop-by-hop, or in the proxy's own namespace
_SPECIAL_FIELDS = {
    b"host": FIELD_HOST, b"content-length": FIELD_CONTENT_LENGTH, b"transfer-encoding": FIELD_TRANSFER_ENCODING,
    b"connection": FIELD_CONNECTION, b"upgrade": FIELD_UPGRADE, b"x-forwarded-for": FIELD_FORWARDED_FOR,
    b"x-forwarded-proto": FIELD_FORWARDED_PROTO, b"x-forwarded-host": FIELD_FORWARDED_HOST,
    b"forwarded": FIELD_FORWARDED,
}
FIELD_NAMES_REMEMBERED = 512
_FIELD_NAMES = {}


def field_kind(name):
    """(lower-cased name, kind) for a field name as sent."""
    known = _FIELD_NAMES.get(name)
    if known is None:
        lower = name.lower()
        kind = _SPECIAL_FIELDS.get(lower, FIELD_OTHER)
        if kind == FIELD_OTHER and (lower in HOP_BY_HOP or lower.startswith(OWN_PREFIX)):
            kind = FIELD_DROPPED
        known = (lower, kind)
        if len(_FIELD_NAMES) < FIELD_NAMES_REMEMBERED:
            _FIELD_NAMES[name] = known
    return known


# Fields on their way out are kept as a flat list of wire-form parts, four per field
# (name, b": ", value, b"\r\n"), and joined once with the rest of the head.
FIELD_PARTS = 4


def without_fields(parts, names):
    """Field `parts` (four per field, see FIELD_PARTS) without the fields whose
    (lower-cased) name is in `names`."""
    kept = []
    for index in range(0, len(parts), FIELD_PARTS):
        if parts[index] not in names:
            kept.extend(parts[index:index + FIELD_PARTS])
    return kept


def join_parts(parts):
    """The bytes `parts` (a list) joined into one bytes object: b"".join without the
    buffer protocol (compiled, it sizes the result once and copies each part in)."""
    if cython.compiled:
        count = len(parts)
        size = 0
        for index in range(count):
            part = list_item(parts, index)
            if not bytes_check_exact(part):
                raise TypeError("join_parts takes a list of bytes")
            size += object_size(part)
        joined = PyBytes_FromStringAndSize(cython.NULL, size)
        out = PyBytes_AS_STRING(joined)
        for index in range(count):
            part = list_item(parts, index)
            length = object_size(part)
            memcpy(out, bytes_data(part), length)
            out += length
        return joined
    return b"".join(parts)
