# Builds the decision core and the proxy's hot path with Cython: each module's .py is
# the source and the .pxd beside it adds C types. `pip install .` (or `-e .`)
# compiles; the same .py files run uncompiled when AFORO_PURE_PYTHON=1.
from Cython.Build import cythonize
from setuptools import Extension, setup

# package -> (modules, directives beyond language_level 3). The decision core indexes
# only its own C arrays, so it drops bounds and negative-index checks; the proxy keeps
# Python's indexing semantics (it indexes deques and lists from the end).
COMPILED_MODULES = {
    "decision_core": (("bucket", "quota", "margin", "rating", "state", "decide"),
                      {"boundscheck": False, "wraparound": False, "initializedcheck": False}),
    "proxy": (("headers", "paths", "problem", "routing", "edge_snapshot", "metrics", "meter_event", "metering", "upstream", "app", "connection",
               "llm_usage"), {}),
}

extensions = []
for package, (names, directives) in COMPILED_MODULES.items():
    extensions += cythonize(
        [Extension(f"{package}.{name}", [f"{package}/{name}.py"]) for name in names],
        compiler_directives={"language_level": 3, **directives},
    )

setup(ext_modules=extensions)
