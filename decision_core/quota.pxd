cdef dict _POLICY_TEXTS
cdef tuple _policy_texts(str metric, long long limit, long long window_s)


cdef class Quota:
    cdef readonly str metric
    cdef readonly long long limit
    cdef public long long used
    cdef readonly bint hard
    cdef readonly long long window_s
    cdef readonly tuple policy_field
    cdef readonly str remaining_prefix

    cpdef bint admits(self, long long units)
    cpdef long long remaining(self)
    cpdef int state(self)
    cpdef str ratelimit_header(self, long long reset_s)
    cpdef void add_usage(self, long long units)
