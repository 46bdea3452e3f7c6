cimport cython

from decision_core.bucket cimport TokenBucket
from decision_core.quota cimport PlanQuotas


@cython.final
cdef class GuardStanding:
    cdef readonly str guard_id
    cdef readonly int level
    cdef readonly bint enforce
    cdef readonly TokenBucket bucket
    cdef readonly frozenset locked_features
    cdef readonly dict model_map
    cdef readonly str block_detail
    cdef readonly str throttle_detail


@cython.final
cdef class CustomerState:
    cdef readonly str customer_id
    cdef readonly str tier
    cdef readonly str subscription_status
    cdef readonly bint subscription_open
    cdef readonly frozenset features
    cdef readonly PlanQuotas quotas
    cdef long long used[8]
    cdef long long report_offset[8]
    cdef readonly dict guard_levels
    cdef readonly double period_end
    cdef readonly dict acting_levels
    cdef readonly dict shadow_levels

    @cython.locals(slot=cython.int)
    cpdef long long quota_used(self, str metric)
    @cython.locals(slot=cython.int)
    cpdef void add_usage(self, str metric, long long units)
    @cython.locals(slot=cython.int)
    cpdef long long reported_usage(self, str metric)
    @cython.locals(slot=cython.int)
    cpdef void report_usage(self, str metric, long long units)
    cpdef void restate(self, str subscription_status, dict guard_levels) except *


@cython.final
cdef class RequestFacts:
    cdef readonly tuple features
    cdef readonly str metric
    cdef readonly long long units
    cdef readonly tuple other_metrics
