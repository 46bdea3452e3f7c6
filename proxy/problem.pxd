# C types for proxy/problem.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython


@cython.locals(last=tuple)
cpdef bytes status_line(int status, phrase=*)
