# The decision core: pure functions of (edge state, request facts, now) -> Decision,
# plus the rating and margin arithmetic the control plane shares. No I/O, no clock.
# Each module is plain Python compiled by Cython at install; setting
# AFORO_PURE_PYTHON=1 loads the Python sources instead. COMPILED says which runs.

import importlib.machinery
import importlib.util
import os
import sys

# Compiled modules, in dependency order; `errors` always stays plain Python.
CORE_MODULES = ("bucket", "quota", "margin", "rating", "state", "decide")
PURE_PYTHON_ENV = "AFORO_PURE_PYTHON"
PURE_PYTHON = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


class _SourceFinder:
    # Finds a package's compiled modules as .py sources even where a compiled build
    # sits beside them.
    def __init__(self, package, directory, module_names):
        self.package = package
        self.directory = directory
        self.module_names = frozenset(module_names)

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != self.package or name not in self.module_names:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(self.directory, name + ".py"))


def use_sources_when_pure(package, directory, module_names):
    """When AFORO_PURE_PYTHON is set, make `package`'s `module_names` (files in
    `directory`) load from their .py sources instead of their compiled builds. Call
    from the package's __init__ before importing them."""
    if PURE_PYTHON:
        sys.meta_path.insert(0, _SourceFinder(package, directory, module_names))


def compiled(package, module_names):
    """True only when every one of `package`'s `module_names` (already imported) was
    loaded from its compiled extension."""
    return all(
        isinstance(getattr(sys.modules[f"{package}.{name}"].__spec__, "loader", None),
                   importlib.machinery.ExtensionFileLoader)
        for name in module_names
    )


use_sources_when_pure(__name__, os.path.dirname(__file__), CORE_MODULES)

from decision_core import bucket, decide as _decide_module, margin, quota, rating, state  # noqa: E402
from decision_core.bucket import TokenBucket  # noqa: E402
from decision_core.decide import (  # noqa: E402
    ALLOW,
    ALLOW_THROTTLED,
    REJECT,
    Decision,
    decide,
)
from decision_core.errors import (  # noqa: E402
    DecisionCoreError,
    IllegalTransitionError,
    InvalidStateError,
    PricingError,
    RateError,
    ThresholdOrderError,
)
from decision_core.margin import (  # noqa: E402
    LEVEL_BLOCK,
    LEVEL_OK,
    LEVEL_THROTTLE,
    LEVEL_WARN,
    LevelThresholds,
    margin_level,
    margin_pct,
    transition_kind,
)
from decision_core.quota import MAX_QUOTA_METRICS, NO_QUOTAS, PlanQuotas, QuotaLimit  # noqa: E402
from decision_core.rating import FlatFee, Graduated, Package, PerUnit, Tier, Volume, event_revenue  # noqa: E402
from decision_core.state import OVERALL, CustomerState, GuardStanding, RequestFacts  # noqa: E402


# True only when every core module was loaded from its compiled extension.
COMPILED = compiled(__name__, CORE_MODULES)
