# The path a request is routed on is the path it is forwarded with: the request
# target's path normalized as RFC 3986 says (percent-encoded unreserved characters
# decoded, dot segments removed), with repeated slashes merged and path parameters
# (`;x`) dropped, so no spelling of `/premium` reaches it under another route. What
# cannot be normalized safely is refused: an encoded `/` or `\`, a raw `\`, NUL, a
# `..` above the root, a fragment, a malformed or doubly encoded `%`. The query is
# kept as sent.
import re

import cython

from proxy.errors import UnsafePathError

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Encoded bytes that no normalization makes safe: servers disagree on whether an
# encoded separator separates, and on where a NUL ends the path.
_REFUSED = {
    0x2F: "an encoded `/` (%2F) in the path",
    0x5C: "an encoded `\\` (%5C) in the path",
    0x00: "an encoded NUL (%00) in the path",
}
# The two characters after a `%` (any case) -> the bytes they stand for in the
# normal path (an unreserved character decoded, anything else re-encoded in upper
# case), or the reason the path is refused (a str).
_PERCENT = {}
for _value in range(256):
    _upper = b"%02X" % _value
    _meaning = _REFUSED.get(_value) or (bytes((_value,)) if _value in _UNRESERVED else b"%" + _upper)
    for _spelling in (_upper, _upper.lower(), _upper[:1] + _upper[1:].lower(), _upper[:1].lower() + _upper[1:]):
        _PERCENT[_spelling] = _meaning
# After decoding: a `.`, `/`, `\` or NUL encoded twice, which a server that decodes
# twice would read as the character itself.
_DOUBLY_ENCODED = re.compile(rb"%25(?:2[eEfF]|5[cC]|00)")


def normal_target(target):
    """The request target `target` (origin form, `/path?query`, or `*`) with its path
    normalized: `/free/../premium` -> `/premium`, `/v1/%70remium;x?q=%2e` ->
    `/v1/premium?q=%2e`, `//a//b/` -> `/a/b/`. An already normal target (no `%`, `;`,
    `\\` or `#` in the path, no `/.` or `//`) is returned as is after one scan.
    Raises UnsafePathError for what cannot be normalized safely (see the module
    comment)."""
    if cython.compiled:                                 # C names from paths.pxd
        data = PyBytes_AS_STRING(target)  # noqa: F821
        size = len(target)
        previous = 0
        for index in range(size):
            byte = data[index]
            if byte == 63:                              # `?`: the query is kept as sent
                return target
            if (byte == 37 or byte == 59 or byte == 92 or byte == 35      # % ; \ #
                    or (previous == 47 and (byte == 47 or byte == 46))):   # // /.
                return _normalized(target)
            previous = byte
        return target
    end = target.find(b"?")
    if end < 0:
        end = len(target)
    for mark in (b"%", b";", b"\\", b"#", b"//", b"/."):
        if target.find(mark, 0, end) >= 0:
            return _normalized(target)
    return target


def _normalized(target):
    # The slow path of normal_target, for the few targets that need it.
    end = target.find(b"?")
    path, query = (target, b"") if end < 0 else (target[:end], target[end:])
    if b"\\" in path:
        raise UnsafePathError("a `\\` in the path")
    if b"#" in path:
        raise UnsafePathError("a `#` in the request target (a fragment is never sent to a server)")
    if b"%" in path:
        pieces = path.split(b"%")
        decoded = [pieces[0]]
        for piece in pieces[1:]:
            meaning = _PERCENT.get(piece[:2])
            if meaning is None:
                raise UnsafePathError("a `%` in the path that is not followed by two hex digits")
            if type(meaning) is str:
                raise UnsafePathError(meaning)
            decoded.append(meaning)
            decoded.append(piece[2:])
        path = b"".join(decoded)
        if _DOUBLY_ENCODED.search(path) is not None:
            raise UnsafePathError("a doubly encoded `.`, `/`, `\\` or NUL (%25...) in the path")
    segments = []
    trailing_slash = False       # `/a/`, `/a/.` and `/a/b/..` end in a slash
    for segment in path.split(b"/")[1:]:
        parameters = segment.find(b";")
        if parameters >= 0:
            segment = segment[:parameters]
        if segment == b"" or segment == b".":
            trailing_slash = True
        elif segment == b"..":
            if not segments:
                raise UnsafePathError("a `..` segment above the root of the path")
            segments.pop()
            trailing_slash = True
        else:
            segments.append(segment)
            trailing_slash = False
    normal = b"/" + b"/".join(segments)
    if trailing_slash and segments:
        normal += b"/"
    return normal + query
