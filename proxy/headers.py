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


_KEEP_ALIVE_TOKENS = frozenset((b"keep-alive",))
_CLOSE_TOKENS = frozenset((b"close",))


def connection_tokens(value):
    """The lower-cased, stripped tokens of a Connection field value (b"close, Upgrade"
    -> {b"close", b"upgrade"}); empty tokens are ignored."""
    if value == b"keep-alive" or value == b"Keep-Alive":
        return _KEEP_ALIVE_TOKENS
    if value == b"close" or value == b"Close":
        return _CLOSE_TOKENS
    tokens = []
    for token in value.split(b","):
        token = token.strip()
        if token:
            tokens.append(token.lower())
    return frozenset(tokens)


# What a field is to the proxy, by its name (any case): one of these kinds.
FIELD_OTHER = 0                # end-to-end: forwarded as is
FIELD_HOST = 1
FIELD_CONTENT_LENGTH = 2
FIELD_TRANSFER_ENCODING = 3
FIELD_CONNECTION = 4
FIELD_UPGRADE = 5
# X-Forwarded-* and Forwarded are set by the proxy; client-sent values are used only
# from trusted proxies.
FIELD_FORWARDED_FOR = 6
FIELD_FORWARDED_PROTO = 7
FIELD_FORWARDED_HOST = 8
FIELD_FORWARDED = 9
FIELD_DROPPED = 10             # hop-by-hop (other than the above), or the proxy's own namespace
# A name with `_`: CGI/WSGI-style servers read `X_Forwarded_For` and `X_Aforo_Customer`
# as the proxy's own fields (both become HTTP_X_FORWARDED_FOR), so a request's are
# dropped, as nginx does by default (underscores_in_headers off).
FIELD_UNDERSCORED = 11


def field_kind(name):
    """The kind of a field, from its name as sent (any case). Names are told apart by
    length first, so most take one comparison (this runs for every field)."""
    size = len(name)
    kind = FIELD_OTHER
    if size == 4:
        if starts_ignoring_case(name, b"host"):
            kind = FIELD_HOST
    elif size == 14:
        if starts_ignoring_case(name, b"content-length"):
            kind = FIELD_CONTENT_LENGTH
    elif size == 10:
        if starts_ignoring_case(name, b"connection"):
            kind = FIELD_CONNECTION
        elif starts_ignoring_case(name, b"keep-alive"):
            kind = FIELD_DROPPED
    elif size == 17:
        if starts_ignoring_case(name, b"transfer-encoding"):
            kind = FIELD_TRANSFER_ENCODING
        elif starts_ignoring_case(name, b"x-forwarded-proto"):
            kind = FIELD_FORWARDED_PROTO
    elif size == 7:
        if starts_ignoring_case(name, b"upgrade"):
            kind = FIELD_UPGRADE
        elif starts_ignoring_case(name, b"trailer"):
            kind = FIELD_DROPPED
    elif size == 15:
        if starts_ignoring_case(name, b"x-forwarded-for"):
            kind = FIELD_FORWARDED_FOR
    elif size == 16:
        if starts_ignoring_case(name, b"x-forwarded-host"):
            kind = FIELD_FORWARDED_HOST
        elif starts_ignoring_case(name, b"proxy-connection"):
            kind = FIELD_DROPPED
    elif size == 9:
        if starts_ignoring_case(name, b"forwarded"):
            kind = FIELD_FORWARDED
    elif size == 2:
        if starts_ignoring_case(name, b"te"):
            kind = FIELD_DROPPED
    elif size == 18:
        if starts_ignoring_case(name, b"proxy-authenticate"):
            kind = FIELD_DROPPED
    elif size == 19:
        if starts_ignoring_case(name, b"proxy-authorization"):
            kind = FIELD_DROPPED
    if kind == FIELD_OTHER:
        if size >= 8 and starts_ignoring_case(name, OWN_PREFIX):
            kind = FIELD_DROPPED
        elif has_underscore(name):
            kind = FIELD_UNDERSCORED
    return kind


def has_underscore(name):
    """Whether the field name `name` holds a `_`."""
    if cython.compiled:                                 # C names from headers.pxd
        return memchr(PyBytes_AS_STRING(name), 95, len(name)) != cython.NULL  # noqa: F821
    return b"_" in name


def starts_ignoring_case(value, lower):
    """Whether `value` (at least as long as `lower`) starts with `lower`, a lower-case
    ASCII prefix, ignoring case."""
    if cython.compiled:
        return strncasecmp(PyBytes_AS_STRING(value), PyBytes_AS_STRING(lower), len(lower)) == 0  # noqa: F821
    return value[:len(lower)].lower() == lower


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


def field_value(parts, name):
    """The value of the first field named `name` (lower-cased) in field `parts`
    (four per field, see FIELD_PARTS); None when there is none."""
    for index in range(0, len(parts), FIELD_PARTS):
        if parts[index] == name:
            return parts[index + 2]
    return None


def join_parts(parts):
    """The bytes `parts` (a list) joined into one bytes object: b"".join without the
    buffer protocol (compiled, it sizes the result once and copies each part in)."""
    if cython.compiled:                                 # C names from headers.pxd
        count = len(parts)
        size = 0
        for index in range(count):
            part = list_item(parts, index)  # noqa: F821
            if not bytes_check_exact(part):  # noqa: F821
                raise TypeError("join_parts takes a list of bytes")
            size += object_size(part)  # noqa: F821
        joined = PyBytes_FromStringAndSize(cython.NULL, size)  # noqa: F821
        out = PyBytes_AS_STRING(joined)  # noqa: F821
        for index in range(count):
            part = list_item(parts, index)  # noqa: F821
            length = object_size(part)  # noqa: F821
            memcpy(out, bytes_data(part), length)  # noqa: F821
            out += length
        return joined
    return b"".join(parts)


_HEX_DIGITS = b"0123456789abcdef"


def chunk_frame(body):
    """`body` (bytes, not empty) in the chunked transfer coding: its size in lower-case
    hex, CRLF, the bytes, CRLF (compiled, one allocation and one copy)."""
    if cython.compiled:                                 # C names from headers.pxd
        size = len(body)
        digits = 1
        rest = size >> 4
        while rest:
            digits += 1
            rest >>= 4
        framed = PyBytes_FromStringAndSize(cython.NULL, digits + size + 4)  # noqa: F821
        out = PyBytes_AS_STRING(framed)  # noqa: F821
        hex_digits = PyBytes_AS_STRING(_HEX_DIGITS)  # noqa: F821
        rest = size
        for index in range(digits - 1, -1, -1):
            out[index] = hex_digits[rest & 15]
            rest >>= 4
        out[digits] = 13
        out[digits + 1] = 10
        memcpy(out + digits + 2, PyBytes_AS_STRING(body), size)  # noqa: F821
        out[digits + size + 2] = 13
        out[digits + size + 3] = 10
        return framed
    return b"%x\r\n%b\r\n" % (len(body), body)
