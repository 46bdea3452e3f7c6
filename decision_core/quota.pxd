cimport cython


@cython.final
cdef class QuotaLimit:
    cdef readonly str metric
    cdef readonly long long limit
    cdef readonly bint hard
    cdef readonly long long window_s
    cdef readonly str policy_header
    cdef readonly str remaining_prefix

    cpdef bint admits(self, long long used, long long units)
    @cython.locals(left=cython.longlong)
    cpdef long long remaining(self, long long used)
    cpdef int state(self, long long used)
    cpdef str ratelimit_header(self, long long used, long long reset_s)


@cython.final
cdef class PlanQuotas:
    cdef readonly tuple limits
    cdef readonly dict slots

    cpdef int slot(self, str metric)
    cpdef QuotaLimit limit_at(self, int slot)
