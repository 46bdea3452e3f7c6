# The path a request is routed on and forwarded with: RFC 3986 normalization, the
# spellings refused as unsafe, and the query kept as sent.
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import UnsafePathError
from proxy.paths import normal_target


@pytest.mark.parametrize("target, normal", [
    # already normal: returned as sent (the same object)
    (b"/", b"/"),
    (b"/v1/chat/completions", b"/v1/chat/completions"),
    (b"/v1/chat?stream=true&q=%2e%2e/%2F;x//y", b"/v1/chat?stream=true&q=%2e%2e/%2F;x//y"),
    (b"/a.b/c..d/e.", b"/a.b/c..d/e."),
    (b"*", b"*"),
    # dot segments (RFC 3986 5.2.4)
    (b"/free/../premium", b"/premium"),
    (b"/free/./../premium", b"/premium"),
    (b"/a/./b", b"/a/b"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/.", b"/"),
    (b"/a/..", b"/"),
    (b"/.well-known/x", b"/.well-known/x"),
    (b"/a/...", b"/a/..."),
    # percent-encoded unreserved characters are the characters; others upper-cased
    (b"/v1/%70remium", b"/v1/premium"),
    (b"/free/%2e%2e/premium", b"/premium"),
    (b"/free/%2E%2e/premium", b"/premium"),
    (b"/free/.%2E/premium", b"/premium"),
    (b"/%41%7a%30%2D%5f%7E", b"/Az0-_~"),
    (b"/a%20b/%3bc/%c3%a9", b"/a%20b/%3Bc/%C3%A9"),
    (b"/a%25b", b"/a%25b"),
    # repeated slashes
    (b"//premium", b"/premium"),
    (b"/a//b///c", b"/a/b/c"),
    (b"/premium/", b"/premium/"),
    (b"/premium//", b"/premium/"),
    # path parameters
    (b"/v1/premium;x", b"/v1/premium"),
    (b"/v1;a=1/premium;b=2/", b"/v1/premium/"),
    (b"/free/..;/premium", b"/premium"),
    (b"/a/;x/b", b"/a/b"),
    # the query is kept as sent, whatever the path needed
    (b"/free/../premium?next=/../x&y=%2f", b"/premium?next=/../x&y=%2f"),
    (b"//a?", b"/a?"),
])
def test_a_target_is_normalized(target, normal):
    assert normal_target(target) == normal


def test_an_already_normal_target_is_the_same_object():
    target = b"/v1/chat/completions?stream=true"
    assert normal_target(target) is target


@pytest.mark.parametrize("target, why", [
    (b"/free/..%2fpremium", "an encoded `/` (%2F) in the path"),
    (b"/free/..%2Fpremium", "an encoded `/` (%2F) in the path"),
    (b"/free/..%5cpremium", "an encoded `\\` (%5C) in the path"),
    (b"/free/..%5Cpremium", "an encoded `\\` (%5C) in the path"),
    (b"/premium%00", "an encoded NUL (%00) in the path"),
    (b"/free\\..\\premium", "a `\\` in the path"),
    (b"/premium#x", "a `#` in the request target (a fragment is never sent to a server)"),
    (b"/..", "a `..` segment above the root of the path"),
    (b"/../premium", "a `..` segment above the root of the path"),
    (b"/%2e%2e/premium", "a `..` segment above the root of the path"),
    (b"/a/../../premium", "a `..` segment above the root of the path"),
    (b"/..;x/premium", "a `..` segment above the root of the path"),
    (b"/a%", "a `%` in the path that is not followed by two hex digits"),
    (b"/a%2", "a `%` in the path that is not followed by two hex digits"),
    (b"/a%zz", "a `%` in the path that is not followed by two hex digits"),
    (b"/a%+1", "a `%` in the path that is not followed by two hex digits"),
    (b"/free/%252e%252e/premium", "a doubly encoded `.`, `/`, `\\` or NUL (%25...) in the path"),
    (b"/free/..%252fpremium", "a doubly encoded `.`, `/`, `\\` or NUL (%25...) in the path"),
    (b"/free/%25%32%65%25%32%65/premium", "a doubly encoded `.`, `/`, `\\` or NUL (%25...) in the path"),
])
def test_a_target_that_cannot_be_normalized_safely_is_refused(target, why):
    with pytest.raises(UnsafePathError) as refused:
        normal_target(target)
    assert str(refused.value) == why


SEGMENTS = st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", "x;p", "%61", "c%20d"]), max_size=8)


@given(SEGMENTS)
def test_a_normal_path_is_its_own_normal_form_and_has_no_dot_segment(segments):
    try:
        normal = normal_target(("/" + "/".join(segments)).encode())
    except UnsafePathError:
        return
    assert normal_target(normal) == normal
    parts = normal.split(b"/")[1:]
    assert b"." not in parts and b".." not in parts
    assert b"//" not in normal and b";" not in normal
