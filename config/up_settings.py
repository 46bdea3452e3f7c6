# The all-in-one settings file (`aforo up --config FILE`): the control plane, an
# optional catalog applied at every start, and the proxy, in one file. The proxy
# section is a proxy settings file without `edge_state` or `control_plane`: `aforo up`
# points the proxy at its own control plane. Relative paths are read from this file's
# directory.
#
#   control_plane  control plane settings (see config.control_plane_settings)
#   catalog        a catalog file (see config.catalog_file), applied declaratively
#   proxy          proxy settings (see config.proxy_settings)
from __future__ import annotations

import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import msgspec

from config.control_plane_settings import (
    SETTINGS_PATTERN_MEANINGS as CONTROL_PLANE_PATTERN_MEANINGS,
)
from config.control_plane_settings import (
    ControlPlaneSettings,
    control_plane_problems,
    resolve_paths,
)
from config.documents import Problem, parse_document, read_document
from config.proxy_settings import (
    SETTINGS_PATTERN_MEANINGS as PROXY_PATTERN_MEANINGS,
)
from config.proxy_settings import (
    ControlPlaneSource,
    ProxySettings,
    proxy_problems,
    resolve_proxy_paths,
)
from config.schema import Schema

UP_SETTINGS_EXPECTED = "a mapping with `proxy` (and optionally `control_plane` and `catalog`)"
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class UpSettings(Schema):
    """A validated all-in-one settings file (see the module comment)."""

    proxy: ProxySettings
    control_plane: ControlPlaneSettings = msgspec.field(default_factory=ControlPlaneSettings)
    catalog: str | None = None

    @property
    def control_plane_url(self) -> str:
        """Where the proxies reach the control plane (a wildcard listen address is
        reached on loopback)."""
        host = self.control_plane.listen.host
        host = _WILDCARD_HOSTS.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.control_plane.listen.port}"


def parse_up_settings(text: str, file: str = "<string>", base_dir: str | PathLike[str] | None = None,
                      environ: Mapping[str, str] | None = None) -> UpSettings:
    """Validate all-in-one settings YAML `text`; `file` names it in errors. The proxy
    section comes back pointed at the control plane (`proxy.control_plane` set).

    Raises ConfigError(s) naming file, line and path: YAML and schema errors, every
    problem of the proxy and control plane sections as their own files would report
    it, a proxy section that sets `edge_state` or `control_plane`, and a control
    plane on port 0 (the proxies must know where it is).
    """
    environ = os.environ if environ is None else environ
    settings = parse_document(
        text, file, UpSettings, expected=UP_SETTINGS_EXPECTED,
        pattern_meanings={**PROXY_PATTERN_MEANINGS, **CONTROL_PLANE_PATTERN_MEANINGS},
        cross_check=lambda value: _problems(value, environ))
    settings = msgspec.structs.replace(settings, proxy=msgspec.structs.replace(
        settings.proxy, control_plane=ControlPlaneSource(url=settings.control_plane_url)))
    if base_dir is None:
        return settings
    catalog = None if settings.catalog is None else os.path.join(base_dir, settings.catalog)
    return msgspec.structs.replace(settings, catalog=catalog,
                                   control_plane=resolve_paths(settings.control_plane, base_dir),
                                   proxy=resolve_proxy_paths(settings.proxy, base_dir))


def load_up_settings(path: str | PathLike[str], environ: Mapping[str, str] | None = None) -> UpSettings:
    """Read and validate the file at `path` (relative paths resolved against its
    directory). OSError when it cannot be read; ConfigError as parse_up_settings."""
    text, _ = read_document(path)
    return parse_up_settings(text, str(path), Path(path).parent, environ)


def up_proxy_settings(path: str | PathLike[str]) -> ProxySettings:
    """The proxy settings of the all-in-one file at `path` (what each proxy worker of
    `aforo up` loads)."""
    return load_up_settings(path).proxy


def _problems(settings: UpSettings, environ: Mapping[str, str]) -> list[Problem]:
    problems = []
    proxy = settings.proxy
    for field in ("edge_state", "control_plane"):
        if getattr(proxy, field) is not None:
            problems.append(Problem(f"$.proxy.{field}", f"`aforo up` sets the proxy's `{field}` itself; "
                                                        "remove it from the `proxy` section"))
    if settings.control_plane.listen.port == 0:
        problems.append(Problem("$.control_plane.listen", "`aforo up` needs a fixed port for the control plane "
                                                          "(the proxies connect to it)"))
    linked = msgspec.structs.replace(proxy, edge_state=None,
                                     control_plane=ControlPlaneSource(url=settings.control_plane_url))
    problems += [Problem("$.proxy" + problem.path[1:], problem.message) for problem in proxy_problems(linked, environ)]
    problems += control_plane_problems(settings.control_plane, environ, "$.control_plane")
    return problems
