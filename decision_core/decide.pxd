cimport cython
from decision_core.state cimport CustomerState, GuardStanding, RequestFacts
from decision_core.quota cimport QuotaLimit


@cython.final
@cython.freelist(64)
cdef class Decision:
    cdef readonly int outcome
    cdef readonly int status
    cdef readonly str reason
    cdef readonly str detail
    cdef readonly long long retry_after_s
    cdef readonly str quota_policy
    cdef readonly str quota_status
    cdef readonly str guard_id
    cdef readonly str shadow
    cdef readonly dict model_map


cdef dict _INACTIVE
cdef dict _NOT_ENTITLED
cdef str _OVERALL_KEY

@cython.locals(decision=Decision)
cdef Decision _decision(int outcome, int status, str reason, str detail, long long retry_after_s,
                        str quota_policy, str quota_status, str guard_id, str shadow, dict model_map=*)

cdef Decision _quota_exceeded(QuotaLimit quota, long long used, long long reset_s)

cdef str _unserved_status(CustomerState customer, int slot, long long reset_s)

@cython.locals(quota=QuotaLimit, slot=cython.int, used=cython.longlong)
cpdef Decision quota_refusal(CustomerState customer, str metric, long long units, double now)

@cython.locals(quota=QuotaLimit, slot=cython.int, reset_s=cython.longlong, policies=list, statuses=list)
cpdef tuple ratelimit_fields(CustomerState customer, tuple metrics, double now)

cdef Decision _not_entitled(str feature)

@cython.locals(whole=cython.longlong)
cdef long long _ceil_seconds(double seconds)

@cython.locals(level=cython.int, wait_s=cython.double)
cdef tuple _margin_action(GuardStanding standing, RequestFacts facts, double now, long long reset_s)

cdef str _margin_detail(str reason, GuardStanding standing, RequestFacts facts)

@cython.locals(standings=list)
cdef list _standings(dict levels, RequestFacts facts)

@cython.locals(quota=QuotaLimit, slot=cython.int, used=cython.longlong, reset_s=cython.longlong, retry_after_s=cython.longlong,
               standing=GuardStanding, outcome=cython.int, levels=dict, shadows=dict, model_map=dict, standings=list,
               quota_policy=str, quota_status=str)
cpdef Decision decide(CustomerState customer, RequestFacts facts, double now)
