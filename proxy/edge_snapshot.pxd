# C types for proxy/edge_snapshot.py (compiled by Cython at install; the .py runs as
# is when AFORO_PURE_PYTHON=1).
cimport cython
from decision_core.state cimport CustomerState


@cython.final
cdef class EdgeSnapshot:
    cdef object _store
    cdef dict _by_key
    cdef dict _by_index
    cdef readonly str version
    cdef readonly double period_end
    cdef readonly double valid_until
    cdef bint _sealed

    @cython.locals(state=CustomerState)
    cpdef CustomerState customer_for_key(self, bytes api_key)
    @cython.locals(state=CustomerState)
    cpdef CustomerState _state_of(self, index)


cdef unsigned long long _FNV_OFFSET, _FNV_PRIME

@cython.locals(value=cython.ulonglong, at=Py_ssize_t)
cdef unsigned long long _id_hash(const unsigned char[:] data, Py_ssize_t start, Py_ssize_t end) noexcept

@cython.locals(start=Py_ssize_t, end=Py_ssize_t, index=Py_ssize_t, slot=cython.ulonglong)
cdef void _fill_id_slots(const unsigned char[:] ids, const unsigned int[:] id_ends, unsigned int[:] slots,
                         unsigned long long mask) except *
