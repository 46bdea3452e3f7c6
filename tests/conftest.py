import os

import decision_core


def pytest_report_header(config):
    build = "compiled (Cython)" if decision_core.COMPILED else "pure Python"
    return f"decision core: {build}; {decision_core.PURE_PYTHON_ENV}={os.environ.get(decision_core.PURE_PYTHON_ENV, '')!r}"
