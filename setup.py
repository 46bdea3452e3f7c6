# Builds the decision core with Cython: each module's .py is the source and the .pxd
# beside it adds C types. `pip install .` (or `-e .`) compiles; the same .py files run
# uncompiled when AFORO_PURE_PYTHON=1.
from Cython.Build import cythonize
from setuptools import Extension, setup

CORE_MODULES = ("bucket", "quota", "margin", "rating", "state", "decide")

extensions = [
    Extension(f"decision_core.{name}", [f"decision_core/{name}.py"]) for name in CORE_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
        },
    ),
)
