# Configuration: guard files, proxy settings and edge state files, all read by one
# strict loader. Loading either returns a complete value or raises ConfigError; there
# is no partially loaded state, so a reload can keep the old value on any error.
from config.edge_state_file import (
    EdgeStateFile,
    load_edge_state_file,
    parse_edge_state_file,
)
from config.errors import ConfigError, ConfigErrors
from config.guards import GuardSet, load_guards, parse_guards
from config.proxy_settings import (
    ProxySettings,
    load_proxy_settings,
    parse_proxy_settings,
)
from config.schema import (
    OVERALL_METRIC,
    WILDCARD_METRIC,
    Actions,
    Guard,
    GuardFile,
    Level1,
    Level2,
    Level3,
    Schema,
)
from config.values import Band, Percent, Rate, Scope

__all__ = [
    "OVERALL_METRIC",
    "WILDCARD_METRIC",
    "Actions",
    "Band",
    "ConfigError",
    "ConfigErrors",
    "EdgeStateFile",
    "Guard",
    "GuardFile",
    "GuardSet",
    "Level1",
    "Level2",
    "Level3",
    "Percent",
    "ProxySettings",
    "Rate",
    "Schema",
    "Scope",
    "load_edge_state_file",
    "load_guards",
    "load_proxy_settings",
    "parse_edge_state_file",
    "parse_guards",
    "parse_proxy_settings",
]
