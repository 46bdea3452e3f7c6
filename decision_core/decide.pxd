cimport cython
from decision_core.state cimport CustomerState, GuardStanding, RequestFacts
from decision_core.quota cimport Quota


cdef class Decision:
    cdef readonly int outcome
    cdef readonly int status
    cdef readonly str reason
    cdef readonly str title
    cdef readonly str detail
    cdef readonly long long retry_after_s
    cdef readonly tuple headers
    cdef readonly str guard_id
    cdef readonly str shadow


cdef tuple _NO_HEADERS
cdef tuple _THROTTLE_HEADER
cdef dict TITLES
cdef dict _INACTIVE
cdef dict _NOT_ENTITLED
cdef str _OVERALL_KEY

cdef Decision _not_entitled(str feature)

@cython.locals(decision=Decision)
cdef Decision _decision(int outcome, int status, str reason, str detail,
                        long long retry_after_s, tuple headers, str guard_id, str shadow)

@cython.locals(whole=cython.longlong)
cdef long long _ceil_seconds(double seconds)

@cython.locals(level=cython.int, wait_s=cython.double)
cdef tuple _margin_action(GuardStanding standing, RequestFacts facts, double now, long long reset_s)

@cython.locals(quota=Quota, reset_s=cython.longlong, retry_after_s=cython.longlong,
               standing=GuardStanding, outcome=cython.int, levels=dict, quotas=dict, quota_headers=tuple,
               headers=tuple)
cpdef Decision decide(CustomerState customer, RequestFacts facts, double now)

cdef str _margin_detail(str reason, GuardStanding standing, RequestFacts facts)
