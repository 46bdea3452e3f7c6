# C types for proxy/edge_snapshot.py (compiled by Cython at install; the .py runs as
# is when AFORO_PURE_PYTHON=1).
cimport cython
from decision_core.state cimport CustomerState


@cython.final
cdef class EdgeSnapshot:
    cdef object _store
    cdef dict _by_key
    cdef dict _by_index
    cdef dict _by_id
    cdef readonly str version
    cdef readonly double period_end
    cdef bint _sealed

    @cython.locals(state=CustomerState)
    cpdef CustomerState customer_for_key(self, bytes api_key)
    @cython.locals(state=CustomerState)
    cpdef CustomerState _state_of(self, index)
