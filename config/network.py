# Network values written as YAML scalars in the settings files: `host:port`, upstream
# `http://` URLs, webhook `http(s)://` URLs, trusted CIDRs, host names, header names
# and HTTP methods. Each
# `parse` normalises what it accepts (lower-case names, upper-case methods) or raises;
# the string-like ones stay `str`, so code that wants plain text can treat them so.
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from config.values import ConfigValue, show

MIN_PORT = 1
MAX_PORT = 65535
_DNS_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
# RFC 9110 `token`: what a header field name or a method may be made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HOST_PORT_FORM = "`127.0.0.1:8080`, `[::1]:8080` or `proxy.internal:8080`"


def _host(text: str) -> str | None:
    """A host as written in a URL or `host:port` (IPv6 without brackets), lower-cased;
    None when it is neither an IP address nor a DNS name."""
    host = text.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host if _DNS_NAME.fullmatch(host) else None


def _port(text: str, written: str, lowest: int = MIN_PORT) -> int:
    if not text.isdigit() or not lowest <= int(text) <= MAX_PORT:
        raise ValueError(f"Expected a port between {lowest} and {MAX_PORT}, got `{text}` in `{written}`")
    return int(text)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class HostPort(ConfigValue):
    """An address to listen on: `host` (an IP address or a name; IPv6 without
    brackets) and `port` (0..65535; 0 lets the system pick a free port, which the
    proxy logs). Written `127.0.0.1:8080` or `[::1]:8080`."""

    __slots__ = ("host", "port")
    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)

    @classmethod
    def parse(cls, raw: object) -> HostPort:
        """`"127.0.0.1:8080"` -> HostPort("127.0.0.1", 8080). ValueError for a missing
        host or port, an unbracketed IPv6 address, or a port outside 0..65535."""
        written = raw.strip() if isinstance(raw, str) else None
        if written is None or ":" not in written:
            raise ValueError(f"Expected `host:port` like {HOST_PORT_FORM}, got `{show(raw)}`")
        if written.startswith("["):
            bracketed, _, port = written[1:].partition("]:")
            host = _host(bracketed) if ":" in bracketed else None
        else:
            text, _, port = written.rpartition(":")
            host = _host(text) if text and ":" not in text else None
        if host is None:
            raise ValueError(f"Expected `host:port` like {HOST_PORT_FORM}, got `{written}`")
        return cls(host, _port(port, written, lowest=0))

    def __str__(self) -> str:
        return f"{_bracketed(self.host)}:{self.port}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamUrl(str):
    """Where an upstream listens: `http://host[:port]` or `https://host[:port]` (port
    80 or 443 when left out), kept as the normalised string `scheme://host:port` (so
    `urlsplit` reads it as well).

    No path, query, fragment or user info, since the request's own path is sent
    unchanged. `scheme`, `host` (IPv6 without brackets), `port`, `tls` (https), and
    `authority`, the `host[:port]` form for a Host header (port left out when it is
    the scheme's default).
    """

    @classmethod
    def parse(cls, raw: object) -> UpstreamUrl:
        """`"http://10.0.0.5:8000"` -> `http://10.0.0.5:8000`. ValueError for another
        scheme, a missing host, a bad port, or a path, query or user info."""
        written = raw.strip() if isinstance(raw, str) else None
        try:
            parts = urlsplit(written) if written is not None and "://" in written else None
        except ValueError:  # an unclosed `[` around an IPv6 address
            parts = None
        if parts is None:
            raise ValueError(f"Expected an upstream URL like `http://127.0.0.1:8000`, got `{show(raw)}`")
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"Only `http://` and `https://` upstream URLs are supported, got `{written}`")
        if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(
                f"An upstream URL is `{scheme}://host:port` without path, query or user info, got `{written}`"
            )
        netloc = parts.netloc
        if netloc.startswith("["):
            bracketed, _, rest = netloc[1:].partition("]")
            host = _host(bracketed) if ":" in bracketed else None
            port_text = rest[1:] if rest.startswith(":") else None if rest else ""
        else:
            text, colon, port_text = netloc.partition(":")
            host = _host(text) if text else None
            port_text = port_text if colon else ""
        if host is None or port_text is None:
            raise ValueError(f"Expected an upstream URL like `http://127.0.0.1:8000`, got `{written}`")
        port = _port(port_text, written) if port_text else _DEFAULT_PORTS[scheme]
        return cls(f"{scheme}://{_bracketed(host)}:{port}")

    @property
    def scheme(self) -> str:
        """`http` or `https`."""
        return self[:self.index(":")]

    @property
    def tls(self) -> bool:
        """Whether the upstream is reached over TLS (`https`)."""
        return self.scheme == "https"

    @property
    def host(self) -> str:
        """The host name or IP address (IPv6 without brackets)."""
        return urlsplit(self).hostname or ""

    @property
    def port(self) -> int:
        """The TCP port (the scheme's default when the URL gave none)."""
        return urlsplit(self).port or _DEFAULT_PORTS[self.scheme]

    @property
    def authority(self) -> str:
        """`host:port` for a Host header; just `host` on the scheme's default port;
        IPv6 in brackets."""
        host = _bracketed(self.host)
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


class WebhookUrl(str):
    """Where a webhook is POSTed: an `http://` or `https://` URL with a host, and
    optionally a port, a path and a query, kept as written (scheme and host
    lower-cased). No user info (put credentials in the signing secret, not the URL)
    and no fragment (it would never be sent)."""

    @classmethod
    def parse(cls, raw: object) -> WebhookUrl:
        """`"https://hooks.example.com/aforo"` -> that URL. ValueError for another
        scheme, a missing or malformed host, a bad port, user info or a fragment."""
        written = raw.strip() if isinstance(raw, str) else None
        try:
            parts = urlsplit(written) if written is not None and "://" in written else None
            port = parts.port if parts is not None else None
        except ValueError:  # an unclosed `[`, or a port that is not a number in range
            parts = port = None
        if parts is None:
            raise ValueError(f"Expected a webhook URL like `https://hooks.example.com/aforo`, got `{show(raw)}`")
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"Only `http://` and `https://` webhook URLs are supported, got `{written}`")
        if "@" in parts.netloc or parts.fragment:
            raise ValueError(f"A webhook URL has no user info and no `#fragment`, got `{written}`")
        host = _host(parts.hostname) if parts.hostname else None
        if host is None or port == 0 or (parts.netloc.endswith(":") and port is None):
            raise ValueError(f"Expected a webhook URL like `https://hooks.example.com/aforo`, got `{written}`")
        rest = written.split("://", 1)[1][len(parts.netloc):]
        netloc = _bracketed(host) + ("" if port is None else f":{port}")
        return cls(f"{parts.scheme.lower()}://{netloc}{rest}")


class TrustedNetwork(str):
    """A CIDR (`10.0.0.0/8`, `::1/128`; a bare address is a single host) whose peers
    may send X-Forwarded-* headers, kept as the normalised CIDR string (so
    `ipaddress.ip_network` reads it as well). `network` is the ipaddress network."""

    @classmethod
    def parse(cls, raw: object) -> TrustedNetwork:
        """`"10.0.0.0/8"` -> `10.0.0.0/8`. ValueError for anything `ipaddress` does
        not read as a network, including host bits set (`10.0.0.1/8`)."""
        if not isinstance(raw, str):
            raise ValueError(f"Expected a CIDR like `10.0.0.0/8` or `::1/128`, got `{show(raw)}`")
        try:
            return cls(str(ipaddress.ip_network(raw.strip())))
        except ValueError as err:
            raise ValueError(
                f"Expected a CIDR like `10.0.0.0/8` or `::1/128`, got `{raw.strip()}` ({err})"
            ) from None

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The network as an ipaddress object (for `address in network`)."""
        return ipaddress.ip_network(self)


class HostName(str):
    """A request host a route is bound to: lower-cased, without a port (the port of a
    request's Host header is ignored when matching). IPv6 is written in brackets."""

    @classmethod
    def parse(cls, raw: object) -> HostName:
        """`"API.Example.com"` -> `"api.example.com"`. ValueError for a port, a scheme,
        a path, or characters no host name has."""
        written = raw.strip() if isinstance(raw, str) else None
        if written and written.startswith("[") and written.endswith("]"):
            host = _host(written[1:-1])
            if host is not None and ":" in host:
                return cls(f"[{host}]")
        elif written and ":" in written:
            raise ValueError(
                f"Expected a host name without a port (the port is ignored when matching), got `{written}`"
            )
        elif written and _DNS_NAME.fullmatch(written.lower()):
            return cls(written.lower().rstrip("."))
        raise ValueError(f"Expected a host name like `api.example.com`, got `{show(raw)}`")


class HeaderName(str):
    """An HTTP header field name, lower-cased (`X-Api-Key` -> `x-api-key`)."""

    @classmethod
    def parse(cls, raw: object) -> HeaderName:
        """ValueError for anything that is not an RFC 9110 token."""
        if not isinstance(raw, str) or not _TOKEN.fullmatch(raw.strip()):
            raise ValueError(f"Expected a header name like `x-api-key`, got `{show(raw)}`")
        return cls(raw.strip().lower())


class HttpMethod(str):
    """An HTTP method, upper-cased (`post` -> `POST`)."""

    @classmethod
    def parse(cls, raw: object) -> HttpMethod:
        """ValueError for anything that is not an RFC 9110 token."""
        if not isinstance(raw, str) or not _TOKEN.fullmatch(raw.strip()):
            raise ValueError(f"Expected an HTTP method like `GET` or `POST`, got `{show(raw)}`")
        return cls(raw.strip().upper())
