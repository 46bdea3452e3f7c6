cdef class Quota:
    cdef readonly str metric
    cdef readonly long long limit
    cdef public long long used
    cdef readonly bint hard
    cdef readonly long long window_s
    cdef readonly str policy_header

    cpdef bint admits(self, long long units)
    cpdef long long remaining(self)
    cpdef int state(self)
    cpdef str ratelimit_header(self, long long reset_s)
    cpdef void add_usage(self, long long units)
