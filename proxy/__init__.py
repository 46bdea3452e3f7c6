# The edge proxy (data plane). Its hot path — the client and upstream protocols — is
# compiled by Cython at install like the decision core; AFORO_PURE_PYTHON=1 runs the
# .py sources instead. COMPILED says which build is loaded.
import os

from decision_core import compiled, use_sources_when_pure

COMPILED_MODULES = ("headers", "paths", "problem", "routing", "edge_snapshot", "metrics", "meter_event", "metering", "upstream", "app", "connection",
                    "llm_usage")
use_sources_when_pure(__name__, os.path.dirname(__file__), COMPILED_MODULES)

from proxy import (  # noqa: E402,F401
    app,
    connection,
    edge_snapshot,
    headers,
    llm_usage,
    meter_event,
    metering,
    metrics,
    paths,
    problem,
    routing,
    upstream,
)

COMPILED = compiled(__name__, COMPILED_MODULES)
