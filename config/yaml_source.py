# Strict YAML reading for configuration files: plain data only (standard tags), no
# duplicate keys, bounded alias expansion. The composed node tree is kept so a
# validation path such as `$.guards[2].actions.level_2` maps back to a 1-based line.
from __future__ import annotations

import re
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from config.errors import ConfigError, raise_if_any

_CORE_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _CORE_TAG + "merge"
ALLOWED_TAGS = frozenset(
    _CORE_TAG + name
    for name in ("str", "int", "float", "bool", "null", "seq", "map", "merge", "timestamp", "value")
)
# Anchors and aliases may share a list; they may not blow a small file up into a huge
# value (the "billion laughs" shape) that validation would then walk: the values
# aliases add (beyond those written in the file, which may be millions) are bounded.
MAX_EXPANDED_VALUES = 100_000
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


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML document: `data` (plain dicts, lists, scalars) and the node tree
    it came from (`root`, None for an empty file), used to find lines for paths."""

    data: object
    root: Node | None

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
    a non-standard tag, a duplicate mapping key, or runaway alias expansion.
    """
    try:
        loader = StrictSafeLoader(text)
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        message = f"Invalid YAML: unacceptable character #x{err.character:04x} ({err.reason})"
        raise ConfigError(message, file, line) from err
    try:
        root = loader.get_single_node()
        if root is None:
            return YamlDocument(data=None, root=None)
        raise_if_any(_check_tree(root, file))
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as err:
        raise _syntax_error(err, file) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"Invalid YAML: {err}", file) from err
    except RecursionError as err:
        raise ConfigError("Invalid YAML: nested too deeply", file) from err
    finally:
        loader.dispose()
    return YamlDocument(data=data, root=root)


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

    def error(message: str, node: Node, path: str) -> None:
        errors.append(ConfigError(message, file, _line(node), None if path == "$" else path))

    def visit(node: Node, path: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in checked:
            error("An alias refers to a node that contains it", node, path)
            return 0
        checked.add(id(node))
        if node.tag not in ALLOWED_TAGS:
            tag = display_tag(node.tag)
            error(f"Tag `{tag}` is not allowed; use plain YAML values", node, path)
        size = 1
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                size += visit(item, f"{path}[{index}]")
        elif isinstance(node, MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                size += visit(key_node, path)
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                    size += visit(value_node, path)
                    continue
                child_path = child_path_of(path, key_node.value)
                identity = (key_node.tag, key_node.value)
                if identity in first_line:
                    error(
                        f"Duplicate key `{key_node.value}` (first at line {first_line[identity]})",
                        key_node,
                        child_path,
                    )
                else:
                    first_line[identity] = _line(key_node)
                size += visit(value_node, child_path)
        sizes[id(node)] = size
        return size

    total = visit(root, "$")
    added = total - len(checked)            # values written once are counted once
    if added > MAX_EXPANDED_VALUES:
        errors.append(
            ConfigError(
                f"Aliases expand the document by {added} values beyond the {len(checked)} written "
                f"(limit {MAX_EXPANDED_VALUES})",
                file,
                _line(root),
            )
        )
    return errors


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
