# One way to read every configuration file: strict YAML -> msgspec schema -> value,
# then the file type's cross-field checks. Any problem is a ConfigError naming the
# file, the 1-based line and the path (`$.routes[2].upstream`); nothing half-loaded.
from __future__ import annotations

import hashlib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec

from config.errors import ConfigError, ConfigErrors, raise_if_any
from config.yaml_source import YamlDocument, child_path_of, load_yaml, no_cyclic_gc, path_steps

T = TypeVar("T")
VERSION_HEX_CHARS = 16
ANY_KEY = "[...]"  # how msgspec names "some entry of this mapping" in a path
_AT_PATH = re.compile(r"(?P<message>.*) - at `(?P<path>\$[^`]*)`", re.DOTALL)
_AT_KEY = re.compile(r"(?P<message>.*) - at `key` in `(?P<path>\$[^`]*)`", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_PATTERN_MISMATCH = re.compile(r"Expected `str` matching regex (?P<pattern>'.*')")
_YAML_KIND = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}


class Problem(NamedTuple):
    """A cross-field problem found after the schema accepted the file: where it is
    (`$.customers[3].plan`) and what is wrong. parse_document adds file and line."""

    path: str
    message: str


CrossCheck = Callable[[Any], Iterable[Problem]]


def duplicate_names(names: Iterable[str], list_path: str, field: str, what: str) -> list[Problem]:
    """A Problem for every entry of the list at `list_path` whose `field` repeats an
    earlier entry's: "Duplicate <what> `x`; first used by `$.list[i]`"."""
    first_by_name: dict[str, int] = {}
    problems = []
    for index, name in enumerate(names):
        first = first_by_name.setdefault(name, index)
        if first != index:
            problems.append(Problem(
                f"{list_path}[{index}].{field}",
                f"Duplicate {what} `{name}`; first used by `{list_path}[{first}]`",
            ))
    return problems


def read_document(path: str | PathLike[str]) -> tuple[str, bytes]:
    """Read the file at `path`: returns (text, raw bytes).

    Raises OSError when it cannot be read (missing, a directory, no permission) and
    ConfigError when it is not UTF-8 (with the line of the first bad byte).
    """
    raw = Path(path).read_bytes()
    return decode_document(raw, str(path)), raw


def decode_document(raw: bytes, file: str) -> str:
    """`raw` as UTF-8 text; ConfigError naming `file`, the line and the offset of the
    first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"File is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
            file,
            line,
        ) from err


def content_version(raw: bytes) -> str:
    """The version of a file's content: the first 16 hex chars of its sha256.
    Equal bytes give equal versions; any change gives another version."""
    return hashlib.sha256(raw).hexdigest()[:VERSION_HEX_CHARS]


def decode_value(kind: Any, raw: Any) -> Any:
    """msgspec's dec_hook for configuration values: a value type written as a YAML
    scalar (Percent, Rate, Scope, HostPort, ...) decodes itself with its `parse`
    classmethod, whose ValueError msgspec reports at the field's path. Types without
    `parse` raise NotImplementedError (msgspec reports them as unsupported)."""
    parse = getattr(kind, "parse", None) if isinstance(kind, type) else None
    if parse is None:
        raise NotImplementedError(f"no decoder for {kind!r}")
    return parse(raw)


def parse_document(
    text: str,
    file: str,
    schema_type: type[T],
    *,
    expected: str,
    pattern_meanings: Mapping[str, str] | None = None,
    cross_check: CrossCheck | None = None,
) -> T:
    """Validate one YAML document `text` into an instance of `schema_type`.

    `file` names the document in errors. `expected` says what the top level must be
    ("a mapping with a `guards` list") for the empty-file and wrong-top-level errors.
    `pattern_meanings` maps a regex used in the schema to words for the message
    (msgspec would show the regex). `cross_check(value)` yields Problems the schema
    cannot see (references between sections, duplicates); each becomes a ConfigError
    with the line of its path, all of them raised together (in line order) as ConfigErrors.

    Raises ConfigError for YAML errors (syntax, tags, duplicate keys), an empty file,
    a top level that is not a mapping, and the first schema error; ConfigErrors when
    several problems are known at once.
    """
    with no_cyclic_gc():        # a file of a million entries: see no_cyclic_gc
        document = load_yaml(text, file)
        if document.empty:
            raise ConfigError(f"File is empty; expected {expected}", file)
        if not isinstance(document.data, dict):
            kind = "null" if document.data is None else _YAML_KIND.get(type(document.data), "a number")
            raise ConfigError(
                f"Expected {expected} at the top level, got {kind}", file, document.line_of(None)
            )
        return _validated(document, file, schema_type, pattern_meanings, cross_check)


def validate_data(
    data: object,
    source: str,
    schema_type: type[T],
    *,
    pattern_meanings: Mapping[str, str] | None = None,
    cross_check: CrossCheck | None = None,
) -> T:
    """Validate `data` given already decoded (a JSON request body) into an instance of
    `schema_type`, by the very rules and with the messages parse_document gives a
    YAML file: the schema, then `cross_check`. Errors name `source` and a path from
    `data`'s top (`$.charges[0].tiers[1].up_to`), no line. Raises ConfigError (the
    first schema error) or ConfigErrors (every cross-field problem, in path order)."""
    return _validated(YamlDocument(data, None), source, schema_type, pattern_meanings, cross_check)


def _validated(document, file, schema_type, pattern_meanings, cross_check):
    try:
        value = msgspec.convert(document.data, schema_type, dec_hook=decode_value)
    except msgspec.ValidationError as err:
        # msgspec stops at the first error; every one is reported (never none: it found one).
        errors = [_schema_error(text, document, file, schema_type, pattern_meanings or {})
                  for text in _schema_errors(document.data, schema_type, "$")]
        errors.sort(key=lambda error: error.line or 0)
        raise (errors[0] if len(errors) == 1 else ConfigErrors(errors)) from err
    if cross_check is not None:
        errors = [
            ConfigError(problem.message, file, document.line_of(problem.path), problem.path)
            for problem in cross_check(value)
        ]
        # In file order, as a reader fixing them top to bottom expects (without lines:
        # in the order found, which follows the document).
        errors.sort(key=lambda error: error.line or 0)
        raise_if_any(errors)
    return value


def _schema_errors(data: object, annotation: Any, path: str) -> list[str]:
    """Every schema error of `data` as a value of `annotation`, as msgspec words them
    (`message - at `path``, paths from the document's top `$`). msgspec stops at the
    first error, so on one the entries of a struct, a list or a mapping are validated
    each on its own and their errors gathered; an entry whose parts are all valid
    reports its own error (a cross-field rule, a wrong type). Empty when valid."""
    try:
        msgspec.convert(data, annotation, dec_hook=decode_value)
        return []
    except msgspec.ValidationError as err:
        own = [_rebased(str(err), path)]
    kind = _unwrap(annotation)
    errors: list[str] = []
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct) and isinstance(data, dict):
        fields = {field.encode_name: field for field in msgspec.structs.fields(kind)}
        for key, value in data.items():
            field = fields.get(key) if isinstance(key, str) else None
            if field is None:
                errors.append(_rebased(f"Object contains unknown field `{key}`", path))
            else:
                errors += _schema_errors(value, field.type, child_path_of(path, key))
        errors += [_rebased(f"Object missing required field `{name}`", path)
                   for name, field in fields.items() if field.required and name not in data]
    elif typing.get_origin(kind) in (tuple, list) and isinstance(data, list):
        args = typing.get_args(kind)
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            for index, item in enumerate(data):
                errors += _schema_errors(item, args[0], f"{path}[{index}]")
    elif typing.get_origin(kind) is dict and isinstance(data, dict):
        key_type, value_type = typing.get_args(kind)
        for key, value in data.items():
            errors += _schema_errors(value, value_type, child_path_of(path, key))
            try:
                msgspec.convert(key, key_type, dec_hook=decode_value)
            except msgspec.ValidationError as err:
                errors.append(_rebased(f"{err} - at `key` in `$`", path))
    return errors or own


def _rebased(text: str, path: str) -> str:
    # A msgspec error found validating the value at `path` on its own, with its path
    # (from that value's `$`) made one from the document's top.
    if path == "$":
        return text
    if " - at `" not in text:
        return f"{text} - at `{path}`"
    return text.replace(" - at `$", f" - at `{path}", 1).replace(" - at `key` in `$", f" - at `key` in `{path}", 1)


def _schema_error(
    text: str,
    document: YamlDocument,
    file: str,
    schema_type: type,
    pattern_meanings: Mapping[str, str],
) -> ConfigError:
    message, path = text, None
    match = _AT_KEY.fullmatch(text)
    if match:
        message, path = f"{match['message']} as a mapping key", match["path"]
    elif match := _AT_PATH.fullmatch(text):
        message, path = match["message"], match["path"]
    if path is not None and ANY_KEY in path:
        path = _name_mapping_keys(path, document.data, schema_type)
    unknown = _UNKNOWN_FIELD.fullmatch(message)
    line = document.line_of(path, unknown["key"] if unknown else None)
    written = document.scalar_at(path)
    if document.root is None and path is not None:
        # Decoded data (JSON) has no text as written: its string is the text.
        value = _data_at(document.data, path)
        written = value if isinstance(value, str) else None
    message = _explain_pattern(message, written, pattern_meanings)
    message = _explain_choices(message, written, schema_type, path)
    return ConfigError(message, file, line, path)


def _explain_pattern(message: str, written: str | None, meanings: Mapping[str, str]) -> str:
    # msgspec names the regex a string failed; say what the field expects instead.
    mismatch = _PATTERN_MISMATCH.fullmatch(message)
    if mismatch is None or written is None:
        return message
    for pattern, meaning in meanings.items():
        if mismatch["pattern"] == repr(pattern):
            return f"Expected {meaning}, got `{written}`"
    return message


def _explain_choices(message: str, written: str | None, schema_type: type, path: str | None) -> str:
    # msgspec says "Invalid enum value 'x'" for a word outside a Literal; name the choices.
    if not message.startswith("Invalid enum value") or path is None:
        return message
    annotation = _literal_in(_annotation_at(schema_type, path))
    if annotation is None:
        return message
    choices = ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    return f"Expected one of {choices}, got `{written}`" if written is not None else f"Expected one of {choices}"


def _literal_in(annotation: Any) -> Any:
    # The Literal a field takes, alone or beside other forms (`Period | Literal["monthly"]`).
    unwrapped = _unwrap(annotation)
    if typing.get_origin(unwrapped) is typing.Literal:
        return unwrapped
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            if typing.get_origin(member) is typing.Literal:
                return member
    return None


def _name_mapping_keys(path: str, data: object, schema_type: type) -> str:
    """msgspec writes `$.upstreams[...].url` for a bad value inside a mapping. It
    stops at the first bad entry, in file order, so validating the entries one by
    one finds its key: `$.upstreams.chat.url`. The path is kept when that fails."""
    while ANY_KEY in path:
        head, _, tail = path.partition(ANY_KEY)
        mapping = _data_at(data, head)
        entry_type = _mapping_value_type(_annotation_at(schema_type, head))
        if not isinstance(mapping, dict) or entry_type is None:
            return path
        for key, entry in mapping.items():
            try:
                msgspec.convert(entry, entry_type, dec_hook=decode_value)
            except msgspec.ValidationError:
                path = child_path_of(head, key) + tail
                break
        else:
            return path
    return path


def _data_at(data: object, path: str) -> object:
    for key, index in path_steps(path):
        if index is not None:
            data = data[index] if isinstance(data, list) and index < len(data) else None
        else:
            data = _entry(data, key)
    return data


def _entry(mapping: object, key: str | None) -> object:
    if not isinstance(mapping, dict):
        return None
    for candidate, value in mapping.items():
        if str(candidate) == key:
            return value
    return None


def _annotation_at(annotation: Any, path: str) -> Any:
    for key, index in path_steps(path):
        annotation = _unwrap(annotation)
        if annotation is None:
            return None
        if index is not None:
            args = typing.get_args(annotation)
            annotation = args[0] if typing.get_origin(annotation) in (tuple, list) and args else None
        elif isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            fields = {field.encode_name: field.type for field in msgspec.structs.fields(annotation)}
            annotation = fields.get(key)
        else:
            annotation = _mapping_value_type(annotation)
    return annotation


def _mapping_value_type(annotation: Any) -> Any:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is dict:
        return typing.get_args(annotation)[1]
    return None


def _unwrap(annotation: Any) -> Any:
    # Annotated[X, Meta(...)] -> X; `X | None` -> X; other unions are left undecided.
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return None
            annotation = members[0]
        else:
            return annotation
