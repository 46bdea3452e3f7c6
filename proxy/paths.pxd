# C types for proxy/paths.py (compiled by Cython at install; the .py runs as is when
# AFORO_PURE_PYTHON=1).
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING

cdef dict _PERCENT
cdef object _DOUBLY_ENCODED


@cython.locals(data=cython.p_char, size=Py_ssize_t, index=Py_ssize_t, byte=char, previous=char, end=Py_ssize_t)
cpdef bytes normal_target(bytes target)

@cython.locals(end=Py_ssize_t, parameters=Py_ssize_t, trailing_slash=bint, segments=list)
cdef bytes _normalized(bytes target)
