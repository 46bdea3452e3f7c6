# How the proxy classifies field names (either direction), whatever their case and
# however many distinct names it has seen.
import pytest

from proxy.headers import (FIELD_CONNECTION, FIELD_DROPPED, FIELD_FORWARDED, FIELD_FORWARDED_FOR, FIELD_HOST,
                           FIELD_OTHER, field_kind, join_parts)


@pytest.mark.parametrize("name, kind", [
    (b"Host", FIELD_HOST), (b"HOST", FIELD_HOST), (b"Connection", FIELD_CONNECTION),
    (b"X-Forwarded-For", FIELD_FORWARDED_FOR), (b"Forwarded", FIELD_FORWARDED),
    (b"Keep-Alive", FIELD_DROPPED), (b"TE", FIELD_DROPPED), (b"X-AFORO-Customer", FIELD_DROPPED),
    (b"Content-Type", FIELD_OTHER), (b"X-Aforo", FIELD_OTHER),
])
def test_a_field_name_is_classified_case_insensitively(name, kind):
    assert field_kind(name) == (name.lower(), kind)
    assert field_kind(name) == (name.lower(), kind)      # remembered: the same answer


def test_names_past_the_remembered_ones_are_still_classified():
    for number in range(2000):
        assert field_kind(b"X-Junk-%d" % number) == (b"x-junk-%d" % number, FIELD_OTHER)
    assert field_kind(b"hOsT") == (b"host", FIELD_HOST)
    assert field_kind(b"Proxy-Connection") == (b"proxy-connection", FIELD_DROPPED)


def test_joined_parts_are_the_parts_in_order():
    assert join_parts([b"GET", b" ", b"/", b"", b" HTTP/1.1\r\n"]) == b"GET / HTTP/1.1\r\n"
    assert join_parts([]) == b""
    with pytest.raises(TypeError):
        join_parts([b"a", None])
    with pytest.raises(TypeError):
        join_parts([b"a", "text"])
