# C types for proxy/headers.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy


@cython.locals(size=Py_ssize_t, length=Py_ssize_t, out=cython.p_char, part=bytes, joined=bytes)
cpdef bytes join_parts(list parts)
