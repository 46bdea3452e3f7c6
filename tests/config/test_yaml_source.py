# The strict YAML loader parses with libyaml where PyYAML has it, and reads a file
# without aliases straight into data; it says the same things either way: the same
# data, the same errors on the same lines and paths. Aliases are still bounded.
import hashlib
import os

import pytest
import yaml

from config import ConfigError
from config import yaml_source
from config.yaml_source import MAX_EXPANDED_VALUES, load_yaml
from proxy.edge_state import FileEdgeState

DOCUMENTS = [
    "a: 1\nb: [x, 2.5, true, null, ~]\nc: {d: '2026-11-01', e: 2026-11-01T00:00:00Z}\n",
    "base: &base {tier: pro, quotas: [1, 2]}\nplans: {a: *base, b: *base}\n",
    "defaults: &d {a: 1, b: 2}\nmerged: {<<: *d, b: 3}\n",
    "inline_merge: {<<: {a: 1}, b: 2}\n",
    "plain: yes\nnumber: 0x1f\nstar_in_text: 'a*b'\n",
    "",
    "~\n",
    "---\n",
    "# only a comment\n",
    "a: &anchored {b: 1}\nc: 2\n",
    "list:\n  - [1, [2, {x: y}]]\n  - !!str 3\n  - !!int '4'\n",
]
BROKEN = [
    ("? [complex, key]\n: 1\n", "f.yaml:1: Invalid YAML: found unhashable key (while constructing a mapping at line 1)"),
    ("a: 1\na: 2\n", "f.yaml:2: Duplicate key `a` (first at line 1) - at `$.a`"),
    ("a:\n  - {b: 1, b: 2}\n", "f.yaml:2: Duplicate key `b` (first at line 2) - at `$.a[0].b`"),
    ("x: !!python/object:os.system {}\n", "f.yaml:1: Tag `!!python/object:os.system` is not allowed; "
                                          "use plain YAML values - at `$.x`"),
    ("x: [1, !custom 2]\n", "f.yaml:1: Tag `!custom` is not allowed; use plain YAML values - at `$.x[1]`"),
    ("a: b: c\n", "f.yaml:1: Invalid YAML: mapping values are not allowed here"),
    ("a:\n  b: 1\n c: 2\n", "f.yaml:3: Invalid YAML: expected <block end>, but found '<block mapping start>' "
                            "(while parsing a block mapping at line 1)"),
    ("a: *missing\n", "f.yaml:1: Invalid YAML: found undefined alias 'missing'"),
    ("a: 1\n---\nb: 2\n", "f.yaml:2: Invalid YAML: expected a single document in the stream, "
                          "but found another document"),
    ("a: \x07\n", "f.yaml:1: Invalid YAML: unacceptable character #x0007 (special characters are not allowed)"),
    ("a: {b: 1, b: 2}\nc: !x\n  - 1\n", "f.yaml:1: Duplicate key `b` (first at line 1) - at `$.a.b`\n"
                                        "f.yaml:2: Tag `!x` is not allowed; use plain YAML values - at `$.c`"),
    ("!bad top: 1\n", "f.yaml:1: Tag `!bad` is not allowed; use plain YAML values"),
]


# (libyaml, streamed): as shipped, and every other way the loader can read.
READERS = [(True, True), (True, False), (False, True), (False, False)]


def load(text, reader, monkeypatch):
    use_libyaml, streamed = reader
    monkeypatch.setattr(yaml_source, "USE_LIBYAML", use_libyaml)
    monkeypatch.setattr(yaml_source, "STREAM_WITHOUT_ALIASES", streamed)
    return load_yaml(text, "f.yaml")


def test_libyaml_composes_where_pyyaml_has_it():
    assert yaml_source.USE_LIBYAML is yaml.__with_libyaml__
    if os.environ.get("CI") == "true":
        # CI installs PyYAML's wheel, which has libyaml: a build without it would
        # read a file of a million customers ten times slower.
        assert yaml.__with_libyaml__


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml")
@pytest.mark.parametrize("reader", READERS[1:])
@pytest.mark.parametrize("text", DOCUMENTS)
def test_every_reader_reads_the_same_data_and_lines(text, reader, monkeypatch):
    shipped, other = load(text, READERS[0], monkeypatch), load(text, reader, monkeypatch)
    assert shipped.data == other.data
    assert shipped.empty == other.empty
    for path in ("$.plans.b", "$.b[2]", "$.c.e", "$.merged.b", None):
        assert shipped.line_of(path) == other.line_of(path)


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml")
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("text, message", BROKEN)
def test_every_reader_gives_the_same_errors(text, message, reader, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        load(text, reader, monkeypatch)
    assert str(caught.value) == message


def test_a_document_without_aliases_keeps_no_node_tree_until_a_line_is_asked():
    document = load_yaml("a:\n  b: [1, 2]\n", "f.yaml")
    assert document._root is None and not document.empty
    assert document.line_of("$.a.b[1]") == 2


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml")
def test_a_syntax_error_in_a_huge_file_keeps_its_line(monkeypatch):
    # Past PURE_REREAD_MAX_CHARS libyaml's own words are kept; the line is the same.
    monkeypatch.setattr(yaml_source, "PURE_REREAD_MAX_CHARS", 0)
    with pytest.raises(ConfigError) as caught:
        load("a: 1\nb:\n  c: 1\n d: 2\n", READERS[0], monkeypatch)
    assert (caught.value.line, caught.value.message) == (4, "Invalid YAML: did not find expected key "
                                                            "(while parsing a block mapping at line 1)")


def test_an_alias_bomb_is_refused_naming_the_limit():
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 6)]
    with pytest.raises(ConfigError) as caught:
        load_yaml("\n".join(levels) + "\n", "bomb.yaml")
    assert str(caught.value).startswith("bomb.yaml:1: Aliases expand the document by ")
    assert str(caught.value).endswith(f"(limit: {MAX_EXPANDED_VALUES} values added by aliases)")


def test_aliases_that_add_little_are_accepted():
    text = "keys: &keys [a, b]\n" + "".join(f"c{n}: *keys\n" for n in range(1000))
    assert load_yaml(text, "f.yaml").data["c999"] == ["a", "b"]


def edge_state_of(customers: int) -> str:
    lines = ['period: {start: "2026-12-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}',
             "plans:", "  free:", "    tier: free", "    quotas: {api_calls: {limit: 1000, hard: true}}",
             "customers:"]
    for n in range(customers):
        digest = hashlib.sha256(b"key-%d" % n).hexdigest()
        lines += [f"  - id: cus_{n}", "    plan: free", "    status: active",
                  f"    api_keys: [{digest}]", f"    usage: {{api_calls: {n % 1000}}}"]
    return "\n".join(lines) + "\n"


def test_an_edge_state_file_of_100000_customers_loads(tmp_path):
    # 1.5 million values and no alias: accepted, and read by libyaml in seconds
    # (bench/edge_state_load.py measures a million customers).
    path = tmp_path / "edge_state.yaml"
    path.write_text(edge_state_of(100_000))
    edge_state = FileEdgeState(path, clock=lambda: 1_796_083_200.0 + 86400)    # 2026-12-02
    assert len(edge_state.snapshot) == 100_000
    customer = edge_state.customer_for_key(b"key-99999")
    assert (customer.customer_id, customer.quota_used("api_calls")) == ("cus_99999", 999)
