# Strict YAML reading for configuration files: plain data only (standard tags), no
# duplicate keys, bounded alias expansion. The node tree is kept (or, for a document
# read straight from the parser's events, composed when first asked for) so a
# validation path such as `$.guards[2].actions.level_2` maps back to a 1-based line.
# libyaml parses when PyYAML has it; a syntax error is then read again by the pure
# loader for its message. A document without aliases (any file of customers) needs
# no tree to be read: a million customers take seconds and no node per value.
from __future__ import annotations

import gc
import re
from collections.abc import Callable
from contextlib import contextmanager

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from config.errors import ConfigError, raise_if_any

_CORE_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _CORE_TAG + "merge"
_STR_TAG = _CORE_TAG + "str"
ALLOWED_TAGS = frozenset(
    _CORE_TAG + name
    for name in ("str", "int", "float", "bool", "null", "seq", "map", "merge", "timestamp", "value")
)
# Anchors and aliases may share a list; they may not blow a small file up into a huge
# value (the "billion laughs" shape) that validation would then walk: the values
# aliases add (beyond those written in the file, which may be millions) are bounded.
MAX_EXPANDED_VALUES = 100_000
# Whether libyaml parses (PyYAML built with it); False forces the pure-Python
# parser everywhere. Whether a document without aliases is read straight from the
# parser's events (no node tree); False composes every document first. Both False
# is how every file was read before (the benchmark's baseline).
USE_LIBYAML = yaml.__with_libyaml__
STREAM_WITHOUT_ALIASES = True
# libyaml words syntax errors its own way ("did not find expected key"); a document
# up to this size is read again by the pure loader for the house message (same line).
# A larger one keeps libyaml's words: reading it again would take minutes.
PURE_REREAD_MAX_CHARS = 4 << 20
# Plain scalars whose resolved tag is remembered while streaming (keys and values
# such as `plan`, `active`, `free` repeat on every customer; ids and digests do not).
PLAIN_TAGS_REMEMBERED = 4096
# Path steps: `.key`, `[0]`, and `['any key']` for keys that are not identifiers.
_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^'\\]*)'\]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that constructs only the standard data tags; dates stay strings.

    Any other tag (`!!python/object`, `!!set`, `!custom`) fails with a message that
    names the tag; `load_yaml` checks tags on the whole tree before constructing.
    """

    yaml_constructors = {
        tag: constructor
        for tag, constructor in yaml.SafeLoader.yaml_constructors.items()
        if tag in ALLOWED_TAGS
    }

    def construct_undefined(self, node: Node) -> None:
        raise yaml.constructor.ConstructorError(
            None, None, f"tag `{display_tag(node.tag)}` is not allowed", node.start_mark
        )


StrictSafeLoader.add_constructor(None, StrictSafeLoader.construct_undefined)
# Plain scalars that YAML 1.1 reads as dates (`2024-01-01`) or as `=` stay strings:
# timestamps are read by the schema (which insists on a timezone), and an impossible
# date must not crash the loader.
StrictSafeLoader.add_constructor(_CORE_TAG + "timestamp", StrictSafeLoader.construct_yaml_str)
StrictSafeLoader.add_constructor(_CORE_TAG + "value", StrictSafeLoader.construct_yaml_str)

if yaml.__with_libyaml__:
    class StrictCSafeLoader(yaml.CSafeLoader):
        """StrictSafeLoader's constructors over libyaml's parser and composer."""

        yaml_constructors = StrictSafeLoader.yaml_constructors
        construct_undefined = StrictSafeLoader.construct_undefined
else:  # pragma: no cover - PyYAML without libyaml
    StrictCSafeLoader = None


class YamlDocument:
    """A parsed YAML document: `data` (plain dicts, lists, scalars) and the node tree
    it came from (`root`, None for an empty file or for data that never was YAML),
    used to find lines for paths. `compose()`, when given, makes the tree on first
    use instead (a large document read straight into data keeps no tree)."""

    def __init__(self, data: object, root: Node | None,
                 compose: Callable[[], Node | None] | None = None) -> None:
        self.data = data
        self._root = root
        self._compose = compose

    @property
    def empty(self) -> bool:
        """True for a document with no node at all (an empty file)."""
        return self._root is None and self._compose is None

    @property
    def root(self) -> Node | None:
        if self._compose is not None:
            self._root, self._compose = self._compose(), None
        return self._root

    def line_of(self, path: str | None, unknown_key: str | None = None) -> int | None:
        """The 1-based line of the node at `path` (`$.guards[0].scope`, None for the top).

        For a mapping key the line of the key is given; for a list item, the line
        where the item starts. If the path leaves the tree, the deepest node reached
        counts. With `unknown_key`, the line of that key inside the node at `path`
        when it is there. None for an empty document.
        """
        node, line = self._walk(path)
        if unknown_key is not None and node is not None:
            found = _find_key(node, unknown_key)
            if found is not None:
                line = _line(found[0])
        return line

    def scalar_at(self, path: str | None) -> str | None:
        """The text of the scalar at `path` as written, or None if there is none."""
        node, _ = self._walk(path, exact=True)
        return node.value if isinstance(node, ScalarNode) else None

    def _walk(self, path: str | None, exact: bool = False) -> tuple[Node | None, int | None]:
        if self.root is None:
            return None, None
        node, line = self.root, _line(self.root)
        for key, index in path_steps(path):
            if index is None:
                found = _find_key(node, key)
                if found is None:
                    return (None if exact else node), line
                key_node, node = found
                line = _line(key_node)
            else:
                if not isinstance(node, SequenceNode) or index >= len(node.value):
                    return (None if exact else node), line
                node = node.value[index]
                line = _line(node)
        return node, line


def load_yaml(text: str, file: str) -> YamlDocument:
    """Parse one YAML document from `text`; `file` is used in error messages only.

    Returns the document (data None and root None for an empty file). Raises
    ConfigError (ConfigErrors when several) for a syntax error, a second document,
    a non-standard tag, a duplicate mapping key, or alias expansion beyond
    MAX_EXPANDED_VALUES (the message names the limit). Any number of values written
    in the file is accepted. Composed by libyaml when USE_LIBYAML; the messages and
    lines are the same either way.
    """
    if not USE_LIBYAML:
        return _load(StrictSafeLoader, text, file)
    try:
        return _load(StrictCSafeLoader, text, file)
    except ConfigError as error:
        if not isinstance(error.__cause__, yaml.YAMLError) or len(text) > PURE_REREAD_MAX_CHARS:
            raise
    return _load(StrictSafeLoader, text, file)


def _load(loader_class, text: str, file: str) -> YamlDocument:
    # Without a `*` the text has no alias: its events are read straight into data
    # (no node tree). With one, or where streaming gives up, the tree is composed,
    # checked and constructed.
    if STREAM_WITHOUT_ALIASES and "*" not in text:
        document = _attempt(loader_class, text, file, _streamed)
        if document is not None:
            return document
    return _attempt(loader_class, text, file, _composed)


def _attempt(loader_class, text: str, file: str, read) -> YamlDocument | None:
    try:
        loader = loader_class(text)
    except yaml.reader.ReaderError as err:
        raise _reader_error(err, text, file) from err
    try:
        with no_cyclic_gc():
            return read(loader, loader_class, text, file)
    except yaml.MarkedYAMLError as err:
        raise _syntax_error(err, file) from err
    except yaml.reader.ReaderError as err:     # libyaml checks characters as it parses
        raise _reader_error(err, text, file) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"Invalid YAML: {err}", file) from err
    except RecursionError as err:
        raise ConfigError("Invalid YAML: nested too deeply", file) from err
    finally:
        loader.dispose()


def _composed(loader, loader_class, text: str, file: str) -> YamlDocument:
    root = loader.get_single_node()
    if root is None:
        return YamlDocument(data=None, root=None)
    raise_if_any(_check_tree(root, file))
    return YamlDocument(data=loader.construct_document(root), root=root)


def _compose_later(loader_class, text: str) -> Callable[[], Node | None]:
    def compose() -> Node | None:
        loader = loader_class(text)
        try:
            with no_cyclic_gc():
                return loader.get_single_node()
        finally:
            loader.dispose()
    return compose


def _streamed(loader, loader_class, text: str, file: str) -> YamlDocument | None:
    """A document without aliases read from the parser's events straight into data,
    with the checks _check_tree makes (tags, duplicate keys with their lines); no
    node tree is kept. None when the document needs one after all: a merge key, a
    key that is not a scalar, a second document (whose error the composer words)."""
    get_event = loader.get_event
    constructors = loader.yaml_constructors
    allowed = ALLOWED_TAGS
    errors: list[ConfigError] = []
    plain_tags: dict[str, str] = {}

    def resolve(kind, value, implicit):
        # The loader's resolver runs its patterns on every plain scalar; the answer
        # depends on the text alone, so repeated texts are looked up.
        if kind is not ScalarNode or implicit != (True, False):
            return loader.resolve(kind, value, implicit)
        tag = plain_tags.get(value)
        if tag is None:
            tag = loader.resolve(kind, value, implicit)
            if len(plain_tags) < PLAIN_TAGS_REMEMBERED:
                plain_tags[value] = tag
        return tag

    def refused(tag: str, event, path: _PathStep | None) -> None:
        errors.append(ConfigError(f"Tag `{display_tag(tag)}` is not allowed; use plain YAML values",
                                  file, event.start_mark.line + 1, _spelled(path)))

    def scalar(event, path: _PathStep | None) -> object:
        tag = event.tag
        if tag is None or tag == "!":
            tag = resolve(ScalarNode, event.value, event.implicit)
        if tag == _STR_TAG:
            return event.value
        if tag not in allowed:
            refused(tag, event, path)
            return None
        return constructors[tag](loader, ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style))

    def value_of(event, path: _PathStep | None) -> object:
        kind = event.__class__
        if kind is ScalarEvent:
            return scalar(event, path)
        if kind is AliasEvent:
            raise _NotPlain
        collection = SequenceNode if kind is SequenceStartEvent else MappingNode
        tag = event.tag
        if tag is None or tag == "!":
            tag = resolve(collection, None, event.implicit)
        if tag not in allowed:
            refused(tag, event, path)
        if collection is SequenceNode:
            items = []
            event = get_event()
            while event.__class__ is not SequenceEndEvent:
                items.append(scalar(event, (path, len(items))) if event.__class__ is ScalarEvent
                             else value_of(event, (path, len(items))))
                event = get_event()
            return items
        mapping = {}
        first_line: dict[tuple[str, str], int] = {}
        event = get_event()
        while event.__class__ is not MappingEndEvent:
            if event.__class__ is not ScalarEvent:
                raise _NotPlain
            key_tag = event.tag
            if key_tag is None or key_tag == "!":
                key_tag = resolve(ScalarNode, event.value, event.implicit)
            if key_tag == _MERGE_TAG:
                raise _NotPlain
            key = scalar(event, path)
            identity, line = (key_tag, event.value), event.start_mark.line + 1
            if identity in first_line:
                errors.append(ConfigError(f"Duplicate key `{event.value}` (first at line {first_line[identity]})",
                                          file, line, _spelled((path, event.value))))
            else:
                first_line[identity] = line
            child = get_event()
            mapping[key] = scalar(child, (path, event.value)) if child.__class__ is ScalarEvent \
                else value_of(child, (path, event.value))
            event = get_event()
        return mapping

    get_event()                                   # the stream starts
    if loader.check_event(StreamEndEvent):
        return YamlDocument(data=None, root=None)
    get_event()                                   # the document starts
    try:
        data = value_of(get_event(), None)
    except _NotPlain:
        return None
    get_event()                                   # the document ends
    if not loader.check_event(StreamEndEvent):
        return None
    raise_if_any(errors)
    return YamlDocument(data, None, _compose_later(loader_class, text))


@contextmanager
def no_cyclic_gc():
    """Run the block with Python's cyclic garbage collector paused (then restored).

    Reading a large file allocates millions of objects and no garbage cycles (an
    alias that would make one is refused): the collector would re-scan the growing
    tree again and again for nothing, tripling the time a large file takes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _NotPlain(Exception):
    """The document needs its node tree to be read (see _streamed)."""


def display_tag(tag: str) -> str:
    """`tag:yaml.org,2002:python/object` -> `!!python/object`; local tags unchanged."""
    return "!!" + tag[len(_CORE_TAG):] if tag.startswith(_CORE_TAG) else tag


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _find_key(node: Node, key: str) -> tuple[Node, Node] | None:
    # The last match wins, as in construction (merged keys come before explicit ones).
    if not isinstance(node, MappingNode):
        return None
    for key_node, value_node in reversed(node.value):
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _reader_error(err: yaml.reader.ReaderError, text: str, file: str) -> ConfigError:
    line = text.count("\n", 0, err.position) + 1
    return ConfigError(f"Invalid YAML: unacceptable character #x{err.character:04x} ({err.reason})", file, line)


def _syntax_error(err: yaml.MarkedYAMLError, file: str) -> ConfigError:
    mark = err.problem_mark or err.context_mark
    line = None if mark is None else mark.line + 1
    problem = err.problem or err.context or "malformed document"
    if err.context and err.problem and err.problem.startswith("but "):
        # "expected a single document in the stream" + "but found another document"
        problem = f"{err.context}, {err.problem}"
    elif err.context and err.problem and err.context_mark is not None:
        problem = f"{err.problem} ({err.context} at line {err.context_mark.line + 1})"
    return ConfigError(f"Invalid YAML: {problem}", file, line)


def _check_tree(root: Node, file: str) -> list[ConfigError]:
    """Tags and duplicate keys, each node checked once; expanded size bounded."""
    errors: list[ConfigError] = []
    checked: set[int] = set()
    sizes: dict[int, int] = {}

    def error(message: str, node: Node, path: _PathStep | None) -> None:
        errors.append(ConfigError(message, file, _line(node), _spelled(path)))

    def visit(node: Node, path: _PathStep | None) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in checked:
            error("An alias refers to a node that contains it", node, path)
            return 0
        checked.add(id(node))
        if node.tag not in ALLOWED_TAGS:
            error(f"Tag `{display_tag(node.tag)}` is not allowed; use plain YAML values", node, path)
        size = 1
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                size += visit(item, (path, index))
        elif isinstance(node, MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                size += visit(key_node, path)
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                    size += visit(value_node, path)
                    continue
                identity = (key_node.tag, key_node.value)
                if identity in first_line:
                    error(f"Duplicate key `{key_node.value}` (first at line {first_line[identity]})",
                          key_node, (path, key_node.value))
                else:
                    first_line[identity] = _line(key_node)
                size += visit(value_node, (path, key_node.value))
        sizes[id(node)] = size
        return size

    total = visit(root, None)
    added = total - len(checked)            # values written once are counted once
    if added > MAX_EXPANDED_VALUES:
        errors.append(
            ConfigError(
                f"Aliases expand the document by {added} values beyond the {len(checked)} written "
                f"(limit: {MAX_EXPANDED_VALUES} values added by aliases)",
                file,
                _line(root),
            )
        )
    return errors


# A path as the walk holds it: (parent, key or index), None at the top.
_PathStep = tuple


def _spelled(path: _PathStep | None) -> str | None:
    """(((None, "guards"), 0), "scope") -> `$.guards[0].scope`; None for the top."""
    steps = []
    while path is not None:
        path, step = path
        steps.append(step)
    if not steps:
        return None
    spelled = "$"
    for step in reversed(steps):
        spelled = f"{spelled}[{step}]" if isinstance(step, int) else child_path_of(spelled, step)
    return spelled


def path_steps(path: str | None) -> list[tuple[str, None] | tuple[None, int]]:
    """The steps of a path: `$.plans['pro-2'].quotas[0]` -> [("plans", None),
    ("pro-2", None), ("quotas", None), (None, 0)]. Unreadable parts are skipped."""
    return [
        (None, int(index)) if index else (name or quoted, None)
        for name, index, quoted in _PATH_STEP.findall(path or "")
    ]


def child_path_of(path: str, key: object) -> str:
    """The path of mapping key `key` under `path`: `$.plans.pro`, `$.upstreams['chat-api']`."""
    text = str(key)
    return f"{path}.{text}" if _IDENTIFIER.fullmatch(text) else f"{path}[{text!r}]"
