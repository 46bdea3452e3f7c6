# Checking configuration before anything runs (`aforo check-config`, `aforo up`): a file
# of any kind, told apart by its top-level keys, and with it every file it names (the
# edge state proxy settings read, the guard file and catalog of a control plane or an
# all-in-one file) and what the files say of each other (a notify channel guards name
# must be one the settings define; a catalog checked on its own or by `aforo up` must
# define every entry it names). Every problem is a ConfigError naming the file it is
# in, with its line; all of them are raised together.
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

from config.catalog_file import SECTIONS, CatalogFile, load_catalog_file
from config.control_plane_settings import ControlPlaneSettings, load_control_plane_settings
from config.documents import read_document
from config.edge_state_file import load_edge_state_file
from config.errors import ConfigError, raise_if_any
from config.guards import load_guards
from config.proxy_settings import load_proxy_settings
from config.up_settings import load_up_settings
from config.yaml_source import load_yaml

T = TypeVar("T")


class Kind(NamedTuple):
    """A kind of configuration file: its name in words, the top-level keys that
    identify it, and its check (the file's path -> a one-line summary)."""

    name: str
    keys: tuple[str, ...]
    check: Callable[[str], str]


def check_file(file: str, kind: str | None = None) -> str:
    """Check the configuration file `file` as `kind` (default: kind_of(file)) with
    every file it names; a one-line summary of it. Raises ConfigError (ConfigErrors
    for several, each naming the file it is in) and OSError when `file` itself cannot
    be read."""
    return KINDS[kind or kind_of(file)].check(file)


def kind_of(file: str) -> str:
    """The kind of `file` by its top-level keys: the first of KINDS with any of its
    keys there; anything unreadable is taken for a guard file, whose loader reports
    YAML errors with their line."""
    try:
        document = load_yaml(read_document(file)[0], file).data
    except (ConfigError, OSError):
        return "guards"
    if isinstance(document, dict):
        for kind, (_, keys, _) in KINDS.items():
            if any(key in document for key in keys):
                return kind
    return "guards"


def _guards(file: str) -> str:
    guard_set = load_guards(file)
    count = len(guard_set.guards)
    return f"{count} {'guard' if count == 1 else 'guards'}, version {guard_set.version}"


def _proxy_settings(file: str) -> str:
    settings = load_proxy_settings(file)
    edge_state = settings.edge_state
    if edge_state is not None and edge_state.file is not None:
        _named_file(file, "$.edge_state.file", "edge state file", load_edge_state_file, edge_state.file)
    return f"proxy settings, {len(settings.routes)} routes, {len(settings.upstreams)} upstreams"


def _edge_state(file: str) -> str:
    state = load_edge_state_file(file)
    return f"edge state, {len(state.plans)} plans, {len(state.customers)} customers"


def _catalog(file: str) -> str:
    catalog = _whole_catalog(file)
    return "catalog, " + ", ".join(f"{len(getattr(catalog, section))} {section}" for section, _ in SECTIONS)


def _whole_catalog(file: str) -> CatalogFile:
    # Checked on its own (or by `aforo up`, before the store is touched) a catalog
    # must define every entry it names; `aforo apply` also accepts what the store it
    # is applied to already holds.
    return load_catalog_file(file, others={})


def _control_plane_settings(file: str) -> str:
    settings = load_control_plane_settings(file)
    raise_if_any(_guard_file_errors(file, "$.guards", settings))
    return f"control plane settings, listening on {settings.listen}, {len(settings.notify)} notify channels"


def _up_settings(file: str) -> str:
    settings = load_up_settings(file)
    errors = _guard_file_errors(file, "$.control_plane.guards", settings.control_plane)
    if settings.catalog is not None:
        try:
            _named_file(file, "$.catalog", "catalog", _whole_catalog, settings.catalog)
        except ConfigError as err:
            errors += err.errors
    raise_if_any(errors)
    return (f"all-in-one settings, control plane on {settings.control_plane.listen}, "
            f"proxy with {len(settings.proxy.routes)} routes")


def _guard_file_errors(file: str, at: str, settings: ControlPlaneSettings) -> list[ConfigError]:
    # The guard file control plane settings (found at path `at` of `file`) name, and
    # each notify channel its guards name that the settings do not define.
    if settings.guards is None:
        return []
    try:
        guard_set = _named_file(file, at, "guard file", load_guards, settings.guards)
    except ConfigError as err:
        return list(err.errors)
    defined = ", ".join(f"`{name}`" for name in sorted(settings.notify)) or "none"
    document = load_yaml(read_document(guard_set.source)[0], guard_set.source)
    return [ConfigError(f"Notify channel `{channel}` is not defined in the control plane settings "
                        f"{file} (defined: {defined}); its webhooks would fail",
                        guard_set.source, document.line_of(path), path)
            for path, channel in guard_set.channels() if channel not in settings.notify]


def _named_file(file: str, at: str, what: str, check: Callable[[str], T], named: str) -> T:
    # Check the file `named` that `file` names at path `at`: its own errors stand, and
    # one that cannot be read is an error of `file` at `at` (with its line).
    try:
        return check(named)
    except OSError as err:
        line = load_yaml(read_document(file)[0], file).line_of(at)
        raise ConfigError(f"Cannot read the {what} {named}: {err.strerror or err}", file, line, at) from err


# The first kind with any of its keys in a file wins (an all-in-one file also has
# control plane keys, in its `control_plane` section).
KINDS = {
    "all-in-one": Kind("all-in-one settings", ("proxy",), _up_settings),
    "proxy": Kind("proxy settings", ("upstreams",), _proxy_settings),
    "edge-state": Kind("edge state", ("period",), _edge_state),
    "catalog": Kind("catalog", tuple(section for section, _ in SECTIONS), _catalog),
    "control-plane": Kind("control plane settings", ("listen", "database", "notify", "webhooks", "redis_url",
                                                     "edge_resync_interval_s", "meter_claim_idle_s", "reporting"),
                          _control_plane_settings),
    "guards": Kind("guards file", ("guards",), _guards),
}
