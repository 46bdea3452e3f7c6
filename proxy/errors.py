# Errors raised by the proxy's request handling. Plain Python (never compiled) so that
# callers catch them the same way whichever build of the proxy is loaded.


class UnsafePathError(ValueError):
    """A request path that cannot be normalized safely (an encoded `/`, a `..` above
    the root, ...); str() says what is wrong, in words fit for a 400's detail."""
