cimport cython

cdef long long NS_PER_S

cdef long long _to_ns(double now)


@cython.final
cdef class TokenBucket:
    cdef readonly long long tokens_per_period
    cdef readonly long long period_ns
    cdef readonly long long capacity
    cdef readonly long long burst
    cdef long long credit
    cdef long long updated_ns
    cdef readonly bint fed

    @cython.locals(elapsed_ns=cython.longlong, missing=cython.longlong)
    cdef void _refill(self, long long now_ns)

    @cython.locals(wait_ns=cython.longlong)
    cpdef double take(self, double now)

    cpdef double available(self, double now)
    cpdef void feed(self, long long tokens)
    cpdef void drain(self)
    cpdef void run_on_time(self, double now, bint fed)
