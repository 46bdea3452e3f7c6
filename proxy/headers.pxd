# C types for proxy/headers.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from libc.string cimport memchr, memcpy


cdef extern from "<strings.h>":
    int strncasecmp(const char* left, const char* right, size_t size)


cdef extern from "Python.h":
    # Borrowed references: no reference counting per part.
    PyObject* list_item "PyList_GET_ITEM" (list parts, Py_ssize_t index)
    bint bytes_check_exact "PyBytes_CheckExact" (PyObject* part)
    Py_ssize_t object_size "Py_SIZE" (PyObject* part)
    char* bytes_data "PyBytes_AS_STRING" (PyObject* part)


ctypedef PyObject* borrowed


@cython.locals(count=Py_ssize_t, index=Py_ssize_t, size=Py_ssize_t, length=Py_ssize_t, out=cython.p_char,
               part=borrowed, joined=bytes)
cpdef bytes join_parts(list parts)


@cython.locals(size=Py_ssize_t, kind=int)
cpdef int field_kind(bytes name) except -1

cpdef bint starts_ignoring_case(bytes value, bytes lower)

cpdef bint has_underscore(bytes name)

cpdef frozenset connection_tokens(bytes value)

cdef bytes _HEX_DIGITS

@cython.locals(size=Py_ssize_t, digits=Py_ssize_t, rest=Py_ssize_t, index=Py_ssize_t, framed=bytes,
               out=cython.p_char, hex_digits=cython.p_char)
cpdef bytes chunk_frame(bytes body)
