# The decision core: pure functions of (edge state, request facts, now) -> Decision,
# plus the rating and margin arithmetic the control plane shares. No I/O, no clock.
# Each module is plain Python compiled by Cython at install; setting
# AFORO_PURE_PYTHON=1 loads the Python sources instead. COMPILED says which runs.

import importlib.machinery
import importlib.util
import os
import sys

# Compiled modules, in dependency order; `errors` and `money` always stay plain Python.
CORE_MODULES = ("bucket", "quota", "margin", "rating", "state", "decide")
PURE_PYTHON_ENV = "AFORO_PURE_PYTHON"


class _SourceFinder:
    # Finds decision_core modules as .py sources even where a compiled build sits beside them.
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in CORE_MODULES:
            return None
        source = os.path.join(os.path.dirname(__file__), name + ".py")
        return importlib.util.spec_from_file_location(fullname, source)


if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
    sys.meta_path.insert(0, _SourceFinder)

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


def _is_compiled(module):
    return isinstance(getattr(module.__spec__, "loader", None), importlib.machinery.ExtensionFileLoader)


# True only when every core module was loaded from its compiled extension.
COMPILED = all(_is_compiled(sys.modules[f"{__name__}.{name}"]) for name in CORE_MODULES)
