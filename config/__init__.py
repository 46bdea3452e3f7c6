# Configuration: guard file schema, strict YAML loading, and the validated GuardSet.
# Loading either returns a complete GuardSet or raises ConfigError; there is no
# partially loaded state, so a reload can keep the old set on any error.
from config.errors import ConfigError, ConfigErrors
from config.guards import GuardSet, load_guards, parse_guards
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
    "Guard",
    "GuardFile",
    "GuardSet",
    "Level1",
    "Level2",
    "Level3",
    "Percent",
    "Rate",
    "Schema",
    "Scope",
    "load_guards",
    "parse_guards",
]
