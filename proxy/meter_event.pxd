# C types for proxy/meter_event.py (compiled by Cython at install; the .py runs as is
# when AFORO_PURE_PYTHON=1).
cimport cython


@cython.final
cdef class EventIds:
    cdef readonly object prefix
    cdef readonly str prefix_hex
    cdef unsigned long long _counter

    cpdef str next(self)


cdef EventIds _PROCESS_IDS

cpdef str new_event_id()
