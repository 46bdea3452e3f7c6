# How the proxy classifies field names (either direction), whatever their case.
import pytest

from proxy.headers import (
    FIELD_CONNECTION,
    FIELD_DROPPED,
    FIELD_FORWARDED,
    FIELD_FORWARDED_FOR,
    FIELD_HOST,
    FIELD_OTHER,
    FIELD_UNDERSCORED,
    HOP_BY_HOP,
    field_kind,
    join_parts,
)


@pytest.mark.parametrize("name, kind", [
    (b"Host", FIELD_HOST), (b"HOST", FIELD_HOST), (b"Connection", FIELD_CONNECTION),
    (b"X-Forwarded-For", FIELD_FORWARDED_FOR), (b"Forwarded", FIELD_FORWARDED),
    (b"Keep-Alive", FIELD_DROPPED), (b"TE", FIELD_DROPPED), (b"X-AFORO-Customer", FIELD_DROPPED),
    (b"Content-Type", FIELD_OTHER), (b"X-Aforo", FIELD_OTHER), (b"Hosts", FIELD_OTHER), (b"", FIELD_OTHER),
    (b"X-Forwarded-Fox", FIELD_OTHER), (b"Proxy-Connection", FIELD_DROPPED), (b"x-aforo-", FIELD_DROPPED),
    # `_` would read as `-` on CGI/WSGI-style servers: never the proxy's or forwarding fields
    (b"X_Forwarded_For", FIELD_UNDERSCORED), (b"X_Aforo_Customer", FIELD_UNDERSCORED), (b"_", FIELD_UNDERSCORED),
    (b"x-api_key", FIELD_UNDERSCORED), (b"X-Aforo-Foo_Bar", FIELD_DROPPED), (b"Host_", FIELD_UNDERSCORED),
])
def test_a_field_name_is_classified_case_insensitively(name, kind):
    assert field_kind(name) == kind


def test_no_hop_by_hop_field_is_ever_forwarded_as_end_to_end():
    for name in HOP_BY_HOP:
        assert field_kind(name.upper()) != FIELD_OTHER
        assert field_kind(name) != FIELD_OTHER


def test_joined_parts_are_the_parts_in_order():
    assert join_parts([b"GET", b" ", b"/", b"", b" HTTP/1.1\r\n"]) == b"GET / HTTP/1.1\r\n"
    assert join_parts([]) == b""
    with pytest.raises(TypeError):
        join_parts([b"a", None])
    with pytest.raises(TypeError):
        join_parts([b"a", "text"])
